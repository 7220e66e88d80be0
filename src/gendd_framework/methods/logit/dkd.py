"""Decoupled KD (Zhao et al. CVPR'22): target-class (TCKD) and non-target-class (NCKD) terms, warmed up."""

from __future__ import annotations

from gendd_framework.losses.dkd import dkd_loss
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.logit.kd import check_temperature
from gendd_framework.methods.terms import LossTerm
from gendd_framework.registry import LOSSES, METHODS


@LOSSES.register("dkd")
class DKDLoss(LossTerm):
    """α·TCKD + β·NCKD at temperature τ (both ×τ²); logs `tckd` and `nckd` as parts."""

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, standardize: bool = False
    ) -> None:
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature = check_temperature(temperature, "dkd")
        self.standardize = bool(standardize)

    def forward(self, student, teacher, batch, ctx):
        return dkd_loss(
            student["logits"].float(),
            teacher["logits"].float(),
            self.targets(batch, teacher),
            alpha=self.alpha,
            beta=self.beta,
            temperature=self.temperature,
            standardize=self.standardize,
        )


@METHODS.register("dkd")
class DKDMethod(ComposedMethod):
    """CE + min(1, epoch/warmup)·(α·TCKD + β·NCKD); CIFAR-100 defaults α=1, β=8, τ=4, 20 warm-up epochs."""

    uses = (
        Use("ce", weight="ce_weight"),
        Use(
            "dkd",
            args=("alpha", "beta", "temperature", "standardize"),
            schedule={"name": "linear_warmup", "epochs": "warmup_epochs"},
        ),
    )
    defaults = {"ce_weight": 1.0, "warmup_epochs": 20.0}
