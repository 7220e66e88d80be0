"""Projector-ensemble feature distillation (Chen et al. NeurIPS'22): q linear+ReLU projectors on the
student's pooled feature, averaged, aligned in direction with the teacher's pooled feature (1 − cos).

The projectors are sized from the probe (d_s -> d_t), so student and teacher widths may differ; they are
trained with the student and dropped at inference. The maths is in `losses/projector_ensemble.py`.
"""

from __future__ import annotations

from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.losses.projector_ensemble import projector_ensemble_loss
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.terms import LossTerm, require_shapes
from gendd_framework.registry import LOSSES, METHODS


@LOSSES.register("projector_ensemble")
class ProjectorEnsemble(LossTerm):
    """(1/B)·Σ(1 − cos(mean_k ReLU(W_k f_s + b_k), f_t)) on the pooled penultimate features."""

    student_taps = teacher_taps = ("feature",)

    def __init__(self, num_projectors: int = 3, relu: bool = True, eps: float = 1e-12) -> None:
        super().__init__()
        if isinstance(num_projectors, bool) or not isinstance(num_projectors, int) or num_projectors < 1:
            raise ConfigError(
                f"projector_ensemble num_projectors must be an integer >= 1, got {num_projectors!r}"
            )
        if eps <= 0:
            raise ConfigError(f"projector_ensemble eps must be > 0, got {eps}")
        self.num_projectors, self.relu, self.eps = num_projectors, bool(relu), float(eps)
        self.projectors = nn.ModuleList()

    def setup(self, shapes) -> None:
        shapes = require_shapes(shapes, "projector_ensemble")
        s, t = tuple(shapes["student"]["feature"]), tuple(shapes["teacher"]["feature"])
        if len(s) != 1 or len(t) != 1:
            raise ConfigError(
                f"projector_ensemble needs pooled (d,) features, got student feature {s} and teacher {t}"
            )
        # independent default-initialised projectors: their differences are what the ensemble averages out
        self.projectors = nn.ModuleList(nn.Linear(s[0], t[0]) for _ in range(self.num_projectors))

    def forward(self, student, teacher, batch, ctx):
        return projector_ensemble_loss(
            student["feature"],
            teacher["feature"],
            [p.weight for p in self.projectors],
            [p.bias for p in self.projectors],
            relu=self.relu,
            eps=self.eps,
        )


@METHODS.register("projector_ensemble")
class ProjectorEnsembleMethod(ComposedMethod):
    """γ·CE + α·KD(τ) + β·(1 − cos) with 3 linear+ReLU projectors (published CIFAR-100 and ImageNet
    settings: γ=1, α=0 so no KD term, β=25)."""

    uses = (
        Use("ce", weight="ce_weight"),
        Use("projector_ensemble", weight="feature_weight", args=("num_projectors", "relu", "eps")),
        Use("kd_kl", weight="kd_weight", when="kd_weight", args=("temperature",)),
    )
    defaults = {"ce_weight": 1.0, "feature_weight": 25.0, "kd_weight": 0.0}
