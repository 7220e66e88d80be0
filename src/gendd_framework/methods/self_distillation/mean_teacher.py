"""Mean teacher: self-distillation from an exponential moving average (EMA) of the student.

No external teacher: the EMA copy of the student is the method's `teacher` (it changes every step, so
`teacher_is_frozen = False` and no teacher-output cache is used). Each step the student sees one
augmentation of a batch (`input`) and the EMA another (`input_1`); the loss is CE on the labelled
samples plus a ramped-up consistency cost between the two predictions on every sample. After each
optimizer update the EMA's parameters move towards the student's (`after_optimizer_step`). The EMA is
the reported and exported model (`primary_output = "ema"`, `export()`). Maths and choices:
docs/self_distillation.md.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gendd_framework.context import StepContext
from gendd_framework.engine import distributed
from gendd_framework.errors import ConfigError
from gendd_framework.losses.mean_teacher import (
    cosine_momentum,
    dino_loss,
    ema_update_,
    sigmoid_rampup,
    softmax_kl,
    softmax_mse,
    updated_center,
    warmup_decay,
)
from gendd_framework.methods.base import Method
from gendd_framework.methods.terms import labelled_cross_entropy
from gendd_framework.registry import METHODS

CONSISTENCY = ("mse", "kl", "dino")
SCHEDULES = ("warmup", "cosine")
BUFFERS = ("own", "ema")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(f"mean_teacher {message}")


@METHODS.register("mean_teacher", aliases=["ema_self_distillation"])
class MeanTeacher(Method):
    """CE(z_s(x₁), y) + w·ramp(e)·cons(z_s(x₁), sg z_ema(x₂)); EMA θ' ← α·θ' + (1 − α)·θ after each update.

    `ema_decay` α with `ema_schedule: warmup` (α_eff = min(1 − 1/(n + 1), α) after n updates, as the
    authors' PyTorch code) or `cosine` (DINO: α from `ema_decay` to 1 over training). `consistency`:
    `mse` (Σ_c (p_s − p_t)²/C), `kl` (KL(p_t ‖ p_s)) or `dino` (the teacher centred by a running mean
    of its logits and sharpened by `teacher_temperature` < `student_temperature`). `buffers: own`
    keeps the EMA in train mode during training (its BatchNorm statistics come from its own forward
    passes, as the authors'); `ema` averages the floating buffers like the parameters instead and
    runs the EMA in eval mode. A `teacher` given by the stage is not used (evaluation still compares
    with it)."""

    needs_teacher = False
    teacher_is_frozen = False
    batch_keys = ("input", "input_1", "target")
    primary_output = "ema"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        num_classes: int | None = None,
        ema_decay: float = 0.99,
        ema_schedule: str = "warmup",
        consistency: str = "mse",
        consistency_weight: float = 100.0,
        rampup_epochs: float = 5.0,
        ce_weight: float = 1.0,
        buffers: str = "own",
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        center_momentum: float = 0.9,
    ) -> None:
        _check(0.0 <= ema_decay < 1.0, f"ema_decay must be in [0, 1), got {ema_decay}")
        _check(ema_schedule in SCHEDULES, f"ema_schedule must be one of {SCHEDULES}, got '{ema_schedule}'")
        _check(consistency in CONSISTENCY, f"consistency must be one of {CONSISTENCY}, got '{consistency}'")
        _check(buffers in BUFFERS, f"buffers must be one of {BUFFERS}, got '{buffers}'")
        _check(
            consistency_weight >= 0 and ce_weight >= 0 and rampup_epochs >= 0,
            "consistency_weight, ce_weight and rampup_epochs must be >= 0, got "
            f"{consistency_weight}, {ce_weight}, {rampup_epochs}",
        )
        _check(
            student_temperature > 0 and teacher_temperature > 0 and 0.0 <= center_momentum < 1.0,
            "needs student_temperature > 0, teacher_temperature > 0 and center_momentum in [0, 1), got "
            f"{student_temperature}, {teacher_temperature}, {center_momentum}",
        )
        ema = copy.deepcopy(student)  # before the student's taps are installed: the copy has no hooks
        super().__init__(student, ema)  # the copy is `self.teacher`: frozen, never optimised
        self.ema_decay, self.ema_schedule = float(ema_decay), ema_schedule
        self.consistency, self.consistency_weight = consistency, float(consistency_weight)
        self.rampup_epochs, self.ce_weight, self.buffers = float(rampup_epochs), float(ce_weight), buffers
        self.student_temperature, self.teacher_temperature = (
            float(student_temperature),
            float(teacher_temperature),
        )
        self.center_momentum = float(center_momentum)
        if consistency == "dino":  # DINO's running centre of the teacher logits (checkpointed)
            classes = num_classes if num_classes is not None else self._num_outputs()
            self.register_buffer("center", torch.zeros(classes))

    def _num_outputs(self) -> int:
        return int(self.student.classifier.out_features)

    def train(self, mode: bool = True) -> MeanTeacher:
        super().train(mode)
        if mode and self.buffers == "own":  # the EMA's BN/dropout behave as in training (upstream)
            self.teacher.train()
        return self

    def training_step(self, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        student = self.student(batch["input"])["logits"].float()
        teacher = self.teacher_outputs(batch["input_1"], batch)["logits"].float()
        ce = labelled_cross_entropy(student, batch["target"], all_labelled=batch.get("all_labelled"))
        if self.consistency == "mse":
            cons = softmax_mse(student, teacher)
        elif self.consistency == "kl":
            cons = softmax_kl(student, teacher)
        else:
            cons = dino_loss(
                student, teacher, self.center, self.student_temperature, self.teacher_temperature
            )
            # after the loss, from every rank's batch (DINO)
            every = distributed.all_gather_cat(teacher)
            self.center.copy_(updated_center(self.center, every, self.center_momentum))
        weight = self.consistency_weight * sigmoid_rampup(ctx.epoch, self.rampup_epochs)
        return {
            "loss": self.ce_weight * ce + weight * cons,
            "ce": ce.detach(),
            "consistency": cons.detach(),
            "weight/consistency": cons.new_full((), weight),
        }

    def decay(self, ctx: StepContext) -> float:
        """The EMA decay used after the update `ctx` describes (ctx.step + 1 updates are done)."""
        if self.ema_schedule == "cosine":
            return cosine_momentum(ctx.step, ctx.total_steps, self.ema_decay)
        return warmup_decay(ctx.step + 1, self.ema_decay)

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        decay = self.decay(ctx)
        ema, online = self.teacher.model, self.student.model
        ema_update_(list(ema.parameters()), list(online.parameters()), decay)
        if self.buffers == "ema":
            pairs = [(a, b) for a, b in zip(ema.buffers(), online.buffers())]
            floats = [(a, b) for a, b in pairs if a.is_floating_point()]
            ema_update_([a for a, _ in floats], [b for _, b in floats], decay)
            for a, b in pairs:
                if not a.is_floating_point():
                    a.copy_(b)

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ema": self.teacher(x)["logits"], "student": self.student(x)["logits"]}

    def export(self) -> nn.Module:
        """The EMA model: the one reported (and selected on validation)."""
        return self.teacher.model

    def extra_repr(self) -> str:
        return (
            f"ema_decay={self.ema_decay} ({self.ema_schedule}), consistency={self.consistency} x "
            f"{self.consistency_weight} (ramp-up {self.rampup_epochs} epochs), buffers={self.buffers}"
        )
