"""WKD-F (Lv et al. NeurIPS'24): Wasserstein distance between per-channel Gaussians of the last stage map.

The student's map goes through a trainable projector to the teacher's map shape; each channel (per grid
cell) becomes a Gaussian N(μ, σ²) over spatial positions and the loss is ρ·Σ(μ_s − μ_t)² + Σ(σ_s − σ_t)²
(the closed-form W₂² of diagonal Gaussians with the mean part weighted by ρ), see `losses/wkd_feature.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.losses.wkd_feature import smallest_cell, wkd_feature_terms
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.feature.layers import LayerSpec, resolve_layers
from gendd_framework.methods.feature.projectors import ConvRegressor
from gendd_framework.methods.terms import LossTerm, require_shapes
from gendd_framework.registry import LOSSES, METHODS

PROJECTORS = ("conv1x1", "bottleneck", "none")


class BottleneckRegressor(nn.Module):
    """1x1 conv to `hidden` channels, a 3x3 conv (hidden -> hidden), 1x1 conv to C_t, then BN + ReLU
    (no normalisation between the convs), WKD-F's ImageNet projector. The 3x3 conv keeps the resolution,
    or halves it (stride 2) / doubles it (4x4 transposed conv) to reach the teacher map's size."""

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], hidden: int = 256) -> None:
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
        if (s_h, s_w) == (t_h, t_w):
            middle: nn.Module = nn.Conv2d(hidden, hidden, 3, padding=1)
        elif (s_h, s_w) == (2 * t_h, 2 * t_w):
            middle = nn.Conv2d(hidden, hidden, 3, stride=2, padding=1)
        elif (2 * s_h, 2 * s_w) == (t_h, t_w):
            middle = nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1)
        else:
            raise ConfigError(
                f"wkd_f projector 'bottleneck' maps equal, half or double resolutions, got student map "
                f"{tuple(s_shape)} and teacher map {tuple(t_shape)}; use projector: conv1x1 or other layers"
            )
        self.body = nn.Sequential(nn.Conv2d(s_c, hidden, 1), middle, nn.Conv2d(hidden, t_c, 1))
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.body(x)))


def _single(layers: list[str], key: str) -> tuple[str, ...]:
    if len(layers) != 1:
        raise ConfigError(f"wkd_f reads one map per side, but `{key}` selects {layers}")
    return (layers[0],)


@LOSSES.register("wkd_f")
class WKDFeature(LossTerm):
    """ρ·mean_term + std_term between the projected student map and the teacher map (one layer each)."""

    def __init__(
        self,
        mean_weight: float = 4.0,
        grid: int = 1,
        eps: float = 1e-5,
        projector: str = "conv1x1",
        hidden_channels: int = 256,
        student_layers: LayerSpec = "auto",
        teacher_layers: LayerSpec = "auto",
    ) -> None:
        super().__init__()
        if projector not in PROJECTORS:
            raise ConfigError(f"wkd_f projector must be one of {PROJECTORS}, got '{projector}'")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ConfigError(f"wkd_f grid must be an integer >= 1, got {grid!r}")
        if mean_weight < 0 or eps <= 0 or hidden_channels < 1:
            raise ConfigError(
                f"wkd_f needs mean_weight >= 0, eps > 0 and hidden_channels >= 1, got mean_weight="
                f"{mean_weight}, eps={eps}, hidden_channels={hidden_channels}"
            )
        self.mean_weight, self.grid, self.eps = float(mean_weight), grid, float(eps)
        self.projector_kind, self.hidden_channels = projector, int(hidden_channels)
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        self.projector: nn.Module = nn.Identity()

    def bind(self, student, teacher, facts) -> None:
        shape = facts.get("input_shape")
        # the deepest default stage: the last map before global pooling
        s = resolve_layers(student, self.student_layers, shape, "student_layers", auto=[-1])
        t = resolve_layers(teacher, self.teacher_layers, shape, "teacher_layers", auto=[-1])
        self.student_taps = _single(s, "student_layers")
        self.teacher_taps = _single(t, "teacher_layers")

    def setup(self, shapes) -> None:
        shapes = require_shapes(shapes, "wkd_f")
        (s_tap,), (t_tap,) = self.student_taps, self.teacher_taps
        s_shape, t_shape = tuple(shapes["student"][s_tap]), tuple(shapes["teacher"][t_tap])
        if len(s_shape) != 3 or len(t_shape) != 3:
            raise ConfigError(
                f"wkd_f needs (C, H, W) maps: `student_layers` {s_tap} gives {s_shape}, `teacher_layers` "
                f"{t_tap} gives {t_shape}"
            )
        if self.projector_kind == "conv1x1":
            self.projector = ConvRegressor(s_shape, t_shape)
        elif self.projector_kind == "bottleneck":
            self.projector = BottleneckRegressor(s_shape, t_shape, self.hidden_channels)
        elif s_shape != t_shape:
            raise ConfigError(
                f"wkd_f projector 'none' needs equal maps, got student {s_shape} and teacher {t_shape}"
            )
        if smallest_cell(t_shape[1], t_shape[2], self.grid) < 2:
            raise ConfigError(
                f"wkd_f grid={self.grid} on the teacher map {t_shape} leaves cells of one position (a "
                "variance needs two); lower `grid`"
            )

    def forward(self, student, teacher, batch, ctx):
        (s_tap,), (t_tap,) = self.student_taps, self.teacher_taps
        f_s, f_t = student[s_tap], teacher[t_tap]
        work = torch.promote_types(f_s.dtype, torch.float32)
        with torch.autocast(device_type=f_s.device.type, enabled=False):  # projector + statistics in fp32
            f_s = self.projector(f_s.to(work))
            mean_term, std_term = wkd_feature_terms(f_s, f_t, self.grid, self.eps)
        return {"loss": self.mean_weight * mean_term + std_term, "mean": mean_term, "std": std_term}


@METHODS.register("wkd_f")
class WKDFMethod(ComposedMethod):
    """CE + w·cosine_decay·(ρ·mean_term + std_term) on the last stage maps (CIFAR-100 R32x4→R8x4:
    w=0.08, ρ=4, grid 1, conv1x1 projector, decay from epoch 150 of 240)."""

    uses = (
        Use("ce", weight="ce_weight"),
        Use(
            "wkd_f",
            weight="feature_weight",
            args=("mean_weight", "grid", "eps", "projector", "hidden_channels")
            + ("student_layers", "teacher_layers"),
            schedule={"name": "cosine_decay", "start_epoch": "decay_from_epoch"},
        ),
    )
    defaults = {"ce_weight": 1.0, "feature_weight": 0.08, "decay_from_epoch": 150.0}
