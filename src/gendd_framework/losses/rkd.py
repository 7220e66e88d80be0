"""Relational KD (Park et al., CVPR'19): transfer the geometry of the batch (pairwise distances and
triplet angles) instead of the features themselves.

On flattened features x_1..x_B (student and teacher separately):
- distance: d_ij = sqrt(max(‖x_i − x_j‖², ε)) for i ≠ j, d_ii = 0 (ε = 1e-12 as in the official code),
  divided by the mean of the off-diagonal distances μ = Σ_{i≠j} d_ij / (B(B−1));
  L_D = mean over the B² entries of Huber(d^s/μ_s − d^t/μ_t)  (smooth-L1 with β = 1);
- angle: e_ij = (x_j − x_i) / max(‖x_j − x_i‖, 1e-12) (zero for i = j); the cosine of the angle at
  vertex i is a_ijk = e_ij · e_ik; L_A = mean over the B³ entries of Huber(a^s − a^t).

RKD = w_D·L_D + w_A·L_A (CRD/mdistiller: w_D = 25, w_A = 50). Both terms are invariant to translating
and rotating either side's features and to rescaling them (the distances are normalised by their mean,
the angles are scale-free), so the widths may differ. A batch of one sample has no relations: the
distance term is then an exact zero (the official code divides by an empty mean and gives NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gendd_framework.errors import ConfigError


def _check(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise ConfigError(
            f"RKD needs (B, ...) features with the same batch size, got student {tuple(student.shape)} "
            f"and teacher {tuple(teacher.shape)}"
        )


def pairwise_distances(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, ...) -> (B, B) Euclidean distances, squared distances floored at `eps`, zero diagonal.

    Computed as ‖x_i‖² + ‖x_j‖² − 2 x_i·x_j on batch-centred features: the distances are unchanged
    and centring removes most of the cancellation of that expansion in low precision."""
    flat = features.flatten(1)
    flat = flat - flat.mean(dim=0, keepdim=True)
    sq = flat.pow(2).sum(dim=1)
    dist = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * flat @ flat.t()).clamp(min=eps).sqrt()
    off_diagonal = ~torch.eye(flat.shape[0], dtype=torch.bool, device=flat.device)
    return dist * off_diagonal


def _normalised_distances(features: torch.Tensor, eps: float) -> torch.Tensor:
    dist = pairwise_distances(features, eps)
    batch = dist.shape[0]
    return dist / (dist.sum() / (batch * (batch - 1)))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L_D: smooth-L1 between the mean-normalised distance matrices (mean over B² entries)."""
    _check(student, teacher)
    if student.shape[0] < 2:
        return student.sum() * 0.0
    return F.smooth_l1_loss(_normalised_distances(student, eps), _normalised_distances(teacher, eps))


def triplet_cosines(features: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, B, B): a_ijk = cosine of the angle at x_i between x_j and x_k (0 if j or k is i)."""
    flat = features.flatten(1)
    edges = F.normalize(flat.unsqueeze(0) - flat.unsqueeze(1), p=2.0, dim=2)  # edges[i, j] ∝ x_j − x_i
    return edges @ edges.transpose(1, 2)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L_A: smooth-L1 between the triplet-angle cosines (mean over B³ entries)."""
    _check(student, teacher)
    return F.smooth_l1_loss(triplet_cosines(student), triplet_cosines(teacher))


def rkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    distance_weight: float,
    angle_weight: float,
    eps: float = 1e-12,
) -> dict[str, torch.Tensor]:
    """dict(loss = w_D·L_D + w_A·L_A, distance = L_D, angle = L_A) (the `rkd` term); a part with weight
    0 is neither computed (the angle term costs B²·D memory) nor returned."""
    _check(student, teacher)
    parts = {}
    loss = student.new_zeros(())
    if distance_weight:
        parts["distance"] = rkd_distance_loss(student, teacher, eps)
        loss = loss + distance_weight * parts["distance"]
    if angle_weight:
        parts["angle"] = rkd_angle_loss(student, teacher)
        loss = loss + angle_weight * parts["angle"]
    return {"loss": loss, **parts}
