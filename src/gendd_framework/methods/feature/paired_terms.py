"""Base of the parameter-free feature terms (AT, SP, PKT, RKD): a pure loss summed over layer pairs.

Each term reads `student_layers` / `teacher_layers` (`auto`, stage indices, module paths or `feature`),
resolved in `bind`. When either side is `auto` the two lists are paired by depth (the deepest
`min(len)` of each), so a teacher with more stages than the student works; two explicit lists must
have the same length. The loss runs in float32 or float64 outside autocast: Gram matrices of wide
maps overflow float16.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.methods.compose import Use
from gendd_framework.methods.feature.layers import LayerSpec, pair_layers, resolve_layers
from gendd_framework.methods.terms import LossTerm, Shapes

FULL = (torch.float32, torch.float64)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32/float64 unchanged (the float64 tests stay float64)."""
    return x if x.dtype in FULL else x.float()


def _is_auto(spec: LayerSpec) -> bool:
    return spec is None or spec == "auto"


class PairedLayerTerm(LossTerm):
    """Sum over paired layers of `pair_loss(student_map, teacher_map)`; logs `pair<i>` when several.

    Subclasses set `term` (its registered name, for errors) and `auto_layers` (which default stages
    `auto` selects: a slice or indices; `None` means the pooled `feature` tap)."""

    term: str = "feature term"
    auto_layers: slice | Sequence[int] | None = None

    def __init__(self, student_layers: LayerSpec = "auto", teacher_layers: LayerSpec = "auto") -> None:
        super().__init__()
        self.student_layers, self.teacher_layers = student_layers, teacher_layers

    def _resolve(self, model: nn.Module, spec: LayerSpec, input_shape: Any, key: str) -> list[str]:
        if _is_auto(spec) and self.auto_layers is None:
            return ["feature"]
        auto = self.auto_layers if self.auto_layers is not None else slice(None)
        return resolve_layers(model, spec, input_shape, key, auto=auto)

    def bind(self, student: nn.Module, teacher: nn.Module | None, facts: Mapping[str, Any]) -> None:
        if teacher is None:
            raise ConfigError(f"loss term '{self.term}' needs a teacher")
        shape = facts.get("input_shape")
        s = self._resolve(student, self.student_layers, shape, "student_layers")
        t = self._resolve(teacher, self.teacher_layers, shape, "teacher_layers")
        if _is_auto(self.student_layers) or _is_auto(self.teacher_layers):
            s, t = pair_layers(s, t, f"loss term '{self.term}'")
        elif len(s) != len(t):
            raise ConfigError(
                f"loss term '{self.term}': `student_layers` {s} and `teacher_layers` {t} must have the "
                "same length (one teacher layer per student layer)"
            )
        self.student_taps, self.teacher_taps = tuple(s), tuple(t)
        self.pairs = list(zip(s, t))

    def setup(self, shapes: Shapes | None) -> None:
        if shapes is not None:
            for s, t in self.pairs:
                self.check_pair(s, shapes["student"][s], t, shapes["teacher"][t])

    def check_pair(self, s_tap: str, s_shape: tuple[int, ...], t_tap: str, t_shape: tuple[int, ...]) -> None:
        """Validate one pair's per-sample shapes (no batch dimension); the relational terms take any."""

    def pair_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        """`{"loss": ..., <part>: ...}` for one pair of (B, ...) tensors."""
        raise NotImplementedError

    def forward(self, student, teacher, batch, ctx):
        device_type = student[self.pairs[0][0]].device.type
        parts: dict[str, torch.Tensor] = {}
        total = None
        with torch.autocast(device_type=device_type, enabled=False):
            for i, (s, t) in enumerate(self.pairs):
                value = self.pair_loss(full_precision(student[s]), full_precision(teacher[t]))
                loss = value["loss"]
                total = loss if total is None else total + loss
                if len(self.pairs) > 1:
                    parts[f"pair{i}"] = loss
                for name, part in value.items():
                    if name != "loss":
                        parts[name] = part if name not in parts else parts[name] + part
        if not parts:
            return total
        return {"loss": total, **parts}

    def extra_repr(self) -> str:
        return ", ".join(f"{s} <- {t}" for s, t in getattr(self, "pairs", []))


def with_ce_and_kd(feature: Use) -> tuple[Use, ...]:
    """CE, KD (only while `kd_weight` > 0) and the feature term: the RepDistiller protocol (`-r` CE, `-a`
    KD, `-b` the feature term) with KD off by default (`CE_KD_DEFAULTS`), as in the published
    feature-method baselines."""
    kd = Use("kd_kl", weight="kd_weight", when="kd_weight", args=("temperature",))
    return (Use("ce", weight="ce_weight"), kd, feature)


CE_KD_DEFAULTS = {"ce_weight": 1.0, "kd_weight": 0.0}
