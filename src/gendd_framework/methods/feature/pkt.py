"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV'18): CE + w·PKT on the pooled feature.

PKT compares B×B conditional-probability matrices from the cosine kernel, so the feature widths may
differ. The maths (ε = 1e-7, mean over B² entries) is in `losses/pkt.py`.
"""

from __future__ import annotations

from gendd_framework.errors import ConfigError
from gendd_framework.losses.pkt import pkt_loss
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.feature.layers import LayerSpec
from gendd_framework.methods.feature.paired_terms import CE_KD_DEFAULTS, PairedLayerTerm, with_ce_and_kd
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
class PKTMethod(ComposedMethod):
    """CE + w·PKT (CIFAR-100 defaults: w = 30000 on the pooled feature, ε = 1e-7, CE 1, KD off)."""

    uses = with_ce_and_kd(Use("pkt", weight="pkt_weight", args=("eps", "student_layers", "teacher_layers")))
    defaults = {**CE_KD_DEFAULTS, "pkt_weight": 30000.0}
