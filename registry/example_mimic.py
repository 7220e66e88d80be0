"""Example plugin: a custom loss and a custom method, added without touching `src/`.

Every `.py` file in this folder is imported before a run is built, so the names below are usable from
YAML at once (`gendd-list losses logit*`). Copy this file, rename the components, and point a config
at them: see `examples/method/mimic.yaml` and `examples/experiment/mimic_digits.yaml`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gendd_framework.methods.base import Method
from gendd_framework.methods.losses import LossTerm
from gendd_framework.registry import LOSSES, METHODS


@LOSSES.register("logit_mse")
class LogitMSE(LossTerm):
    """Ba & Caruana logit matching: mean squared error between centred student and teacher logits."""

    def forward(self, student: dict, teacher: dict | None, target: torch.Tensor) -> torch.Tensor:
        s = student["logits"] - student["logits"].mean(dim=1, keepdim=True)
        t = teacher["logits"] - teacher["logits"].mean(dim=1, keepdim=True)
        return F.mse_loss(s, t)


@METHODS.register("mimic")
class Mimic(Method):
    """CE + weight·logit_mse, with the mimic weight ramped linearly over the first `ramp_steps` steps."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        num_classes: int = 0,
        weight: float = 1.0,
        ramp_steps: int = 100,
    ) -> None:
        super().__init__(student, teacher, taps=("logits",))
        self.mimic = LogitMSE()
        self.weight, self.ramp_steps = weight, ramp_steps
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def training_step(self, batch):
        x, y = batch
        student_out, teacher_out = self.student(x), self.teacher_outputs(x)
        ramp = torch.clamp(self.steps_done.float() / max(self.ramp_steps, 1), max=1.0)
        self.steps_done += 1
        ce = F.cross_entropy(student_out["logits"], y)
        mimic = self.mimic(student_out, teacher_out, y)
        return {"ce": ce, "logit_mse": mimic, "loss": ce + self.weight * ramp * mimic}
