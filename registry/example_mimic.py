"""Example plugin: a custom loss and a custom method, added without touching `src/`.

Every `.py` file in this folder is imported before a run is built, so the names below are usable from
YAML at once (`gendd-list losses logit*`). Copy this file, rename the components, and point a config
at them: see `examples/method/mimic.yaml` and `examples/experiment/mimic_digits.yaml`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gendd_framework.context import StepContext
from gendd_framework.methods.base import Method
from gendd_framework.methods.terms import LossTerm, labelled_cross_entropy
from gendd_framework.registry import LOSSES, METHODS


@LOSSES.register("logit_mse")
class LogitMSE(LossTerm):
    """Ba & Caruana logit matching: mean squared error between centred student and teacher logits."""

    def forward(self, student: dict, teacher: dict | None, batch: dict, ctx: StepContext) -> torch.Tensor:
        s = student["logits"] - student["logits"].mean(dim=1, keepdim=True)
        t = teacher["logits"] - teacher["logits"].mean(dim=1, keepdim=True)
        return F.mse_loss(s, t)


@METHODS.register("mimic")
class Mimic(Method):
    """CE + weight·logit_mse, with the mimic weight ramped linearly over the first `ramp_steps` steps
    (read from the step context: nothing to count, and resume continues the ramp exactly)."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module | None = None, weight: float = 1.0, ramp_steps: int = 100
    ) -> None:
        super().__init__(student, teacher, student_taps=("logits",))
        self.mimic = LogitMSE()
        self.weight, self.ramp_steps = weight, ramp_steps

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        teacher_out = self.teacher_outputs(batch["input"])
        student_out = self.student(batch["input"])
        ramp = min(1.0, ctx.step / max(self.ramp_steps, 1))
        ce = labelled_cross_entropy(student_out["logits"], batch["target"])
        mimic = self.mimic(student_out, teacher_out, batch, ctx)
        return {"ce": ce, "logit_mse": mimic, "loss": ce + self.weight * ramp * mimic}
