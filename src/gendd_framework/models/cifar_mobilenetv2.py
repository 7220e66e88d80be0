"""MobileNetV2 for CIFAR at width 0.5 (Sandler et al. 2018), the "mobile_half" CRD/RepDistiller student.

Inverted residual blocks (1x1 expand -> 3x3 depthwise -> linear 1x1 project) with expansion 6; the
stem conv has stride 2 and so do three stages, leaving a 2x2 map at 32x32 input. The last 1x1 conv
keeps 1280 channels (it is not scaled down for width < 1), giving a 1280-d pooled feature. This is the
function of the RepDistiller/mdistiller `mobilenetv2.py` (`mobilenetv2_T_w`), whose checkpoints load
(see `checkpoints.py`).

Stage maps are the official `is_feat` ones: the outputs of block groups 2, 3, 5 and 7 (12, 16, 48 and
160 channels at width 0.5), not the 1280-channel head. Those blocks end in a linear projection, so the
official `preact` list is the same maps.
"""

from __future__ import annotations

import torch
from torch import nn

from gendd_framework.models.init import init_conv_bn
from gendd_framework.registry import MODELS

# (expansion t, output channels c, repeats n, first stride s), before the width multiplier.
_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> list[nn.Module]:
    """Bias-free conv + BN, followed by ReLU unless it is a linear bottleneck projection."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return layers


class InvertedResidual(nn.Module):
    """Expand (always a 1x1 conv, even at t=1), depthwise 3x3, linear project; residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *_conv_bn(cin, hidden, 1),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
            *_conv_bn(hidden, cout, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Cifar(nn.Module):
    """Stem, inverted-residual stages, 1x1 conv to `last_channel`, global pool, linear `classifier`."""

    STAGE_GROUPS = (1, 2, 4, 6)  # the block groups whose outputs are the official is_feat maps
    STEM = 3  # conv, BN, ReLU before the first block in `features`

    def __init__(self, num_classes: int = 100, width_mult: float = 0.5, expand: int = 6) -> None:
        super().__init__()
        self.group_sizes = [n for _, _, n, _ in _SETTINGS]
        cin = int(32 * width_mult)
        layers: list[nn.Module] = _conv_bn(3, cin, 3, stride=2)
        for t, c, n, s in _SETTINGS:
            cout = int(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t if t == 1 else expand))
                cin = cout
        last = 1280 if width_mult <= 1.0 else int(1280 * width_mult)
        layers += _conv_bn(cin, last, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = last
        self.classifier = nn.Linear(last, num_classes)
        init_conv_bn(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    def stage_taps(self, preact: bool = False) -> list[str]:
        """Official `is_feat` maps without the stem; `preact` gives the same (linear block outputs)."""
        ends = [self.STEM + sum(self.group_sizes[: g + 1]) - 1 for g in self.STAGE_GROUPS]
        return [f"features.{e}" for e in ends]


@MODELS.register("mobilenetv2_cifar", aliases=["mobile_half", "MobileNetV2"])
def mobilenetv2_cifar(num_classes: int = 100, width_mult: float = 0.5, expand: int = 6) -> MobileNetV2Cifar:
    """MobileNetV2 (width 0.5, expansion 6 by default) for 32x32 inputs: the standard light CIFAR
    student (`mobilenetv2_T_w(T=expand, W=width_mult)` upstream)."""
    return MobileNetV2Cifar(num_classes, width_mult, expand)
