"""ND (Wang et al. ICCV'23): pull the student's pooled feature along the teacher's class centre of the
label and its projection up to the teacher's feature norm (maths in `losses/nd.py`).

The class centres are the mean teacher pooled features per class over the training split, computed once
by the prepare hook (cached by teacher weights + data) and kept in a buffer, so checkpoints carry them.
When the student's feature size differs from the teacher's, the student feature is mapped for this term
only by BN1d -> Dropout -> Linear (the authors' embedding transform).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.losses.nd import centre_directions, nd_loss
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.terms import LossTerm, require_shapes
from gendd_framework.registry import LOSSES, METHODS

log = logging.getLogger(__name__)


class EmbeddingTransform(nn.Sequential):
    """BN1d(d_s) -> Dropout(p) -> Linear(d_s, d_t), BN at (1, 0) and a zero linear bias."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.5) -> None:
        super().__init__(nn.BatchNorm1d(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, out_dim))
        nn.init.ones_(self[0].weight)
        nn.init.zeros_(self[0].bias)
        nn.init.zeros_(self[2].bias)


def _centres_loaded(module: nn.Module, _incompatible_keys) -> None:
    """A checkpoint restored the centres: training may resume without a statistics pass."""
    module._ready = True


@LOSSES.register("nd")
class NormDirectionLoss(LossTerm):
    """(1/B) Σ 1 − ⟨s, ê_y⟩ / max(‖s‖, ‖t‖) on pooled features; logs `cos` (cosine of s to ê_y) and
    `norm_ratio` (‖s‖/‖t‖) as parts."""

    student_taps = teacher_taps = ("feature",)

    def __init__(self, dropout: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"nd dropout must be in [0, 1), got {dropout}")
        if not eps > 0:
            raise ConfigError(f"nd eps must be > 0, got {eps}")
        self.dropout, self.eps = float(dropout), float(eps)
        self.projector: nn.Module | None = None
        self._ready = False

    def setup(self, shapes) -> None:
        shapes = require_shapes(shapes, "nd")
        s, t = tuple(shapes["student"]["feature"]), tuple(shapes["teacher"]["feature"])
        if len(s) != 1 or len(t) != 1:
            raise ConfigError(f"nd needs pooled feature vectors, got student {s} and teacher {t}")
        num_classes = shapes["teacher"]["logits"][0]
        if s != t:
            self.projector = EmbeddingTransform(s[0], t[0], self.dropout)
        # saved with the method, so evaluation and resume need no statistics pass
        self.register_buffer("class_centres", torch.zeros(num_classes, t[0]))
        self.register_load_state_dict_post_hook(_centres_loaded)

    def prepare(self, stats) -> None:
        if not hasattr(self, "class_centres"):
            raise ConfigError("nd sizes its class centres from tap shapes: build the method with input_shape")
        means = stats.class_means("feature")
        if tuple(means.shape) != tuple(self.class_centres.shape):
            raise ConfigError(
                f"nd class centres: the teacher statistics give {tuple(means.shape)}, the models "
                f"{tuple(self.class_centres.shape)} (classes x teacher feature dim)"
            )
        empty = torch.isnan(means).any(dim=1)
        if empty.any():  # a class without training images: its centre has no direction (the term is 1)
            log.warning(
                "nd: classes %s have no training images; their centres are set to zero",
                empty.nonzero().flatten().tolist(),
            )
            means = torch.where(empty[:, None], torch.zeros_like(means), means)
        self.class_centres.copy_(means.to(self.class_centres))
        self._ready = True

    def forward(self, student, teacher, batch, ctx):
        if not self._ready:
            raise ConfigError(
                "nd needs the teacher's class centres: call method.prepare(stats) before training"
            )
        s = student["feature"].flatten(1)
        if self.projector is not None:
            s = self.projector(s)
        s, t = s.float(), teacher["feature"].flatten(1).float()
        labels = self.targets(batch, teacher)
        loss = nd_loss(s, t, self.class_centres.float(), labels, self.eps)
        with torch.no_grad():
            cos = (
                nn.functional.normalize(s, dim=1, eps=self.eps)
                * centre_directions(self.class_centres, self.eps)[labels]
            ).sum(1)
            ratio = s.norm(dim=1) / t.norm(dim=1).clamp_min(self.eps)
        return {"loss": loss, "cos": cos.mean(), "norm_ratio": ratio.mean()}


@METHODS.register("nd")
class NDMethod(ComposedMethod):
    """KD++: CE + w_kd·min(1, epoch/warmup)·τ²·KL + w_nd·ND (CIFAR-100 R32x4→R8x4: 3.5, 2.0, τ=4, 20)."""

    uses = (
        Use("ce", weight="ce_weight"),
        Use(
            "kd_kl",
            weight="kd_weight",
            args=("temperature",),
            schedule={"name": "linear_warmup", "epochs": "warmup_epochs"},
        ),
        Use("nd", weight="nd_weight", args=("dropout", "eps")),
    )
    defaults = {"ce_weight": 1.0, "kd_weight": 3.5, "warmup_epochs": 20.0, "nd_weight": 2.0}
