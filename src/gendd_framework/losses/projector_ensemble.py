"""Projector-ensemble feature distillation (Chen et al., NeurIPS'22): direction alignment of pooled features.

The student's pooled feature f_s (B, d_s) goes through q independent projectors g_k(f) = ReLU(W_k f + b_k)
to the teacher's width d_t; their mean ḡ(f_s) = (1/q)·Σ_k g_k(f_s) is compared with the teacher's pooled
feature f_t (B, d_t) by direction only:

    L = (1/B) Σ_b (1 − cos(ḡ(f_s)_b, f_{t,b})).

Several differently initialised projectors average out the distortion any single one adds, so the
student itself is pushed towards the teacher's feature directions rather than one projector absorbing
the mismatch. The teacher feature is used as is (no projector), and d_s may differ from d_t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def ensemble_projection(
    feature: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    relu: bool = True,
) -> torch.Tensor:
    """(1/q)·Σ_k act(W_k f + b_k) for features (B, d_s), weights (d_t, d_s), biases (d_t,) or None."""
    if not weights or len(weights) != len(biases):
        raise ValueError(
            f"ensemble_projection needs q >= 1 weights and as many biases, got {len(weights)}, {len(biases)}"
        )
    total = None
    for weight, bias in zip(weights, biases):
        out = F.linear(feature, weight, bias)
        if relu:
            out = F.relu(out)
        total = out if total is None else total + out
    return total / len(weights)


def direction_alignment_loss(
    student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """Batch mean of 1 − cos(student_b, teacher_b) for (B, d) vectors; the teacher is detached.

    Each vector is divided by max(‖v‖, eps), so an all-zero projection (every ReLU off) gives cos = 0
    and a finite loss instead of 0/0. Computed in float32 at least.
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"direction_alignment_loss needs equal (B, d) shapes, got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}"
        )
    work = torch.promote_types(student.dtype, torch.float32)
    s = F.normalize(student.to(work), dim=1, eps=eps)
    t = F.normalize(teacher.detach().to(work), dim=1, eps=eps)
    return (1 - (s * t).sum(dim=1)).mean()


def projector_ensemble_loss(
    student_feature: torch.Tensor,
    teacher_feature: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    relu: bool = True,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Direction alignment between the ensemble mean of the projected student feature and the teacher's."""
    fused = ensemble_projection(student_feature, weights, biases, relu)
    return direction_alignment_loss(fused, teacher_feature, eps)
