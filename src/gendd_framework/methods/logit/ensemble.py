"""MEAL V2-style multi-teacher distillation: soft cross-entropy to the teachers' averaged probabilities,
no hard labels, and an optional discriminator on the final outputs.

The teacher is usually an ensemble (`teacher=digits_ensemble`, `combine: probs`): its logits are the log
of the averaged probabilities, so softmax(teacher logits) is exactly the MEAL V2 soft target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gendd_framework.losses.kd import soft_cross_entropy
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.terms import LossTerm, require_shapes
from gendd_framework.registry import LOSSES, METHODS


@LOSSES.register("soft_ce")
class SoftCrossEntropy(LossTerm):
    """−Σ_c p̄_c·log p_s(c): KL(p̄‖p_s) plus the (constant) entropy of the teacher distribution p̄."""

    def forward(self, student, teacher, batch, ctx):
        return soft_cross_entropy(student["logits"].float(), teacher["logits"].float().softmax(dim=1))


@LOSSES.register("output_discriminator")
class OutputDiscriminator(LossTerm):
    """BCE of a small discriminator telling student logits (label [1,0]) from teacher logits ([0,1]).

    As in MEAL V2, student and discriminator minimise the same loss in one optimizer (no gradient
    reversal): a regulariser. `hidden` defaults to (C/8, C/64) floored at (16, 8) (`[]` = one linear
    layer); `final_relu` keeps the reference's ReLU after the last layer (it clips the discriminator's
    logits at 0). Both halves are centred per row first: an ensemble's output is log-probabilities,
    whose normalisation alone would tell them from student logits.
    """

    def __init__(self, hidden: list[int] | None = None, final_relu: bool = True) -> None:
        super().__init__()
        self.hidden, self.final_relu = hidden, bool(final_relu)

    def setup(self, shapes) -> None:
        num_classes = require_shapes(shapes, "output_discriminator")["student"]["logits"][0]
        default = (max(num_classes // 8, 16), max(num_classes // 64, 8))
        widths = [num_classes, *(default if self.hidden is None else self.hidden), 2]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2 or self.final_relu:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, student, teacher, batch, ctx):
        s, t = student["logits"].float(), teacher["logits"].float()
        s, t = s - s.mean(dim=1, keepdim=True), t - t.mean(dim=1, keepdim=True)
        scores = self.net(torch.cat([s, t]))
        labels = torch.zeros_like(scores)
        labels[: len(s), 0] = 1.0
        labels[len(s) :, 1] = 1.0
        return F.binary_cross_entropy_with_logits(scores, labels)


@METHODS.register("meal_v2")
class MEALV2Method(ComposedMethod):
    """Soft CE to the (ensemble) teacher's probabilities, no label CE, plus the MEAL V2 output
    discriminator (on, as the official training; `discriminator: false` leaves it out)."""

    uses = (
        Use("soft_ce", weight="soft_weight"),
        Use("output_discriminator", weight="discriminator_weight", when="discriminator"),
    )
    defaults = {"soft_weight": 1.0, "discriminator": True, "discriminator_weight": 1.0}
