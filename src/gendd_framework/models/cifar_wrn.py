"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016): WRN-d-k with pre-activation wide blocks.

Each of the three stages has (d - 4) / 6 blocks of width 16k / 32k / 64k after a 16-channel 3x3 stem.
Blocks are pre-activation (BN -> ReLU -> conv), so the net ends with a BN + ReLU before pooling; a
1x1 conv shortcut appears only where the width or resolution changes. This is the function of the
RepDistiller/mdistiller `wrn.py`, whose checkpoints load (see `checkpoints.py`).

Stage maps are the official `is_feat` ones: each stage's raw block output. Their `preact` maps are
that output through the next BN (the first BN of the next stage, then the final `bn`), which these
modules compute anyway: the taps read those BN outputs (the ReLUs after them are not in place).
"""

from __future__ import annotations

import torch
from torch import nn

from gendd_framework.models.init import init_conv_bn
from gendd_framework.registry import MODELS


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; the pre-activated input also feeds the 1x1 shortcut when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.same_shape = cin == cout and stride == 1
        self.shortcut = None if self.same_shape else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.drop(self.relu(self.bn2(out))))
        # Identity blocks add the raw input; projecting blocks project the pre-activated one.
        skip = x if self.shortcut is None else self.shortcut(pre)
        return out + skip


class WideResNet(nn.Module):
    """WRN-`depth`-`widen`: stem, three wide stages, final BN + ReLU, global pool, linear `fc`."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = 16
        for i, width in enumerate(widths):
            for j in range(n):
                blocks.append(WideBlock(cin, width, 2 if (i > 0 and j == 0) else 1, drop_rate))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()  # not in place: the `bn` output is the last stage's preact tap
        self.stage_depths = [n, n, n]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))

    def stage_taps(self, preact: bool = False) -> list[str]:
        """Official `is_feat` maps without the stem, or their `preact` versions (BN applied)."""
        n = self.stage_depths[0]
        if preact:
            return [f"blocks.{n}.bn1", f"blocks.{2 * n}.bn1", "bn"]
        return [f"blocks.{n - 1}", f"blocks.{2 * n - 1}", f"blocks.{3 * n - 1}"]


@MODELS.register("wrn_16_1")
def wrn_16_1(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-16-1: 2 blocks per stage, widths 16/32/64."""
    return WideResNet(16, 1, num_classes, drop_rate)


@MODELS.register("wrn_16_2")
def wrn_16_2(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-16-2: 2 blocks per stage, widths 32/64/128."""
    return WideResNet(16, 2, num_classes, drop_rate)


@MODELS.register("wrn_40_1")
def wrn_40_1(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-40-1: 6 blocks per stage, widths 16/32/64."""
    return WideResNet(40, 1, num_classes, drop_rate)


@MODELS.register("wrn_40_2")
def wrn_40_2(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-40-2: 6 blocks per stage, widths 32/64/128 (the usual CIFAR teacher)."""
    return WideResNet(40, 2, num_classes, drop_rate)
