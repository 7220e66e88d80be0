"""Deep mutual learning: K peers trained together, each from the labels and from the others.

No teacher. Peer 1 is the run's `student`; peers 2..K are built from `peer` (the shipped preset sets it
to the run's `student` config, so they share its architecture) with their own initialisation, drawn
from a generator seeded deterministically from the run's seed and the peer's index. Every step all
peers see the same batch and one optimizer updates them together (the paper updates them one after
the other). Maths and choices: docs/self_distillation.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gendd_framework.context import StepContext
from gendd_framework.errors import ConfigError
from gendd_framework.losses.dml import mean_probability_logits, mutual_kl
from gendd_framework.methods.base import Method
from gendd_framework.methods.terms import labelled_cross_entropy
from gendd_framework.models.builder import build_model
from gendd_framework.models.tap import FeatureTap
from gendd_framework.registry import METHODS


def peer_seed(index: int) -> int:
    """The seed of peer `index` (2, 3, ...): a hash of the process's torch seed (the run's `seed`) and
    the index, so peers differ from each other and from the student, and a rerun builds the same."""
    digest = hashlib.sha256(f"dml-peer:{torch.initial_seed()}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def build_peer(spec: Mapping[str, Any], index: int, num_classes: int | None) -> nn.Module:
    """Peer `index` from its model config, initialised under its own seed (the global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(peer_seed(index))
        return build_model(spec, **({"num_classes": num_classes} if num_classes is not None else {}))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa
    )


@METHODS.register("dml", aliases=["mutual_learning"])
class DeepMutualLearning(Method):
    """Σ_k [CE(z_k, y) + kl_weight·1/(K−1)·Σ_{l≠k} KL(sg p_l ‖ p_k)] over K = `num_peers` peers.

    `predict` reports every peer (`student` = peer 1, `peer_2`, ...) and, with `report_mean`, their
    averaged probabilities (`peer_mean`); peer 1 is selected on and exported. A `teacher` given by
    the stage is not used (evaluation still compares with it)."""

    needs_teacher = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        peer: Mapping[str, Any] | None = None,
        num_peers: int = 2,
        kl_weight: float = 1.0,
        report_mean: bool = True,
        num_classes: int | None = None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        if isinstance(num_peers, bool) or not isinstance(num_peers, int) or num_peers < 2:
            raise ConfigError(f"dml num_peers must be an integer >= 2, got {num_peers!r}")
        if kl_weight < 0:
            raise ConfigError(f"dml kl_weight must be >= 0, got {kl_weight}")
        if not isinstance(peer, Mapping) or "name" not in peer:
            raise ConfigError(
                "dml needs `method.peer`: the model config of peers 2..K (the shipped preset sets "
                f"`peer: ${{student}}`, the run's student), got {peer!r}"
            )
        peers = [build_peer(peer, k, num_classes) for k in range(2, num_peers + 1)]
        for k, model in enumerate(peers, start=2):
            if same_weights(model, student):  # identical peers get identical gradients: no mutual learning
                raise ConfigError(
                    f"dml peer {k} starts with the student's weights (a `checkpoint` in the student "
                    "config?): identical peers stay identical; give method.peer other weights"
                )
        super().__init__(student, None, input_shape=input_shape)
        self.peers = nn.ModuleList(FeatureTap(m) for m in peers)
        self.kl_weight, self.report_mean = float(kl_weight), bool(report_mean)
        if input_shape is not None:  # every peer must predict the same classes as the student
            example = torch.zeros(2, *input_shape)
            shapes = {tuple(t.probe(example)["logits"]) for t in (self.student, *self.peers)}
            if len(shapes) != 1:
                raise ConfigError(f"dml peers and student give logits of different shapes {sorted(shapes)}")

    def peer_names(self) -> list[str]:
        return ["student", *(f"peer_{k}" for k in range(2, len(self.peers) + 2))]

    def training_step(self, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        x, target, labelled = batch["input"], batch["target"], batch.get("all_labelled")
        logits = [m(x)["logits"].float() for m in (self.student, *self.peers)]
        mimic = mutual_kl(logits)
        out: dict[str, torch.Tensor] = {}
        total = None
        for name, z, kl in zip(self.peer_names(), logits, mimic):
            ce = labelled_cross_entropy(z, target, all_labelled=labelled)
            prefix = "" if name == "student" else f"{name}/"
            out[f"{prefix}ce"], out[f"{prefix}kl"] = ce.detach(), kl.detach()
            term = ce + self.kl_weight * kl
            total = term if total is None else total + term
        out["loss"] = total
        return out

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = [m(x)["logits"] for m in (self.student, *self.peers)]
        out = dict(zip(self.peer_names(), logits))
        if self.report_mean:
            out["peer_mean"] = mean_probability_logits([z.float() for z in logits])
        return out

    def output_names(self) -> tuple[str, ...]:
        return (*self.peer_names(), *(("peer_mean",) if self.report_mean else ()))

    def extra_repr(self) -> str:
        return f"peers={len(self.peers) + 1}, kl_weight={self.kl_weight}, report_mean={self.report_mean}"
