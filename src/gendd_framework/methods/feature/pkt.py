"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV'18): CE + w·PKT on the pooled feature.

PKT compares B×B conditional-probability matrices from the cosine kernel, so the feature widths may
differ. The maths (ε = 1e-7, mean over B² entries) is in `losses/pkt.py`.
"""

from __future__ import annotations

from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.losses.pkt import pkt_loss
from gendd_framework.methods.compose import WeightedLossMethod
from gendd_framework.methods.feature.layers import LayerSpec
from gendd_framework.methods.feature.paired_terms import PairedLayerTerm, ce_kd_feature_terms
from gendd_framework.registry import LOSSES, METHODS


@LOSSES.register("pkt")
class ProbabilisticTransfer(PairedLayerTerm):
    """Σ over layer pairs of the PKT divergence; `auto` reads the pooled penultimate `feature`."""

    term = "pkt"
    auto_layers = None

    def __init__(
        self, eps: float = 1e-7, student_layers: LayerSpec = "auto", teacher_layers: LayerSpec = "auto"
    ) -> None:
        super().__init__(student_layers, teacher_layers)
        if not float(eps) >= 0:
            raise ConfigError(f"pkt eps must be >= 0, got {eps}")
        self.eps = float(eps)

    def pair_loss(self, student, teacher):
        return {"loss": pkt_loss(student, teacher, self.eps)}


@METHODS.register("pkt")
def pkt(
    student: nn.Module,
    teacher: nn.Module | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_samples: int | None = None,
    ce_weight: float = 1.0,
    pkt_weight: float = 30000.0,
    eps: float = 1e-7,
    student_layers: LayerSpec = "auto",
    teacher_layers: LayerSpec = "auto",
    kd_weight: float = 0.0,
    temperature: float = 4.0,
):
    """CE + w·PKT (CIFAR-100 defaults: w = 30000 on the pooled feature, ε = 1e-7, CE 1, KD off)."""
    term = {
        "name": "pkt",
        "weight": pkt_weight,
        "eps": eps,
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
