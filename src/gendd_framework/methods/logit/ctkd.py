"""CTKD: KD with a learnable global temperature trained adversarially through gradient reversal.

loss = ce_weight·CE + kd_weight·T²·KL(p_t^T ‖ p_s^T), with T = t_start + t_end·σ(GRL_λ(r)): r is one raw
scalar parameter of the method, λ follows the cosine curriculum of `losses/ctkd.py` (1-indexed
epochs). The student minimises the loss; r receives the reversed gradient and so maximises it. As in
the authors' code r is in the student's optimizer, with the run's weight decay (a `temperature` param
group; `temperature_weight_decay` sets another). T is computed and used in float32, autocast or not,
and logged every step as `temperature` (the train record holds the epoch's mean). Maths and choices:
docs/self_distillation.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gendd_framework.context import StepContext
from gendd_framework.errors import ConfigError
from gendd_framework.losses.ctkd import cosine_lambda, learned_temperature, scale_gradient
from gendd_framework.losses.kd import kd_kl_loss
from gendd_framework.methods.base import Method
from gendd_framework.methods.terms import labelled_cross_entropy
from gendd_framework.registry import METHODS


@METHODS.register("ctkd", aliases=["curriculum_temperature_kd"])
class CTKD(Method):
    """KD (0.1·CE + 0.9·T²·KL at CIFAR-100 defaults) with T ∈ (t_start, t_start + t_end) learned
    adversarially; λ goes from `lambda_max` (0) to `lambda_min` (−1) over `curriculum_epochs` (10)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        t_start: float = 1.0,
        t_end: float = 20.0,
        init: float = 1.0,
        lambda_max: float = 0.0,
        lambda_min: float = -1.0,
        curriculum_epochs: float = 10.0,
        temperature_weight_decay: float | None = None,
    ) -> None:
        if not (t_start > 0 and t_end >= 0):
            raise ConfigError(f"ctkd needs t_start > 0 and t_end >= 0, got t_start={t_start}, t_end={t_end}")
        if not (lambda_min <= lambda_max and curriculum_epochs > 0):
            raise ConfigError(
                "ctkd needs lambda_min <= lambda_max and curriculum_epochs > 0, got "
                f"lambda_min={lambda_min}, lambda_max={lambda_max}, curriculum_epochs={curriculum_epochs}"
            )
        if ce_weight < 0 or kd_weight < 0:
            raise ConfigError(f"ctkd weights must be >= 0, got ce_weight={ce_weight}, kd_weight={kd_weight}")
        if temperature_weight_decay is not None and temperature_weight_decay < 0:
            raise ConfigError(
                f"ctkd temperature_weight_decay must be >= 0 or null, got {temperature_weight_decay}"
            )
        super().__init__(student, teacher)
        self.raw_temperature = nn.Parameter(torch.tensor(float(init)))  # fp32 whatever the precision
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.lambda_max, self.lambda_min = float(lambda_max), float(lambda_min)
        self.curriculum_epochs = float(curriculum_epochs)
        self.temperature_weight_decay = temperature_weight_decay

    def grl_lambda(self, ctx: StepContext) -> float:
        """λ for the epoch `ctx` is in (the curriculum counts epochs from 1)."""
        return cosine_lambda(ctx.epoch + 1, self.curriculum_epochs, self.lambda_max, self.lambda_min)

    def temperature(self, lam: float = 0.0) -> torch.Tensor:
        """T from the raw parameter, its gradient scaled by `lam` (float32, outside autocast)."""
        return learned_temperature(
            scale_gradient(self.raw_temperature.float(), lam), self.t_start, self.t_end
        )

    def training_step(self, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        x = batch["input"]
        teacher = self.teacher_outputs(x, batch)["logits"]
        student = self.student(x)["logits"]
        lam = self.grl_lambda(ctx)
        with torch.autocast(device_type=student.device.type, enabled=False):
            temperature = self.temperature(lam)
            kd = kd_kl_loss(student.float(), teacher.float(), temperature)
            ce = labelled_cross_entropy(
                student.float(), batch["target"], all_labelled=batch.get("all_labelled")
            )
        return {
            "loss": self.ce_weight * ce + self.kd_weight * kd,
            "ce": ce.detach(),
            "kd": kd.detach(),
            "temperature": temperature.detach(),
            "grl_lambda": temperature.new_full((), lam),
        }

    def custom_param_groups(self) -> list[dict]:
        group: dict[str, Any] = {"params": [self.raw_temperature], "group": "temperature"}
        if self.temperature_weight_decay is not None:
            group["weight_decay"] = float(self.temperature_weight_decay)
        return [group]

    def extra_repr(self) -> str:
        return (
            f"loss = {self.ce_weight:g}*ce + {self.kd_weight:g}*T^2*KL_T, T = {self.t_start:g} + "
            f"{self.t_end:g}*sigmoid(r), lambda {self.lambda_max:g} -> {self.lambda_min:g} over "
            f"{self.curriculum_epochs:g} epochs"
        )
