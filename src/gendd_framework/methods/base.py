"""The method ("distiller") contract every training recipe implements.

A method owns the student, the frozen teacher and any extra trainable parts. The Trainer needs only:
`training_step(batch) -> {"loss": ..., <named terms>...}`, `predict(x) -> {name: logits}`, and
`param_groups(weight_decay)` with the no-decay group made explicit by parameter role, not by name.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gendd_framework.models.tap import FeatureTap

NO_DECAY_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Embedding)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher never changes, not even its BN statistics."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def split_decay(
    modules: Iterable[nn.Module], no_decay_modules: Iterable[nn.Module] = ()
) -> tuple[list, list]:
    """(decay, no_decay) trainable parameters: biases, norm/embedding weights and every parameter of
    `no_decay_modules` skip weight decay; weight matrices and conv kernels get it."""
    excluded = {id(p) for m in no_decay_modules for p in m.parameters()}
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                if id(p) in excluded or isinstance(sub, NO_DECAY_TYPES) or name == "bias" or p.ndim <= 1:
                    no_decay.append(p)
                else:
                    decay.append(p)
    return decay, no_decay


class Method(nn.Module):
    """Base class: wraps student (and teacher) in FeatureTaps; subclasses define the training step."""

    primary_output = "student"  # the `predict` key used for model selection by default

    def __init__(
        self, student: nn.Module, teacher: nn.Module | None = None, taps: Iterable[str] = ("feature",)
    ):
        super().__init__()
        self.student = FeatureTap(student, taps)
        self.teacher = FeatureTap(freeze(teacher), taps) if teacher is not None else None

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.teacher is not None, "this method was built without a teacher"
        return self.teacher(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"student": self.student(x)["logits"]}

    def on_evaluate_start(self) -> None:
        """Called before each evaluation pass (stochastic methods re-seed their samplers here)."""

    def eval_settings(self) -> dict:
        """Settings that determine `predict` (recorded next to every evaluation result)."""
        return {}

    def trainable_modules(self) -> list[nn.Module]:
        """Everything the optimizer updates (the teacher is excluded by construction)."""
        return [m for name, m in self.named_children() if name != "teacher"]

    def no_decay_modules(self) -> list[nn.Module]:
        return []

    def param_groups(self, weight_decay: float) -> list[dict]:
        decay, no_decay = split_decay(self.trainable_modules(), self.no_decay_modules())
        groups = [{"params": decay, "weight_decay": weight_decay, "group": "decay"}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "group": "no_decay"})
        return groups

    @property
    def student_model(self) -> nn.Module:
        return self.student.model
