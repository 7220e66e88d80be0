"""Hinton KD (optionally with logit standardisation) and the CE baseline."""

from __future__ import annotations

from gendd_framework.errors import ConfigError
from gendd_framework.losses.kd import kd_kl_loss
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.terms import LossTerm
from gendd_framework.registry import LOSSES, METHODS


def check_temperature(temperature: float, term: str) -> float:
    if not temperature > 0:
        raise ConfigError(f"{term} temperature must be > 0, got {temperature}")
    return float(temperature)


@LOSSES.register("kd_kl", aliases=["kd"])
class KDDivergence(LossTerm):
    """τ²·KL(p_t^τ ‖ p_s^τ); `standardize` z-scores both logit vectors first (Sun et al. CVPR'24)."""

    def __init__(self, temperature: float = 4.0, standardize: bool = False) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature, "kd_kl")
        self.standardize = bool(standardize)

    def forward(self, student, teacher, batch, ctx):
        return kd_kl_loss(
            student["logits"].float(),
            teacher["logits"].float(),
            self.temperature,
            standardize=self.standardize,
        )


@METHODS.register("ce", aliases=["vanilla"])
class CEMethod(ComposedMethod):
    """The student alone, trained with cross-entropy (the teacher, if given, is ignored)."""

    uses = (Use("ce", args=("label_smoothing",)),)


@METHODS.register("kd", aliases=["hinton"])
class KDMethod(ComposedMethod):
    """Hinton KD: α·CE + β·τ²·KL(p_t^τ ‖ p_s^τ) (mdistiller defaults α=0.1, β=0.9, τ=4);
    `standardize: true` is logit-standardised KD (published: τ=2, β=9, α=0.1; method=kd_ls)."""

    uses = (Use("ce", weight="alpha"), Use("kd_kl", weight="beta", args=("temperature", "standardize")))
    defaults = {"alpha": 0.1, "beta": 0.9}
