"""Classic distillation as weighted sums of registered loss terms (`ce`, `kd`, or any `distill` list)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.methods.base import Method
from gendd_framework.registry import LOSSES, METHODS, split_spec


class WeightedLossMethod(Method):
    """loss = Σ weight_i · term_i(student_taps, teacher_taps, labels); each term is logged by its key."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, terms: Sequence[Mapping[str, Any]]):
        if not terms:
            raise ConfigError("a distillation method needs at least one loss term")
        built, weights, keys = [], [], []
        for spec in terms:
            name, kwargs = split_spec(spec, "loss")
            weights.append(float(kwargs.pop("weight", 1.0)))
            keys.append(str(kwargs.pop("key", name)))
            built.append(LOSSES.build({"name": name, **kwargs}))
        if len(set(keys)) != len(keys):
            raise ConfigError(f"loss term keys must be unique, got {keys}; set `key:` on repeated terms")
        needs_teacher = any(getattr(t, "needs_teacher", True) for t in built)
        if needs_teacher and teacher is None:
            raise ConfigError(f"loss terms {keys} need a teacher, but none was given")
        taps = {name for t in built for name in getattr(t, "inputs", ("logits",))}
        super().__init__(student, teacher if needs_teacher else None, taps=sorted(taps))
        self.terms = nn.ModuleList(built)
        self.weights, self.keys = weights, keys

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        student_out = self.student(x)
        teacher_out = self.teacher_outputs(x) if self.teacher is not None else None
        losses = {k: term(student_out, teacher_out, y) for k, term in zip(self.keys, self.terms)}
        losses["loss"] = sum(w * losses[k] for w, k in zip(self.weights, self.keys))
        return losses

    def extra_repr(self) -> str:
        return "loss = " + " + ".join(f"{w:g}*{k}" for w, k in zip(self.weights, self.keys))


@METHODS.register("distill")
def distill(student: nn.Module, losses: list, teacher: nn.Module | None = None, num_classes: int = 0):
    """Any weighted sum of loss terms: `losses: [{name: ce, weight: 0.1}, {name: kd_kl, weight: 0.9}]`."""
    return WeightedLossMethod(student, teacher, losses)


@METHODS.register("ce", aliases=["vanilla"])
def ce(
    student: nn.Module, teacher: nn.Module | None = None, num_classes: int = 0, label_smoothing: float = 0.0
):
    """The student alone, trained with cross-entropy (the teacher, if given, is ignored)."""
    return WeightedLossMethod(student, None, [{"name": "ce", "label_smoothing": label_smoothing}])


@METHODS.register("kd", aliases=["hinton"])
def kd(
    student: nn.Module,
    teacher: nn.Module | None = None,
    num_classes: int = 0,
    alpha: float = 0.1,
    beta: float = 0.9,
    temperature: float = 4.0,
):
    """Hinton KD: α·CE + β·τ²·KL(p_t^τ ‖ p_s^τ) (mdistiller defaults α=0.1, β=0.9, τ=4)."""
    return WeightedLossMethod(
        student,
        teacher,
        [{"name": "ce", "weight": alpha}, {"name": "kd_kl", "weight": beta, "temperature": temperature}],
    )
