"""Localization agreement: does the student look where the teacher looks?

Grad-CAM maps of teacher and student for the same class (the teacher's prediction by default) are
compared per image: IoU of their top-k% pixels, Spearman rank correlation and cosine similarity, each
averaged over the images whose maps are not constant (a constant map has no top set or ranking). Given
a control student (e.g. the CE run), the win rate of Ojha et al. is the share of images where
cos(CAM_teacher, CAM_student) > cos(CAM_teacher, CAM_control), ties counted half (50% = chance).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gendd_framework.analysis.probes.common import ProbeData, ProbeResult
from gendd_framework.analysis.probes.gradcam import cam_layer, grad_cam
from gendd_framework.analysis.probes.settings import LocalizationSettings

PICTURE_IMAGES = 8  # maps kept for the picture


def topk_mask(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """(N, P) boolean mask of each row's ceil(fraction * P) largest values; ties go to the lower
    index (a stable sort), so the mask is deterministic."""
    flat = maps.reshape(len(maps), -1)
    k = max(1, math.ceil(fraction * flat.shape[1]))
    order = torch.sort(-flat, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)


def topk_iou(a: torch.Tensor, b: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per row: |top(a) ∩ top(b)| / |top(a) ∪ top(b)|."""
    ma, mb = topk_mask(a, fraction), topk_mask(b, fraction)
    return (ma & mb).sum(1).double() / (ma | mb).sum(1).double()


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Per row, 1-based ranks with ties given their average rank (as Spearman's rho needs)."""
    flat = x.reshape(len(x), -1).double().contiguous()
    ordered = flat.sort(dim=1).values
    below = torch.searchsorted(ordered, flat, right=False).double()
    upto = torch.searchsorted(ordered, flat, right=True).double()
    return (below + upto + 1.0) / 2.0


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: Spearman's rank correlation of two maps (NaN where a map is constant)."""
    return pearson(average_ranks(a), average_ranks(b))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double(), dim=1)


def win_rate(cam_teacher: torch.Tensor, cam_student: torch.Tensor, cam_control: torch.Tensor) -> float:
    """% of images where the student's map is closer (cosine) to the teacher's than the control's is."""
    s, c = cosine(cam_teacher, cam_student), cosine(cam_teacher, cam_control)
    score = (s > c).double() + 0.5 * (s == c).double()
    return float(100.0 * score.mean())


def varies(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.reshape(len(maps), -1)
    return flat.max(1).values > flat.min(1).values


def nan_mean(values: torch.Tensor, keep: torch.Tensor) -> float:
    return float(values[keep].mean()) if bool(keep.any()) else float("nan")


def probe_localization(
    teacher: nn.Module,
    student: nn.Module,
    data: ProbeData,
    s: LocalizationSettings,
    control: nn.Module | None = None,
) -> ProbeResult:
    shape = tuple(data.inputs.shape[1:])
    t_layer = cam_layer(teacher, shape, s.stage, s.teacher_layer)
    s_layer = cam_layer(student, shape, s.stage, s.student_layer)
    classes = data.teacher_pred if s.target == "teacher" else data.targets
    cam_t = grad_cam(teacher, t_layer, data.inputs, classes, data.batch_size)
    cam_s = grad_cam(student, s_layer, data.inputs, classes, data.batch_size)
    keep = varies(cam_t) & varies(cam_s)
    k = s.topk
    metrics = {
        f"localization/iou_top{round(100 * k)}": nan_mean(topk_iou(cam_t, cam_s, k), keep),
        "localization/spearman": nan_mean(spearman(cam_t, cam_s), keep),
        "localization/cosine": nan_mean(cosine(cam_t, cam_s), keep),
        "localization/flat_maps": float(100.0 * (~keep).double().mean()),
    }
    details = {
        "teacher_layer": t_layer.describe(),
        "student_layer": s_layer.describe(),
        "images_compared": int(keep.sum()),
        # expected IoU of two independent random top-k sets: k / (2 - k) (for reading the IoU)
        "iou_chance": k / (2 - k),
    }
    if control is not None:
        c_layer = cam_layer(control, shape, s.stage, s.student_layer)
        cam_c = grad_cam(control, c_layer, data.inputs, classes, data.batch_size)
        both = keep & varies(cam_c)
        metrics["localization/win_rate_vs_control"] = (
            win_rate(cam_t[both], cam_s[both], cam_c[both]) if bool(both.any()) else float("nan")
        )
    n = min(PICTURE_IMAGES, len(data.inputs))
    arrays = {"inputs": data.inputs[:n], "cam_teacher": cam_t[:n], "cam_student": cam_s[:n]}
    return ProbeResult(metrics, details, arrays)
