"""WKD-L (Lv et al. NeurIPS'24): discrete Wasserstein distance between non-target class distributions.

The class cost matrix comes from teacher statistics through the prepare hook (computed once, cached by
teacher weights + data): `cka` = 1 − linear CKA between the classes' teacher features (`cost_tap`:
`feature` = pooled penultimate vector, `logits` = the official ImageNet choice), or `fc` = 1 − cosine of
the teacher classifier rows. The target class is handled by its own term (`wkd_target`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gendd_framework.errors import ConfigError
from gendd_framework.losses.wkd import fc_cosine_cost, linear_cka_cost, wkd_logit_terms
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.logit.kd import check_temperature
from gendd_framework.methods.terms import LossTerm, require_shapes
from gendd_framework.registry import LOSSES, METHODS

COSTS = ("cka", "fc")


@LOSSES.register("wkd_target")
class WKDTarget(LossTerm):
    """−p_t(y)·log p_s(y) at τ=1: the target-class part of WKD-L (teacher detached)."""

    def forward(self, student, teacher, batch, ctx):
        target = self.targets(batch, teacher).unsqueeze(1)
        p_t = teacher["logits"].float().softmax(dim=1).gather(1, target)
        log_p_s = F.log_softmax(student["logits"].float(), dim=1).gather(1, target)
        return -(p_t * log_p_s).mean()


@LOSSES.register("wkd_l")
class WKDLogit(LossTerm):
    """Sinkhorn Wasserstein distance between the non-target softmaxes (τ) under the class cost matrix."""

    def __init__(
        self,
        temperature: float = 8.0,
        reg: float = 0.05,
        iters: int = 10,
        cost: str = "cka",
        cost_tap: str = "feature",
        sharpen: float | None = 1.0,
        max_per_class: int | None = None,
    ) -> None:
        super().__init__()
        if cost not in COSTS:
            raise ConfigError(f"wkd_l cost must be one of {COSTS}, got '{cost}'")
        if reg <= 0 or iters < 1:
            raise ConfigError(f"wkd_l needs reg > 0 and iters >= 1, got reg={reg}, iters={iters}")
        self.temperature = check_temperature(temperature, "wkd_l")
        self.reg, self.iters = float(reg), int(iters)
        self.cost, self.cost_tap, self.sharpen, self.max_per_class = cost, cost_tap, sharpen, max_per_class

    def setup(self, shapes) -> None:
        num_classes = require_shapes(shapes, "wkd_l")["teacher"]["logits"][0]
        # saved with the method, so evaluation and resume need no statistics pass
        self.register_buffer("cost_matrix", torch.zeros(num_classes, num_classes))

    def prepare(self, stats) -> None:
        if self.cost == "fc":
            cost = fc_cosine_cost(stats.teacher_classifier_weight().double())
        else:
            params = {"tap": self.cost_tap, "sharpen": self.sharpen, "max_per_class": self.max_per_class}

            def compute() -> torch.Tensor:
                features = stats.class_features(self.cost_tap, self.max_per_class)
                counts = [len(f) for f in features]
                if min(counts) < 2:  # centred single rows are all zero: CKA would be 0/0
                    raise ConfigError(
                        f"wkd_l's CKA cost needs >= 2 training images per class, class "
                        f"{counts.index(min(counts))} has {min(counts)}; use cost: fc"
                    )
                return linear_cka_cost([f.double() for f in features], sharpen=self.sharpen)

            cost = stats.cached("wkd_cka_cost", params, compute)
        self.cost_matrix.copy_(cost.to(self.cost_matrix))

    def forward(self, student, teacher, batch, ctx):
        _, wasserstein = wkd_logit_terms(
            student["logits"].float(),
            teacher["logits"].float(),
            self.targets(batch, teacher),
            self.cost_matrix,
            temperature=self.temperature,
            reg=self.reg,
            iters=self.iters,
        )
        return wasserstein


@METHODS.register("wkd_l")
class WKDLMethod(ComposedMethod):
    """CE + target term + γ·cosine_decay·W (CIFAR-100 R32x4→R8x4: γ=600, τ=8, λ=0.05, 10 iterations,
    decay from epoch 150)."""

    uses = (
        Use("ce", weight="ce_weight"),
        Use("wkd_target", weight="target_weight"),
        Use(
            "wkd_l",
            weight="wkd_weight",
            args=("temperature", "reg", "iters", "cost", "cost_tap", "sharpen", "max_per_class"),
            schedule={"name": "cosine_decay", "start_epoch": "decay_from_epoch"},
        ),
    )
    defaults = {"ce_weight": 1.0, "target_weight": 1.0, "wkd_weight": 600.0, "decay_from_epoch": 150.0}
