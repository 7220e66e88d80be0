"""One-for-All KD (Hao et al. NeurIPS'23): exit branches turn intermediate student features into logits.

Each selected student stage gets a trainable exit branch (training only) that maps its features to class
logits; every branch and the student's own logits are trained with the OFA loss against the teacher's
final logits (`losses/ofa.py`), so teacher and student meet in logit space whatever their architectures.

- CNN stage (C, H, W): k depthwise-separable stride-2 blocks, k = log2(H / H_deepest) (the number of
  halvings down to the deepest selected stage), channels doubling per block and the last one giving
  D = max(D_s, D_t); the deepest stage gets a 1x1 conv to D. Then global average pool -> Linear.
- Token stage (N, C) (ViT blocks): the patch tokens are merged 2x2 (PatchMerging) down to about a 7x7
  grid, `max(#deeper stages, 1)` transformer blocks of width D_s run on prefix + patch tokens, and the
  class token (or the token mean when the model has none) goes through a Linear.
D_s / D_t are the student's / teacher's pooled feature sizes (inputs of the final classifiers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.losses.ofa import ofa_loss
from gendd_framework.methods.compose import ComposedMethod, Pick, Use
from gendd_framework.methods.feature.layers import LayerSpec, resolve_layers
from gendd_framework.methods.logit.kd import check_temperature
from gendd_framework.methods.terms import LossTerm, require_shapes
from gendd_framework.models.init import init_conv_bn
from gendd_framework.models.tap import feature_dim
from gendd_framework.registry import LOSSES, METHODS

VIT_POSITIONS = (2, 4, 10, 12)  # the 1-based blocks of a 12-block ViT the official exits read


# -- stage selection ---------------------------------------------------------------------------------
def vit_blocks(model: nn.Module) -> list[str] | None:
    """Block paths of a plain ViT column (timm `feature_info` lists every `blocks.<i>`), else None."""
    info = getattr(model, "feature_info", None)
    if not info:
        return None
    paths = [str(dict(e).get("module", "")) for e in info]
    if not all(re.fullmatch(r"blocks\.\d+", p) for p in paths):
        return None
    return paths


def vit_default_layers(blocks: Sequence[str]) -> list[str]:
    """The official exits sit after blocks 2, 4, 10, 12 of 12; another depth d takes the same fractions
    of depth (round(p·d/12), at least block 1, duplicates dropped), e.g. d = 6 -> blocks 1, 2, 5, 6."""
    d = len(blocks)
    picks = sorted({max(1, math.floor(p * d / 12 + 0.5)) for p in VIT_POSITIONS})
    return [blocks[p - 1] for p in picks]


def num_prefix_tokens(model: nn.Module) -> int:
    """Class/distillation/register tokens in front of the patch tokens (timm: `num_prefix_tokens`)."""
    return int(getattr(model, "num_prefix_tokens", getattr(model, "num_tokens", 0)) or 0)


# -- branch modules ----------------------------------------------------------------------------------
class SepConv(nn.Sequential):
    """Stride-2 depthwise 3x3 -> 1x1 -> BN -> ReLU -> depthwise 3x3 -> 1x1 -> BN -> ReLU (halves H, W)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )


def conv_branch(shape: Sequence[int], deepest_hw: Sequence[int], dim: int, num_classes: int) -> nn.Sequential:
    """Exit for a (C, H, W) map: log2(H / H_deepest) SepConvs (channels x2, last -> dim) or a 1x1 conv."""
    c, h, w = (int(v) for v in shape)
    ratio = max(h / deepest_hw[0], w / deepest_hw[1], 1.0)
    downs = max(0, round(math.log2(ratio)))
    if downs == 0:
        trunk: list[nn.Module] = [nn.Conv2d(c, dim, 1)]
    else:
        trunk, c_in = [], c
        for i in range(downs):
            c_out = dim if i == downs - 1 else 2 * c_in
            trunk.append(SepConv(c_in, c_out))
            c_in = c_out
    return nn.Sequential(*trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, num_classes))


