"""SimKD (Chen et al., CVPR'22): reuse the teacher's classifier; distil only the last feature map.

The student's last map goes through a projector to the teacher's channel count and is matched to the
teacher's last map by mean squared error, the only loss. Prediction pools the projected map and applies
the teacher's frozen classifier. Maps of different resolution are aligned first by adaptive average
pooling of the larger one to the smaller one's size (the student's when it is larger, else the
teacher's), as the authors' code does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def pooled_size(student_hw: Sequence[int], teacher_hw: Sequence[int]) -> tuple[int, int] | None:
    """The size the student's map is pooled to before the projector (the teacher's, when the student's
    map is larger), or None when the student's map is used as is (equal size, or smaller: then the
    teacher's map is pooled to the student's for the loss). Mixed shapes (taller but narrower) have
    no such order and raise ValueError."""
    (s_h, s_w), (t_h, t_w) = (int(v) for v in student_hw), (int(v) for v in teacher_hw)
    if (s_h, s_w) == (t_h, t_w) or (s_h <= t_h and s_w <= t_w):
        return None
    if s_h >= t_h and s_w >= t_w:
        return (t_h, t_w)
    raise ValueError(f"student map {s_h}x{s_w} and teacher map {t_h}x{t_w}: neither contains the other")


def align_maps(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) (B, C, H, W) maps at one resolution: the larger one adaptive-average-pooled."""
    size = pooled_size(student.shape[2:], teacher.shape[2:])
    if size is not None:
        return F.adaptive_avg_pool2d(student, size), teacher
    if student.shape[2:] != teacher.shape[2:]:
        return student, F.adaptive_avg_pool2d(teacher, tuple(student.shape[2:]))
    return student, teacher


def simkd_loss(projected: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element between the projected student map and the teacher map."""
    return F.mse_loss(projected, teacher_map.detach())


def reused_classifier_logits(
    projected: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The teacher's linear classifier applied to the globally average-pooled projected map."""
    return F.linear(projected.mean(dim=(2, 3)), weight, bias)
