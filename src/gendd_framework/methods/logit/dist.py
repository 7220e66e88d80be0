"""DIST (Huang et al. NeurIPS'22): inter- and intra-class Pearson relations of softened predictions."""

from __future__ import annotations

from gendd_framework.losses.dist import dist_loss
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.logit.kd import check_temperature
from gendd_framework.methods.terms import LossTerm
from gendd_framework.registry import LOSSES, METHODS


@LOSSES.register("dist")
class DISTLoss(LossTerm):
    """τ²·(β·(1 − mean row correlation) + γ·(1 − mean column correlation)); batch-dependent (intra)."""

    def __init__(
        self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 4.0, standardize: bool = False
    ) -> None:
        super().__init__()
        self.beta, self.gamma = float(beta), float(gamma)
        self.temperature = check_temperature(temperature, "dist")
        self.standardize = bool(standardize)

    def forward(self, student, teacher, batch, ctx):
        return dist_loss(
            student["logits"].float(),
            teacher["logits"].float(),
            beta=self.beta,
            gamma=self.gamma,
            temperature=self.temperature,
            standardize=self.standardize,
        )


@METHODS.register("dist")
class DISTMethod(ComposedMethod):
    """CE + kd_weight·DIST; CIFAR-100 defaults (`dist_t4`): τ=4, kd_weight=2, β=γ=1 (ImageNet: τ=1)."""

    uses = (
        Use("ce", weight="ce_weight"),
        Use("dist", weight="kd_weight", args=("beta", "gamma", "temperature", "standardize")),
    )
    defaults = {"ce_weight": 1.0, "kd_weight": 2.0}
