"""Plackett–Luce distillation (Bassam et al. 2025): a teacher-weighted list-wise loss, label first."""

from __future__ import annotations

from gendd_framework.losses.pld import pld_loss
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.logit.kd import check_temperature
from gendd_framework.methods.terms import LossTerm
from gendd_framework.registry import LOSSES, METHODS


@LOSSES.register("pld")
class PLDLoss(LossTerm):
    """Σ_k α_k·(logsumexp_{m≥k} z_s[π_m] − z_s[π_k]), π = label then descending teacher logits,
    α = softmax(z_t/τ) in that order (our reading of the paper: see docs/methods.md)."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature, "pld")

    def forward(self, student, teacher, batch, ctx):
        return pld_loss(
            student["logits"].float(),
            teacher["logits"].float(),
            self.targets(batch, teacher),
            self.temperature,
        )


@METHODS.register("pld")
class PLDMethod(ComposedMethod):
    """PLD alone replaces the CE + KD mix (it contains a p_t(y)-weighted CE); `ce_weight` adds plain CE."""

    uses = (
        Use("ce", weight="ce_weight", when="ce_weight"),
        Use("pld", weight="pld_weight", args=("temperature",)),
    )
    defaults = {"pld_weight": 1.0, "ce_weight": 0.0}
