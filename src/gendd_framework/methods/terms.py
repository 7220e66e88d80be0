"""Loss terms: registered wrappers that pick tensors from the taps and call the pure maths in `losses/`.

A term declares what it reads per side (`student_taps`, `teacher_taps`, or resolved per model in
`bind(student, teacher, facts)`), may size trainable parts from
the build-time probe (`setup(shapes)`) and may compute teacher statistics once (`prepare(stats)`). It is
called as `term(student_out, teacher_out, batch, ctx)` and returns a tensor, or a mapping whose `loss`
is the term's value and whose other entries are logged as parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gendd_framework.context import UNLABELLED, StepContext, distill_targets
from gendd_framework.errors import ConfigError
from gendd_framework.registry import LOSSES

Shapes = Mapping[str, Mapping[str, tuple[int, ...]]]


class LossTerm(nn.Module):
    """Base class of registered loss terms (see the module docstring for the contract)."""

    student_taps: tuple[str, ...] = ("logits",)
    teacher_taps: tuple[str, ...] = ("logits",)
    needs_teacher: bool = True

    def __init__(self) -> None:  # an explicit signature: unknown YAML keys fail with the accepted ones
        super().__init__()

    def bind(self, student: nn.Module, teacher: nn.Module | None, facts: Mapping[str, Any]) -> None:
        """Resolve model-dependent taps (e.g. default feature layers) before the taps are installed:
        set `self.student_taps` / `self.teacher_taps` here. `facts` is the run's `DataFacts`
        (`num_classes`, `input_shape`, `num_samples` for per-sample memories, `sample_keys`,
        `all_labelled`; read as a mapping, None where unknown)."""

    def setup(self, shapes: Shapes | None) -> None:
        """Size trainable parts / validate shapes from the probe (`None` when no input shape is known)."""

    def prepare(self, stats: Any) -> None:
        """Teacher statistics computed once before training (cached by teacher + data)."""

    def forward(
        self, student: dict, teacher: dict | None, batch: Mapping[str, Any], ctx: StepContext
    ) -> torch.Tensor | Mapping[str, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def targets(batch: Mapping[str, Any], teacher: dict | None) -> torch.Tensor:
        """The label, or the teacher's prediction for samples whose label the student may not see."""
        teacher_logits = teacher["logits"] if teacher is not None else None
        return distill_targets(batch["target"], teacher_logits, batch.get("all_labelled"))


def require_shapes(shapes: Shapes | None, term: str) -> Shapes:
    if shapes is None:
        raise ConfigError(
            f"loss term '{term}' sizes its parts from tap shapes: build the method with input_shape"
        )
    return shapes


def labelled_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0, all_labelled: bool | None = None
) -> torch.Tensor:
    """CE averaged over the samples whose label the student may see (target != -1); a batch without any
    gives an exact zero that still has a gradient path. Pass the batch's `all_labelled` flag (set on the
    host by the loop) to avoid reading the targets back from an accelerator."""
    if all_labelled is None:
        all_labelled = not bool((target == UNLABELLED).any())
    if all_labelled:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    total = F.cross_entropy(
        logits, target, ignore_index=UNLABELLED, label_smoothing=label_smoothing, reduction="sum"
    )
    return total / (target != UNLABELLED).sum().clamp_min(1)


@LOSSES.register("ce")
class CrossEntropy(LossTerm):
    """Cross-entropy of the student logits on the labelled samples of the batch (label smoothing opt.)."""

    needs_teacher = False
    teacher_taps = ()

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"ce label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, student, teacher, batch, ctx) -> torch.Tensor:
        return labelled_cross_entropy(
            student["logits"], batch["target"], self.label_smoothing, batch.get("all_labelled")
        )


@LOSSES.register("feature_mse")
class FeatureMSE(LossTerm):
    """Mean squared error between student and teacher pooled features (same dimension required)."""

    student_taps = teacher_taps = ("feature",)

    def setup(self, shapes: Shapes | None) -> None:
        if shapes is None:
            return
        s, t = shapes["student"]["feature"], shapes["teacher"]["feature"]
        if s != t:
            raise ConfigError(
                f"feature_mse needs equal feature shapes, got student {s} and teacher {t}; "
                "use a term with a projector or pick models with equal feature sizes"
            )

    def forward(self, student, teacher, batch, ctx) -> torch.Tensor:
        return F.mse_loss(student["feature"], teacher["feature"])