class PatchMerging(nn.Module):
    """(B, h·w, C) patch tokens -> (B, h/2·w/2, out): concatenate each 2x2 neighbourhood, LayerNorm,
    bias-free Linear, then `act` (Swin's downsampling, used by the official ViT exits)."""

    def __init__(self, grid: tuple[int, int], dim: int, out_dim: int, act: bool) -> None:
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), (b, _, c) = self.grid, x.shape
        x = x.reshape(b, h, w, c)
        quads = [x[:, i::2, j::2] for j in (0, 1) for i in (0, 1)]
        x = torch.cat(quads, dim=-1).reshape(b, (h // 2) * (w // 2), 4 * c)
        return self.act(self.reduction(self.norm(x)))


class TokenBranch(nn.Module):
    """Exit for (N, C) tokens: merge patches towards a `grid`x`grid` layout (to width `dim`), run `depth`
    transformer blocks on prefix + patch tokens, read the class token (or the mean token) into a Linear."""

    def __init__(
        self,
        shape: Sequence[int],
        prefix: int,
        dim: int,
        depth: int,
        heads: int,
        num_classes: int,
        grid: int = 7,
        where: str = "student_layers",
    ) -> None:
        from timm.models.vision_transformer import Block

        super().__init__()
        tokens, c = (int(v) for v in shape)
        patches = tokens - prefix
        if patches < 1:
            raise ConfigError(f"ofa: {where} tap of shape {tuple(shape)} has no patch tokens after {prefix}")
        if dim % heads:
            raise ConfigError(f"ofa branch_heads={heads} must divide the branch width {dim}")
        side = math.isqrt(patches)
        merges = max(int(math.log2(side / grid)), 0) if side * side == patches and side > grid else 0
        mergers: list[nn.Module] = []
        for i in range(merges):
            g = side >> i
            if g % 2:
                raise ConfigError(
                    f"ofa: {where} tap of shape {tuple(shape)} has a {g}x{g} patch grid at merge {i + 1} of "
                    f"{merges}; 2x2 patch merging needs an even grid (tap a different block)"
                )
            mergers.append(PatchMerging((g, g), c if i == 0 else dim, dim, act=i == 0 or i < merges - 1))
        width_in = c if merges == 0 else dim
        self.prefix = prefix
        self.merge = nn.Sequential(*mergers, *([nn.Linear(width_in, dim)] if width_in != dim else []))
        self.prefix_proj = nn.Linear(c, dim) if c != dim and prefix else nn.Identity()
        self.blocks = nn.Sequential(*(Block(dim=dim, num_heads=heads) for _ in range(depth)))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.merge(x[:, self.prefix :])
        if self.prefix:
            patches = torch.cat([self.prefix_proj(x[:, : self.prefix]), patches], dim=1)
        x = self.blocks(patches)
        return self.head(x[:, 0] if self.prefix else x.mean(dim=1))


# -- terms ---------------------------------------------------------------------------------------------
def _check_eps(eps: float, what: str) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ConfigError(f"{what} must be a number > 0, got {eps!r}")
    return float(eps)


@LOSSES.register("ofa_logits")
class OFALogits(LossTerm):
    """OFA loss of the student's own logits against the teacher's (target enhancement exponent ε)."""

    def __init__(self, eps: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.eps = _check_eps(eps, "ofa_logits eps")
        self.temperature = check_temperature(temperature, "ofa_logits")

    def forward(self, student, teacher, batch, ctx):
        target = self.targets(batch, teacher)
        z_s, z_t = student["logits"].float(), teacher["logits"].float()
        return ofa_loss(z_s, z_t, target, self.eps, self.temperature)


@LOSSES.register("ofa")
class OFABranches(LossTerm):
    """Σ over the selected student stages of the OFA loss of that stage's exit branch; logs each stage.

    `eps` is one ε or one per stage; `branch_dim` overrides the exit width (default max(D_s, D_t) for
    CNN maps, D_s for tokens); `branch_heads` is the attention heads of the token exits' blocks.
    """

    def __init__(
        self,
        student_layers: LayerSpec = "auto",
        eps: float | list[float] = 1.0,
        temperature: float = 1.0,
        branch_dim: int | None = None,
        branch_heads: int = 4,
        token_grid: int = 7,
    ) -> None:
        super().__init__()
        self.spec = student_layers
        eps_list = list(eps) if isinstance(eps, (list, tuple)) else [eps]
        self.eps = [_check_eps(e, "ofa eps") for e in eps_list]
        self.temperature = check_temperature(temperature, "ofa")
        if branch_dim is not None and (type(branch_dim) is not int or branch_dim < 1):
            raise ConfigError(f"ofa branch_dim must be a positive int or null, got {branch_dim!r}")
        if any(type(v) is not int or v < 1 for v in (branch_heads, token_grid)):
            raise ConfigError(
                f"ofa branch_heads and token_grid must be >= 1, got {branch_heads} and {token_grid}"
            )
        self.branch_dim, self.branch_heads, self.token_grid = branch_dim, branch_heads, token_grid
        self.layers: list[str] = []
        self.branches = nn.ModuleList()

    def bind(self, student, teacher, facts) -> None:
        blocks = vit_blocks(student)
        if self.spec in (None, "auto") and blocks:
            self.layers = vit_default_layers(blocks)
        else:
            self.layers = resolve_layers(student, self.spec, facts.get("input_shape"), "student_layers")
        if len(self.eps) == 1:
            self.eps = self.eps * len(self.layers)
        elif len(self.eps) != len(self.layers):
            raise ConfigError(
                f"ofa eps lists one value per branch stage: got {len(self.eps)} values for the "
                f"{len(self.layers)} student_layers {self.layers}"
            )
        self.student_taps = tuple(self.layers)
        self.prefix = num_prefix_tokens(student)
        self.student_dim = feature_dim(student)
        try:
            teacher_dim = feature_dim(teacher) if teacher is not None else self.student_dim
        except ConfigError:  # e.g. an ensemble teacher without a single classifier
            teacher_dim = self.student_dim
        self.conv_dim = max(self.student_dim, teacher_dim)

    def setup(self, shapes) -> None:
        student = require_shapes(shapes, "ofa")["student"]
        num_classes = int(student["logits"][0])
        maps = [tuple(student[k]) for k in self.layers]
        bad = {k: s for k, s in zip(self.layers, maps) if len(s) not in (2, 3)}
        if bad:
            raise ConfigError(
                f"ofa exit branches read (C, H, W) maps or (tokens, C) sequences; student_layers gave {bad}"
            )
        spatial = [s[1:] for s in maps if len(s) == 3]
        deepest = min(spatial, key=lambda hw: hw[0] * hw[1]) if spatial else None
        branches = []
        for i, (key, shape) in enumerate(zip(self.layers, maps)):
            if len(shape) == 3:
                branch: nn.Module = conv_branch(shape, deepest, self.branch_dim or self.conv_dim, num_classes)
            else:
                depth = max(len(self.layers) - 1 - i, 1)
                dim = self.branch_dim or self.student_dim
                branch = TokenBranch(
                    shape, self.prefix, dim, depth, self.branch_heads, num_classes, self.token_grid, key
                )
            init_conv_bn(branch, linear_std=0.02, truncated=True)
            branches.append(branch)
        self.branches = nn.ModuleList(branches)

    def forward(self, student, teacher, batch, ctx):
        target = self.targets(batch, teacher)
        teacher_logits = teacher["logits"].float()
        parts = {}
        for key, branch, eps in zip(self.layers, self.branches, self.eps):
            logits = branch(student[key]).float()
            parts[key] = ofa_loss(logits, teacher_logits, target, eps, self.temperature)
        return {"loss": sum(parts.values()), **parts}


# -- method --------------------------------------------------------------------------------------------
def _eps_values(eps: float | Sequence[float]) -> list[float]:
    values = list(eps) if isinstance(eps, (list, tuple)) else [eps]
    if not values:
        raise ConfigError("ofa eps needs at least one value")
    return values


def logits_eps(eps: float | Sequence[float]) -> float:
    """The method's `eps` for the student's own logits: the one value, or the last of a list."""
    return _eps_values(eps)[-1]


def branch_eps(eps: float | Sequence[float]) -> float | list[float]:
    """The method's `eps` for the exit branches: the one value, or all but the last of a list."""
    values = _eps_values(eps)
    return eps if len(values) == 1 else values[:-1]


@METHODS.register("ofa")
class OFAMethod(ComposedMethod):
    """ce_weight·CE(z_s, y) + kd_weight·OFA(z_s) + ofa_weight·Σ_stages OFA(exit_stage); CIFAR-100 defaults
    (ε = 1, τ = 1, unit weights, label smoothing 0.1). `eps` is one ε or one per stage plus a last value
    for the student's logits."""

    uses = (
        Use("ce", weight="ce_weight", args=("label_smoothing",)),
        Use(
            "ofa_logits",
            weight="kd_weight",
            args={"eps": Pick("eps", logits_eps), "temperature": "temperature"},
        ),
        Use(
            "ofa",
            weight="ofa_weight",
            args={"eps": Pick("eps", branch_eps)}
            | {a: a for a in ("temperature", "student_layers", "branch_dim", "branch_heads", "token_grid")},
        ),
    )
    # the official recipe trains with label smoothing 0.1 (the `ce` term's own default is 0)
    defaults = {"ce_weight": 1.0, "label_smoothing": 0.1, "kd_weight": 1.0, "ofa_weight": 1.0}
