"""Loss terms: pure functions plus registered wrappers that read tensors by name from the taps.

A term is called as `term(student_out, teacher_out, target)` where the outputs are FeatureTap dicts;
`inputs` says which tapped names it reads, so a method taps only what its terms need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.registry import LOSSES


def kd_kl_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton KD: τ²·KL(p_t^τ ‖ p_s^τ), summed over classes, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * temperature**2


class LossTerm(nn.Module):
    inputs: tuple[str, ...] = ("logits",)
    needs_teacher: bool = True


@LOSSES.register("ce")
class CrossEntropy(LossTerm):
    """Cross-entropy of the student logits against the labels (optional label smoothing)."""

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, student: dict, teacher: dict | None, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student["logits"], target, label_smoothing=self.label_smoothing)


@LOSSES.register("kd_kl", aliases=["kd"])
class KDDivergence(LossTerm):
    """Hinton's temperature-scaled KL between teacher and student class distributions (× τ²)."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"kd_kl temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student: dict, teacher: dict | None, target: torch.Tensor) -> torch.Tensor:
        return kd_kl_loss(student["logits"].float(), teacher["logits"].float(), self.temperature)


@LOSSES.register("feature_mse")
class FeatureMSE(LossTerm):
    """Mean squared error between student and teacher pooled features (same dimension required)."""

    inputs = ("feature",)

    def forward(self, student: dict, teacher: dict | None, target: torch.Tensor) -> torch.Tensor:
        fs, ft = student["feature"], teacher["feature"]
        if fs.shape != ft.shape:
            raise ConfigError(
                f"feature_mse needs equal feature shapes, got student {tuple(fs.shape)} "
                f"and teacher {tuple(ft.shape)}"
            )
        return F.mse_loss(fs, ft)
