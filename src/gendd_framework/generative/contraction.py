"""Distribution Contraction and feature mixup: how labels and batch mixing enter GenDD's target.

Contraction (GenDD paper): x0 = (1−λ)·f + λ·c with c = W[y] (hard labels) or y_soft @ W (soft
labels), W the frozen teacher classifier weight (C, D_t). As the paper derives, denoising toward x0 is
gradient-equivalent to the two-task objective (1−λ)·L_KD + λ·L_CLS, without backpropagating through a
sampler.

Mixup draws one m ~ Beta(β, β) per call and one permutation, and mixes the (condition, target)
pairs with the same m. All randomness comes from the passed torch.Generator, so runs are seedable.
"""

from __future__ import annotations

import math

import torch

from gendd_framework.errors import ConfigError


def contract(
    features: torch.Tensor, labels: torch.Tensor | None, class_weights: torch.Tensor, lam: float
) -> torch.Tensor:
    """(1−λ)·features + λ·centres; features (B, D), labels (B,) int or (B, C) float, weights (C, D).

    λ = 0 returns `features` unchanged (labels may then be None: unsupervised GenDD). Call it under
    torch.no_grad() when the target must not carry gradient (the teacher side is frozen anyway).
    """
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"contraction lambda must lie in [0, 1], got {lam}")
    if lam == 0.0:
        return features
    if labels is None:
        raise ConfigError("contraction with lambda > 0 needs labels (hard (B,) or soft (B, C))")
    if class_weights.dim() != 2 or class_weights.shape[1] != features.shape[-1]:
        raise ConfigError(
            f"class weights must be (C, D={features.shape[-1]}) to contract features of shape "
            f"{tuple(features.shape)}, got {tuple(class_weights.shape)}"
        )
    if labels.dim() == 1:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ConfigError(f"hard labels must be integer class indices, got dtype {labels.dtype}")
        centres = class_weights[labels]
    elif labels.dim() == 2:
        if labels.shape[1] != class_weights.shape[0]:
            raise ConfigError(
                f"soft labels have {labels.shape[1]} classes but the classifier has {class_weights.shape[0]}"
            )
        centres = labels.to(class_weights.dtype) @ class_weights
    else:
        raise ConfigError(f"labels must be (B,) or (B, C), got shape {tuple(labels.shape)}")
    centres = centres.to(features.dtype)
    return (1.0 - lam) * features + lam * centres


def sample_gamma(shape_param: float, generator: torch.Generator | None = None) -> float:
    """One Gamma(α, 1) draw (Marsaglia–Tsang squeeze; α<1 via the U^(1/α) boost) from `generator`."""
    if shape_param <= 0:
        raise ConfigError(f"gamma shape must be > 0, got {shape_param}")
    device = generator.device if generator is not None else torch.device("cpu")

    def uniform() -> float:
        return float(torch.rand((), generator=generator, device=device, dtype=torch.float64))

    boost = 1.0
    alpha = shape_param
    if alpha < 1.0:
        boost = max(uniform(), 1e-300) ** (1.0 / alpha)
        alpha += 1.0
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = float(torch.randn((), generator=generator, device=device, dtype=torch.float64))
        v = (1.0 + c * z) ** 3
        if v <= 0.0:
            continue
        if math.log(max(uniform(), 1e-300)) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v * boost


def sample_beta(a: float, b: float, generator: torch.Generator | None = None) -> float:
    """One Beta(a, b) draw as X/(X+Y) with X ~ Gamma(a), Y ~ Gamma(b)."""
    x = sample_gamma(a, generator)
    y = sample_gamma(b, generator)
    if x + y == 0.0:  # both underflowed (tiny shapes): the Beta mass sits at the ends
        return float(torch.rand((), generator=generator).item() < a / (a + b))
    return x / (x + y)


def sample_mixup(
    batch_size: int, beta: float, generator: torch.Generator | None = None, device: torch.device | None = None
) -> tuple[float, torch.Tensor]:
    """(m, perm): m ~ Beta(β, β) and a random permutation of the batch (on `device`)."""
    m = sample_beta(beta, beta, generator)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(batch_size, generator=generator, device=gen_device)
    return m, perm.to(device) if device is not None else perm


def feature_mixup(
    cond: torch.Tensor, target: torch.Tensor, beta: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix (condition, target) pairs: z' = m·z + (1−m)·z[perm], x0' = m·x0 + (1−m)·x0[perm].

    β = 0 disables mixup and returns the inputs unchanged; gradient flows through both terms of z'.
    """
    beta = float(beta)
    if beta < 0:
        raise ConfigError(f"mixup beta must be >= 0, got {beta}")
    if beta == 0.0:
        return cond, target
    if cond.shape[0] != target.shape[0]:
        raise ConfigError(f"mixup needs matching batch sizes, got {cond.shape[0]} and {target.shape[0]}")
    m, perm = sample_mixup(cond.shape[0], beta, generator, device=cond.device)
    return m * cond + (1.0 - m) * cond[perm], m * target + (1.0 - m) * target[perm.to(target.device)]
