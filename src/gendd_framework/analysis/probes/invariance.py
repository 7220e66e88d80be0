"""Invariance transfer: is the student as consistent as the teacher under small input transformations?

Per transformation T, each model's consistency is the share of images with argmax f(x) = argmax f(T(x));
`relative` = student consistency / teacher consistency, and `student_given_teacher` the student's
consistency on the images where the teacher is consistent (the invariances the teacher has). The
transformations act on the input the model sees (after normalisation): shifts by whole pixels with the
edge replicated; contrast x' = m + c·(x − m) about each image's per-channel mean m (the same as in
pixel space, since normalisation is affine per channel); brightness x' = x + b·std(inputs); saturation
x' = g + s·(x − g) about the channel mean g (images with at least 3 channels).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gendd_framework.analysis.probes.common import ProbeData, ProbeResult, percent, predict, require_images
from gendd_framework.analysis.probes.settings import InvarianceSettings

Transform = Callable[[torch.Tensor], torch.Tensor]
KEYS = ("teacher", "student", "relative", "student_given_teacher")


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Move the content by (dy, dx) pixels (down/right positive), filling with the replicated edge."""
    h, w = x.shape[-2:]
    pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))  # left, right, top, bottom
    padded = F.pad(x, pad, mode="replicate")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w]


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return mean + factor * (x - mean)


def brightness(x: torch.Tensor, offset: float) -> torch.Tensor:
    return x + offset


def saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    grey = x.mean(dim=1, keepdim=True)
    return grey + factor * (x - grey)


def transforms(s: InvarianceSettings, channels: int, input_std: float) -> dict[str, tuple[str, Transform]]:
    """name -> (family, transform) for the configured strengths."""
    out: dict[str, tuple[str, Transform]] = {}
    for p in s.shift:
        for name, (dy, dx) in {
            f"shift_x+{p}": (0, p), f"shift_x-{p}": (0, -p), f"shift_y+{p}": (p, 0), f"shift_y-{p}": (-p, 0)
        }.items():  # fmt: skip
            out[name] = ("shift", lambda x, dy=dy, dx=dx: shift(x, dy, dx))
    for c in s.contrast:
        out[f"contrast_{c:g}"] = ("contrast", lambda x, c=c: contrast(x, c))
    for b in s.brightness:
        out[f"brightness_{b:+g}"] = ("brightness", lambda x, b=b: brightness(x, b * input_std))
    if channels >= 3:
        for v in s.saturation:
            out[f"saturation_{v:g}"] = ("saturation", lambda x, v=v: saturation(x, v))
    return out


def consistency(teacher: nn.Module, student: nn.Module, data: ProbeData, transform: Transform) -> dict:
    """Both models' consistency under one transform, in %."""
    t = predict(teacher, data.inputs, data.batch_size, transform).argmax(1) == data.teacher_pred
    s = predict(student, data.inputs, data.batch_size, transform).argmax(1) == data.student_pred
    teacher_pc, student_pc = percent(t), percent(s)
    return {
        "teacher": teacher_pc,
        "student": student_pc,
        "relative": student_pc / teacher_pc if teacher_pc > 0 else float("nan"),
        "student_given_teacher": percent(s[t]),
    }


def probe_invariance(
    teacher: nn.Module, student: nn.Module, data: ProbeData, s: InvarianceSettings
) -> ProbeResult:
    require_images(data.inputs, "invariance")
    table = transforms(s, data.inputs.shape[1], data.input_std)
    per = {name: consistency(teacher, student, data, fn) for name, (_, fn) in table.items()}
    metrics: dict[str, float] = {}
    families = list(dict.fromkeys(fam for fam, _ in table.values()))
    groups = {
        "": list(per),
        **{f"{fam}/": [n for n, (f, _) in table.items() if f == fam] for fam in families},
    }
    for prefix, names in groups.items():
        mean = {
            k: float(torch.tensor([per[n][k] for n in names], dtype=torch.float64).nanmean()) for k in KEYS
        }
        mean["relative"] = mean["student"] / mean["teacher"] if mean["teacher"] > 0 else float("nan")
        metrics.update({f"invariance/{prefix}{k}": mean[k] for k in KEYS})
    return ProbeResult(metrics, {"per_transform": per})
