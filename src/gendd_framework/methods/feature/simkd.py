"""SimKD: the student predicts through the teacher's classifier; only the last feature map is distilled.

A projector (1x1 conv -> 3x3 conv -> 1x1 conv, each with BN and ReLU, no biases, width C_t/factor)
maps the student's last map (pooled to the teacher's size when larger) to the teacher's channels; the
loss is the MSE between the projected map and the teacher's map (`losses/simkd.py`). The prediction
is student backbone -> projector -> global average pool -> the teacher's frozen classifier, so the
deployed student is a different network from the plain student: `export()` is that predictor (student,
projector and a frozen copy of the teacher's classifier), and it is what `student.pt`,
`teacher=from_run` and `gendd-eval export=true` use. The student's own classifier is unused and frozen.
Maths and choices: docs/self_distillation.md.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gendd_framework.context import StepContext
from gendd_framework.errors import ConfigError
from gendd_framework.losses.simkd import align_maps, pooled_size, reused_classifier_logits, simkd_loss
from gendd_framework.methods.base import Method, freeze, missing_teacher
from gendd_framework.methods.feature.layers import LayerSpec, resolve_layers
from gendd_framework.models.tap import FeatureTap, find_classifier
from gendd_framework.registry import METHODS


class SimKDProjector(nn.Sequential):
    """C_s -> C_t/f (1x1) -> C_t/f (3x3, padding 1) -> C_t (1x1), each conv bias-free + BN + ReLU."""

    def __init__(self, c_s: int, c_t: int, factor: int = 2) -> None:
        mid = c_t // factor
        super().__init__(
            nn.Conv2d(c_s, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, c_t, 1, bias=False),
            nn.BatchNorm2d(c_t),
            nn.ReLU(inplace=True),
        )


class ReusedClassifierPredictor(nn.Module):
    """Student -> (its `tap` map, pooled to `size` when set) -> projector -> pool -> classifier."""

    def __init__(
        self, student: FeatureTap, tap: str, projector: nn.Module, classifier: nn.Linear, size: tuple | None
    ) -> None:
        super().__init__()
        self.student, self.projector, self.classifier = student, projector, classifier
        self.tap, self.size = tap, size

    def project(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.student(x)[self.tap]
        if self.size is not None:
            fmap = nn.functional.adaptive_avg_pool2d(fmap, self.size)
        return self.projector(fmap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reused_classifier_logits(self.project(x), self.classifier.weight, self.classifier.bias)


def _one_map(model: nn.Module, spec: LayerSpec, input_shape, key: str) -> str:
    layers = resolve_layers(model, spec, input_shape, key, auto=[-1])  # the last map before pooling
    if len(layers) != 1:
        raise ConfigError(f"simkd reads one map per side, but `{key}` selects {layers}")
    return layers[0]


@METHODS.register("simkd")
class SimKD(Method):
    """MSE(projector(last student map), last teacher map); prediction through the teacher's classifier."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        input_shape: tuple[int, ...] | None = None,
        factor: int = 2,
        student_layers: LayerSpec = "auto",
        teacher_layers: LayerSpec = "auto",
    ) -> None:
        if teacher is None:
            raise ConfigError(missing_teacher("method SimKD"))
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ConfigError(f"simkd factor must be an integer >= 1, got {factor!r}")
        s_tap = _one_map(student, student_layers, input_shape, "student_layers")
        t_tap = _one_map(teacher, teacher_layers, input_shape, "teacher_layers")
        super().__init__(
            student, teacher, student_taps=[s_tap], teacher_taps=[t_tap], input_shape=input_shape
        )
        shapes = self.tap_shapes()
        s_shape, t_shape = tuple(shapes["student"][s_tap]), tuple(shapes["teacher"][t_tap])
        if len(s_shape) != 3 or len(t_shape) != 3:
            raise ConfigError(
                f"simkd needs (C, H, W) maps: `student_layers` {s_tap} gives {s_shape}, `teacher_layers` "
                f"{t_tap} gives {t_shape}"
            )
        head = self.teacher.classifier
        if head.in_features != t_shape[0]:
            raise ConfigError(
                f"simkd predicts through the teacher's classifier, which reads {head.in_features} features, "
                f"but `teacher_layers` {t_tap} has {t_shape[0]} channels: pick the map its pooling feeds"
            )
        if t_shape[0] // factor < 1:
            raise ConfigError(f"simkd factor {factor} leaves no channels of the teacher's {t_shape[0]}")
        try:
            size = pooled_size(s_shape[1:], t_shape[1:])
        except ValueError as exc:
            raise ConfigError(f"simkd cannot align the maps: {exc}") from None
        self.s_tap, self.t_tap, self.size = s_tap, t_tap, size
        self.projector = SimKDProjector(s_shape[0], t_shape[0], factor)
        self.teacher_classifier = freeze(copy.deepcopy(head))  # part of the exported predictor
        find_classifier(student).requires_grad_(False)  # the student's own head is never used

    def predictor(self) -> ReusedClassifierPredictor:
        return ReusedClassifierPredictor(
            self.student, self.s_tap, self.projector, self.teacher_classifier, self.size
        )

    def train(self, mode: bool = True) -> SimKD:
        super().train(mode)
        self.teacher_classifier.eval()
        return self

    def training_step(self, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        x = batch["input"]
        target = self.teacher_outputs(x, batch)[self.t_tap]
        source, target = align_maps(self.student(x)[self.s_tap], target)
        loss = simkd_loss(self.projector(source).float(), target.float())
        return {"loss": loss, "simkd": loss.detach()}

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"student": self.predictor()(x)}

    def export(self) -> nn.Module:
        return self.predictor()
