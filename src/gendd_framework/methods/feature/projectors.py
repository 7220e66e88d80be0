"""Projectors shared by feature terms, sized from the build-time probe (per-sample tap shapes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gendd_framework.errors import ConfigError


def flat_dim(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class ConvRegressor(nn.Module):
    """Student map (C_s, H_s, W_s) -> teacher map shape (C_t, H_t, W_t): conv + BN + ReLU (FitNet's
    regressor as in CRD/RepDistiller). Halving, doubling or shrinking the resolution picks a stride-2
    3x3 conv, a stride-2 4x4 transposed conv, or a (1+H_s-H_t)x(1+W_s-W_t) valid conv."""

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], relu: bool = True) -> None:
        super().__init__()
        if len(s_shape) != 3 or len(t_shape) != 3:
            raise ConfigError(
                f"a conv regressor needs (C, H, W) maps, got student {s_shape}, teacher {t_shape}"
            )
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
        if s_h == 2 * t_h and s_w == 2 * t_w:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
        elif s_h * 2 == t_h and s_w * 2 == t_w:
            self.conv = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ConfigError(
                f"no conv regressor maps a student map {tuple(s_shape)} to a teacher map {tuple(t_shape)}: "
                "pick layers of equal, half or double resolution"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class LinearEmbed(nn.Module):
    """Flatten -> Linear -> (optional) L2 normalisation: CRD's embedding heads."""

    def __init__(self, in_dim: int, out_dim: int, normalize: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.flatten(1))
        return F.normalize(x, dim=1) if self.normalize else x


def match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the larger of two (B, C, H, W) maps to the smaller's resolution."""
    s_hw, t_hw = student.shape[2:], teacher.shape[2:]
    if s_hw == t_hw:
        return student, teacher
    if s_hw[0] >= t_hw[0] and s_hw[1] >= t_hw[1]:
        return F.adaptive_avg_pool2d(student, t_hw), teacher
    return student, F.adaptive_avg_pool2d(teacher, s_hw)
