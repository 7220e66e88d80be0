"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV'18): match the conditional distributions of
"which sample is close to which" in the student's and the teacher's feature spaces.

With x̂_i = x_i / (‖x_i‖₂ + ε) (a zero vector stays zero), the cosine kernel rescaled to [0, 1],
K_ij = (x̂_i·x̂_j + 1) / 2, gives conditional probabilities P_ij = K_ij / Σ_k K_ik (the diagonal
included, as in the authors' code). The loss is the KL divergence of the student rows from the teacher
rows with ε added inside the logarithm, averaged over all B² entries (the authors' `mean`, so it is
(1/B) × the row-averaged KL):

    L = (1/B²) Σ_ij P^t_ij · log((P^t_ij + ε) / (P^s_ij + ε)),  ε = 1e-7.

Only B×B matrices are compared, so the feature widths may differ. The loss is 0 when the two sides'
kernels agree, and (for ε = 0) invariant to rescaling any sample's feature by a positive factor.
"""

from __future__ import annotations

import torch

from gendd_framework.errors import ConfigError


def cosine_probabilities(features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(B, ...) -> (B, B) row-stochastic matrix from the [0, 1]-rescaled cosine kernel."""
    flat = features.flatten(1)
    norm = flat.norm(p=2, dim=1, keepdim=True)
    # A zero row stays zero (the official code zeroes the 0/0 NaNs) without a NaN in the backward pass.
    unit = flat / torch.where(norm > 0, norm + eps, torch.ones_like(norm))
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Mean over the B² entries of P^t·log((P^t + ε)/(P^s + ε)) (see the module docstring)."""
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise ConfigError(
            f"PKT needs (B, ...) features with the same batch size, got student {tuple(student.shape)} "
            f"and teacher {tuple(teacher.shape)}"
        )
    if eps < 0:
        raise ConfigError(f"pkt eps must be >= 0, got {eps}")
    p_s = cosine_probabilities(student, eps)
    p_t = cosine_probabilities(teacher, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()
