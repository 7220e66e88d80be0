"""Shift behaviour: does the student keep agreeing with the teacher when the inputs are corrupted?

Two corruptions at stated strengths, applied to the input the model sees: additive Gaussian noise of
std `level`·std(inputs) (seeded per level) and Gaussian blur of sigma `level` pixels (kernel radius
round(3·sigma), reflected borders). Per level: agreement of student and teacher on the corrupted
images, and each model's accuracy; strength 0 is the clean input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision.transforms.functional as TF
from torch import nn

from gendd_framework.analysis.probes.common import ProbeData, ProbeResult, percent, predict, require_images
from gendd_framework.analysis.probes.settings import CorruptionSettings
from gendd_framework.errors import ConfigError


def blur_radius(sigma: float) -> int:
    return int(3.0 * sigma + 0.5)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) images (torchvision's, reflect padding); 0 = identity."""
    radius = blur_radius(sigma)
    if sigma == 0 or radius == 0:
        return x
    if radius >= min(x.shape[-2:]):
        raise ConfigError(
            f"probe setting 'corruption.blur' = {sigma}: kernel radius {radius} does not fit "
            f"{tuple(x.shape[-2:])} images (need sigma < {min(x.shape[-2:]) / 3:.2f})"
        )
    return TF.gaussian_blur(x, [2 * radius + 1] * 2, [float(sigma)] * 2)


def noisy(inputs: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """inputs + std·N(0, 1), drawn from a CPU generator seeded per call (same on every device)."""
    if std == 0:
        return inputs
    generator = torch.Generator().manual_seed(seed)
    return inputs + std * torch.randn(inputs.shape, generator=generator, dtype=inputs.dtype)


def agreement_at(
    teacher: nn.Module, student: nn.Module, data: ProbeData, corrupted: torch.Tensor | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:  # fmt: skip
    inputs = data.inputs if corrupted is None else corrupted
    t = predict(teacher, inputs, data.batch_size, transform).argmax(1)
    s = predict(student, inputs, data.batch_size, transform).argmax(1)
    return {
        "agree": percent(s == t),
        "student_acc": percent(s == data.targets),
        "teacher_acc": percent(t == data.targets),
    }


def probe_corruption(
    teacher: nn.Module, student: nn.Module, data: ProbeData, s: CorruptionSettings, seed: int = 0
) -> ProbeResult:
    require_images(data.inputs, "corruption")
    metrics = {"corruption/clean_agree": percent(data.student_pred == data.teacher_pred)}
    levels: dict[str, dict[str, float]] = {}
    for i, std in enumerate(s.noise):
        corrupted = noisy(data.inputs, std * data.input_std, seed + i)
        levels[f"noise_{std:g}"] = agreement_at(teacher, student, data, corrupted)
    for sigma in s.blur:
        gaussian_blur(data.inputs[:1], sigma)  # a kernel that cannot fit fails before any prediction
        levels[f"blur_{sigma:g}"] = agreement_at(
            teacher, student, data, transform=lambda x, v=sigma: gaussian_blur(x, v)
        )
    for name, values in levels.items():
        metrics.update({f"corruption/{name}/{k}": v for k, v in values.items()})
    for kind in ("noise", "blur"):
        agrees = [v["agree"] for n, v in levels.items() if n.startswith(f"{kind}_")]
        if agrees:
            metrics[f"corruption/{kind}/agree"] = sum(agrees) / len(agrees)
    return ProbeResult(metrics, {"noise_std_units": "input std", "blur_sigma_units": "pixels"})
