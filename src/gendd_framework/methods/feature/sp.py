"""Similarity-preserving KD (Tung & Mori, ICCV'19): CE + γ·SP on the deepest stage map.

The batch similarity matrices (B×B) are compared, so any student/teacher pair works whatever the
widths and resolutions. The maths (L2 row normalisation, 1/B²) is in `losses/similarity.py`.
"""

from __future__ import annotations

from gendd_framework.losses.similarity import sp_loss
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.feature.paired_terms import CE_KD_DEFAULTS, PairedLayerTerm, with_ce_and_kd
from gendd_framework.registry import LOSSES, METHODS


@LOSSES.register("sp")
class SimilarityPreserving(PairedLayerTerm):
    """Σ over layer pairs of (1/B²)·‖Ĝ_t − Ĝ_s‖²_F; `auto` reads the deepest default stage."""

    term = "sp"
    auto_layers = (-1,)

    def pair_loss(self, student, teacher):
        return {"loss": sp_loss(student, teacher)}


@METHODS.register("sp")
class SPMethod(ComposedMethod):
    """CE + γ·SP (CIFAR-100 defaults: γ = 3000 on the deepest stage map, CE 1, KD off)."""

    uses = with_ce_and_kd(Use("sp", weight="sp_weight", args=("student_layers", "teacher_layers")))
    defaults = {**CE_KD_DEFAULTS, "sp_weight": 3000.0}
