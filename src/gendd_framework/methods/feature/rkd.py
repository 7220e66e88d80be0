"""Relational KD (Park et al., CVPR'19): CE + w·(w_D·distance + w_A·angle) on the pooled feature.

Distances and angles are relations inside the batch, so the feature widths may differ. The maths
(mean-normalised distances, smooth-L1, ε = 1e-12) is in `losses/rkd.py`; the term logs both parts.
"""

from __future__ import annotations

from gendd_framework.errors import ConfigError
from gendd_framework.losses.rkd import rkd_loss
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.feature.layers import LayerSpec
from gendd_framework.methods.feature.paired_terms import CE_KD_DEFAULTS, PairedLayerTerm, with_ce_and_kd
from gendd_framework.registry import LOSSES, METHODS


@LOSSES.register("rkd")
class RelationalKD(PairedLayerTerm):
    """Σ over layer pairs of w_D·L_D + w_A·L_A; logs `distance` and `angle` (unweighted, summed over
    pairs); `auto` reads the pooled penultimate `feature`. A part with weight 0 is not computed."""

    term = "rkd"
    auto_layers = None

    def __init__(
        self,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        eps: float = 1e-12,
        student_layers: LayerSpec = "auto",
        teacher_layers: LayerSpec = "auto",
    ) -> None:
        super().__init__(student_layers, teacher_layers)
        if distance_weight < 0 or angle_weight < 0 or not (distance_weight or angle_weight):
            raise ConfigError(
                f"rkd distance_weight and angle_weight must be >= 0 and not both 0, got {distance_weight} "
                f"and {angle_weight}"
            )
        if not float(eps) > 0:
            raise ConfigError(f"rkd eps must be > 0, got {eps}")
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)
        self.eps = float(eps)

    def pair_loss(self, student, teacher):
        return rkd_loss(student, teacher, self.distance_weight, self.angle_weight, self.eps)


@METHODS.register("rkd")
class RKDMethod(ComposedMethod):
    """CE + w·(w_D·L_D + w_A·L_A) (CIFAR-100 defaults: w = 1, w_D = 25, w_A = 50 on the pooled
    feature, CE 1, KD off)."""

    uses = with_ce_and_kd(
        Use(
            "rkd",
            weight="rkd_weight",
            args=("distance_weight", "angle_weight", "eps", "student_layers", "teacher_layers"),
        )
    )
    defaults = {**CE_KD_DEFAULTS, "rkd_weight": 1.0}
