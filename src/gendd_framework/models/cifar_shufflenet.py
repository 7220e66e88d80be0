"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018) sized for 32x32 CIFAR inputs.

Both drop the ImageNet stem's stride and max-pool, so three stride-2 stages take 32x32 to 4x4 before
global pooling. V1: groups=3, stage widths 240/480/960, blocks 4/8/4 (960-d feature). V2: width 1.0,
stage widths 116/232/464 and a final 1x1 conv to 1024 (1024-d feature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gendd_framework.models.init import init_conv_bn
from gendd_framework.registry import MODELS


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channels across `groups` so the next grouped conv mixes information between groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Bias-free conv + BN (no activation: callers decide, since several are deliberately linear)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


# --------------------------------------------------------------------------------------- V1 --
class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1; stride-2 units concat an avg-pooled input.

    The first unit's input (the 24-channel stem) is too narrow to split, so its first 1x1 is ungrouped.
    """

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = cout // 4
        self.g1 = 1 if cin == 24 else groups
        self.stride = stride
        self.conv1 = _conv_bn(cin, mid, 1, groups=self.g1)
        self.conv2 = _conv_bn(mid, mid, 3, stride, groups=mid)
        self.conv3 = _conv_bn(mid, cout, 1, groups=groups)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.conv1(x)), self.g1)
        out = self.conv3(self.conv2(out))
        if self.pool is not None:
            return F.relu(torch.cat([out, self.pool(x)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    """24-ch 1x1 stem, three stages (first unit stride 2, output width includes the concat), `fc`."""

    def __init__(self, widths: list[int], blocks: list[int], groups: int, num_classes: int = 100) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 24, 1), nn.ReLU(inplace=True))
        units: list[nn.Module] = []
        cin = 24
        for width, n in zip(widths, blocks):
            for i in range(n):
                # A stride-2 unit concatenates its input, so its branch only produces the remainder.
                units.append(ShuffleV1Unit(cin, width - cin if i == 0 else width, 2 if i == 0 else 1, groups))
                cin = width
        self.units = nn.Sequential(*units)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.units(self.stem(x))), 1))


# --------------------------------------------------------------------------------------- V2 --
class ShuffleV2Unit(nn.Module):
    """Split channels in half; one half passes through, the other gets 1x1 -> dw 3x3 -> 1x1; shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            _conv_bn(half, half, 1),
            nn.ReLU(inplace=True),
            _conv_bn(half, half, 3, groups=half),
            _conv_bn(half, half, 1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, work = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(work)], 1), 2)


class ShuffleV2Down(nn.Module):
    """Stride-2 unit: both branches see the full input and each produce half of the output channels."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(
            _conv_bn(cin, cin, 3, 2, groups=cin), _conv_bn(cin, mid, 1), nn.ReLU(inplace=True)
        )
        self.right = nn.Sequential(
            _conv_bn(cin, mid, 1),
            nn.ReLU(inplace=True),
            _conv_bn(mid, mid, 3, 2, groups=mid),
            _conv_bn(mid, mid, 1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(nn.Module):
    """24-ch 1x1 stem, three stages of (down unit + `n` basic units), 1x1 conv to `last`, pool, `fc`."""

    def __init__(self, widths: list[int], blocks: list[int], last: int, num_classes: int = 100) -> None:
        super().__init__()
        # A 1x1 stem, as in the CIFAR variant used by CRD/RepDistiller (it fixes the reference size).
        self.stem = nn.Sequential(_conv_bn(3, 24, 1), nn.ReLU(inplace=True))
        units: list[nn.Module] = []
        cin = 24
        for width, n in zip(widths, blocks):
            units.append(ShuffleV2Down(cin, width))
            units += [ShuffleV2Unit(width) for _ in range(n)]
            cin = width
        self.units = nn.Sequential(*units)
        self.head = nn.Sequential(_conv_bn(cin, last, 1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = last
        self.fc = nn.Linear(last, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.units(self.stem(x)))
        return self.fc(torch.flatten(self.pool(out), 1))


@MODELS.register("shufflev1", aliases=["ShuffleV1"])
def shufflev1(num_classes: int = 100) -> ShuffleNetV1:
    """ShuffleNet V1 (groups=3, widths 240/480/960, blocks 4/8/4) for 32x32 inputs."""
    return ShuffleNetV1([240, 480, 960], [4, 8, 4], groups=3, num_classes=num_classes)


@MODELS.register("shufflev2", aliases=["ShuffleV2"])
def shufflev2(num_classes: int = 100) -> ShuffleNetV2:
    """ShuffleNet V2 1.0x (widths 116/232/464, 1024-d head) for 32x32 inputs."""
    return ShuffleNetV2([116, 232, 464], [3, 7, 3], last=1024, num_classes=num_classes)
