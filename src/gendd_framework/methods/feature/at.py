"""Attention transfer (Zagoruyko & Komodakis, ICLR'17): CE + β·Σ_stages AT(student map, teacher map).

Default layers: every default stage (the end-of-resolution maps without the stem), paired by depth
when the stage counts differ; a pair of different resolutions is matched by adaptive average pooling
of the larger map (as RepDistiller/mdistiller do). Token sequences (B, N, C) of a ViT are read as maps:
the prefix (class/distillation) tokens are dropped and the patch tokens laid out on their square grid.
The maths is in `losses/attention.py`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.losses.attention import AT_MODES, at_loss
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.feature.layers import LayerSpec
from gendd_framework.methods.feature.paired_terms import CE_KD_DEFAULTS, PairedLayerTerm, with_ce_and_kd
from gendd_framework.methods.feature.projectors import match_spatial
from gendd_framework.registry import LOSSES, METHODS


def num_prefix_tokens(model: nn.Module) -> int:
    """Class/distillation/register tokens in front of the patch tokens (timm's `num_prefix_tokens`)."""
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


def token_grid(tokens: int, prefix: int) -> int | None:
    """Side of the square patch grid of `tokens` tokens after `prefix` prefix tokens, else None."""
    side = math.isqrt(max(tokens - prefix, 0))
    return side if side > 0 and side * side == tokens - prefix else None


def as_map(x: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, C, H, W) unchanged; (B, N, C) tokens -> (B, C, s, s) patch grid (prefix tokens dropped)."""
    if x.dim() != 3:
        return x
    side = token_grid(x.shape[1], prefix)
    if side is None:
        raise ConfigError(f"at: {x.shape[1]} tokens after {prefix} prefix tokens do not form a square grid")
    return x[:, prefix:].transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


@LOSSES.register("at")
class AttentionTransfer(PairedLayerTerm):
    """Σ over layer pairs of the AT loss (p-th power channel mean, L2-normalised; `code`/`paper` mode)."""

    term = "at"
    auto_layers = slice(None)

    def __init__(
        self,
        p: float = 2.0,
        mode: str = "code",
        student_layers: LayerSpec = "auto",
        teacher_layers: LayerSpec = "auto",
    ) -> None:
        super().__init__(student_layers, teacher_layers)
        if not float(p) > 0:
            raise ConfigError(f"at p must be > 0, got {p}")
        if mode not in AT_MODES:
            raise ConfigError(f"at mode must be one of {AT_MODES}, got '{mode}'")
        self.p, self.mode = float(p), mode

    def bind(self, student, teacher, facts) -> None:
        super().bind(student, teacher, facts)
        self.prefix = (num_prefix_tokens(student), num_prefix_tokens(teacher))

    def check_pair(self, s_tap, s_shape, t_tap, t_shape) -> None:
        for shape, prefix in ((s_shape, self.prefix[0]), (t_shape, self.prefix[1])):
            if len(shape) == 3 or (len(shape) == 2 and token_grid(shape[0], prefix) is not None):
                continue
            raise ConfigError(
                f"at needs (C, H, W) maps or (tokens, C) sequences on a square patch grid per sample: "
                f"`student_layers` '{s_tap}' gives {tuple(s_shape)} and `teacher_layers` '{t_tap}' gives "
                f"{tuple(t_shape)}; pick convolutional stages or transformer blocks"
            )

    def pair_loss(self, student, teacher):
        student, teacher = as_map(student, self.prefix[0]), as_map(teacher, self.prefix[1])
        if student.dim() != 4 or teacher.dim() != 4:
            raise ConfigError(
                f"at needs (B, C, H, W) maps, got student {tuple(student.shape)} and "
                f"teacher {tuple(teacher.shape)}"
            )
        student, teacher = match_spatial(student, teacher)
        return {"loss": at_loss(student, teacher, self.p, self.mode)}


@METHODS.register("at")
class ATMethod(ComposedMethod):
    """CE + β·Σ AT (CIFAR-100 defaults: β = 1000, p = 2, every stage, CE 1, KD off)."""

    uses = with_ce_and_kd(
        Use("at", weight="at_weight", args=("p", "mode", "student_layers", "teacher_layers"))
    )
    defaults = {**CE_KD_DEFAULTS, "at_weight": 1000.0}
