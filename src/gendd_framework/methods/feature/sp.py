"""Similarity-preserving KD (Tung & Mori, ICCV'19): CE + γ·SP on the deepest stage map.

The batch similarity matrices (B×B) are compared, so any student/teacher pair works whatever the
widths and resolutions. The maths (L2 row normalisation, 1/B²) is in `losses/similarity.py`.
"""

from __future__ import annotations

from torch import nn

from gendd_framework.losses.similarity import sp_loss
from gendd_framework.methods.compose import WeightedLossMethod
from gendd_framework.methods.feature.layers import LayerSpec
from gendd_framework.methods.feature.paired_terms import PairedLayerTerm, ce_kd_feature_terms
from gendd_framework.registry import LOSSES, METHODS


@LOSSES.register("sp")
class SimilarityPreserving(PairedLayerTerm):
    """Σ over layer pairs of (1/B²)·‖Ĝ_t − Ĝ_s‖²_F; `auto` reads the deepest default stage."""

    term = "sp"
    auto_layers = (-1,)

    def pair_loss(self, student, teacher):
        return {"loss": sp_loss(student, teacher)}


@METHODS.register("sp")
def sp(
    student: nn.Module,
    teacher: nn.Module | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_samples: int | None = None,
    ce_weight: float = 1.0,
    sp_weight: float = 3000.0,
    student_layers: LayerSpec = "auto",
    teacher_layers: LayerSpec = "auto",
    kd_weight: float = 0.0,
    temperature: float = 4.0,
):
    """CE + γ·SP (CIFAR-100 defaults: γ = 3000 on the deepest stage map, CE 1, KD off)."""
    term = {
        "name": "sp",
        "weight": sp_weight,
        "student_layers": student_layers,
        "teacher_layers": teacher_layers,
    }
    return WeightedLossMethod(
        student,
        teacher,
        ce_kd_feature_terms(ce_weight, kd_weight, temperature, term),
        input_shape=input_shape,
        num_samples=num_samples,
    )
