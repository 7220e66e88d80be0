"""The method ("distiller") contract every training recipe implements, built-in or plugin.

A method owns the student, the frozen teacher and any extra trainable parts. The Trainer needs only:
- `training_step(batch, ctx) -> {"loss": ..., <named terms>...}`: `batch` is a mapping
  (`input`, `target`, `index`, ...), `ctx` a StepContext (step, epoch, steps per epoch, total steps);
- `predict(x) -> {name: logits}`: every output is evaluated;
- `param_groups(weight_decay)`: the no-decay group made explicit by parameter role, not by name.
Taps are declared per side and shape-probed once at build (`tap_shapes`), so projectors are sized from
real shapes; `prepare(stats)` may compute teacher statistics once before training (cached).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from gendd_framework.context import StepContext
from gendd_framework.errors import ConfigError
from gendd_framework.models.tap import FeatureTap

NO_DECAY_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Embedding)
TapList = Iterable[str | Mapping[str, Any]]


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
    """Base class: wraps student (and teacher) in FeatureTaps; subclasses define the training step.

    `student_taps`/`teacher_taps` list what each side exposes (`logits`, `feature`, `layer3`,
    `layer3:input`); `teacher_taps=None` reuses the student's list. `input_shape` (one sample, no batch
    dimension) lets `tap_shapes()` run the build-time probe.
    """

    primary_output = "student"  # the `predict` key used for model selection by default

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        student_taps: TapList = ("logits",),
        teacher_taps: TapList | None = None,
        input_shape: tuple[int, ...] | None = None,
    ):
        super().__init__()
        student_taps = list(student_taps)
        self.student = FeatureTap(student, student_taps)
        taps = student_taps if teacher_taps is None else list(teacher_taps)
        self.teacher = FeatureTap(freeze(teacher), taps) if teacher is not None else None
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self._shapes: dict[str, dict[str, tuple[int, ...]]] | None = None
        # how `teacher_outputs` runs the frozen teacher (trainer.speed.teacher_mode) and an optional
        # teacher-output cache (engine/teacher_cache.py); plain attributes, not saved with the weights
        self.teacher_grad_mode = "no_grad"
        self.teacher_cache: Any = None

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # -- build-time probe ---------------------------------------------------------------------------
    def tap_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """`{"student": {tap: shape}, "teacher": {...}}` per sample, from one dry forward (cached)."""
        if self._shapes is None:
            if self.input_shape is None:
                raise ConfigError(
                    f"{type(self).__name__} sizes its parts from tap shapes: build it with input_shape=..."
                )
            example = torch.zeros(2, *self.input_shape, device=self._device())
            self._shapes = {"student": self.student.probe(example)}
            if self.teacher is not None:
                self._shapes["teacher"] = self.teacher.probe(example)
        return self._shapes

    def _device(self) -> torch.device:
        param = next(self.student.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    # -- training ------------------------------------------------------------------------------------
    def teacher_outputs(
        self, x: torch.Tensor, batch: Mapping[str, Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """The frozen teacher's taps for `x`, never tracked by autograd.

        With a teacher-output cache attached (`trainer.teacher_cache`) and the `batch` given, the taps
        of samples seen before (same `index` and augmentation `view`) are read instead of recomputed.
        `teacher_grad_mode="no_grad"` (the default) runs it under `torch.no_grad()`; `"inference"`
        runs it under `torch.inference_mode()` and returns clones: inference tensors may not be saved
        for backward, and terms multiply teacher taps with student tensors (KD's p_t * log p_s); a
        clone is an ordinary tensor without history.
        """
        if self.teacher is None:
            raise ConfigError(f"{type(self).__name__} was built without a teacher")
        cache = self.teacher_cache
        if cache is not None and batch is not None:
            return cache.lookup(batch, lambda: self._teacher_forward(x))
        return self._teacher_forward(x)

    def _teacher_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.teacher_grad_mode == "inference":
            with torch.inference_mode():
                out = self.teacher(x)
            return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        with torch.no_grad():
            return self.teacher(x)

    def prepare(self, stats: Any) -> None:
        """Compute teacher statistics once before training (`stats` is a TeacherStatistics)."""

    def training_step(self, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"student": self.student(x)["logits"]}

    def output_names(self) -> tuple[str, ...]:
        """The keys `predict` returns (validation metrics are `<metric>/<name>`): checked at build."""
        return tuple(dict.fromkeys((self.primary_output, "student")))

    def on_evaluate_start(self) -> None:
        """Called before each evaluation pass (stochastic methods re-seed their samplers here)."""

    def eval_settings(self) -> dict:
        """Settings that determine `predict` (recorded next to every evaluation result)."""
        return {}

    # -- optimisation --------------------------------------------------------------------------------
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
