"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018) sized for 32x32 CIFAR inputs.

Both drop the ImageNet stem's stride and max-pool, so three stride-2 stages take 32x32 to 4x4 before
global pooling. V1: groups=3, stage widths 240/480/960, blocks 4/8/4 (960-d feature). V2: width 1.0,
stage widths 116/232/464 and a final 1x1 conv to 1024 (1024-d feature). These are the functions of
the RepDistiller/mdistiller `ShuffleNetv1.py` / `ShuffleNetv2.py`, whose checkpoints load (see
`checkpoints.py`); V1 keeps their ReLU after the depthwise conv, which the paper's unit does not have.

Every unit ends with a non-inplace `relu` module whose input is the official `preact` map, so a
stage's pre-activation map is the tap `units.<i>.relu:input`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gendd_framework.errors import ConfigError
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
    The depthwise conv is followed by BN + ReLU, as in the CIFAR code whose checkpoints this loads.
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
        self.relu = nn.ReLU()  # not in place: its input is the unit's preact map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.conv1(x)), self.g1)
        out = self.conv3(F.relu(self.conv2(out)))
        return self.relu(torch.cat([out, self.pool(x)], 1) if self.pool is not None else out + x)


class ShuffleNetV1(nn.Module):
    """24-ch 1x1 stem, three stages (first unit stride 2, output width includes the concat), `fc`."""

    def __init__(self, widths: list[int], blocks: list[int], groups: int, num_classes: int = 100) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 24, 1), nn.ReLU(inplace=True))
        self.stage_depths = list(blocks)
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

    def stage_taps(self, preact: bool = False) -> list[str]:
        """Official `is_feat` maps without the stem (each stage's last unit), or their `preact` maps."""
        return _unit_taps(self.stage_depths, preact)


def _unit_taps(stage_units: list[int], preact: bool) -> list[str]:
    ends = [sum(stage_units[: i + 1]) - 1 for i in range(len(stage_units))]
    return [f"units.{e}.relu:input" if preact else f"units.{e}" for e in ends]


# --------------------------------------------------------------------------------------- V2 --
class ShuffleV2Unit(nn.Module):
    """Split channels in half; one half passes through, the other gets 1x1 -> dw 3x3 -> 1x1; shuffle.

    The branch's final ReLU is applied to the concatenation, whose passed-through half is already
    non-negative (every unit's output is), so the result is the official one and the `relu` input is
    the official preact map (the concatenation before the ReLU, unshuffled).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            _conv_bn(half, half, 1),
            nn.ReLU(inplace=True),
            _conv_bn(half, half, 3, groups=half),
            _conv_bn(half, half, 1),
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, work = x.chunk(2, dim=1)
        return channel_shuffle(self.relu(torch.cat([keep, self.branch(work)], 1)), 2)


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
        self.stage_depths = [n + 1 for n in blocks]  # a down unit, then `n` basic units
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

    def stage_taps(self, preact: bool = False) -> list[str]:
        """Official `is_feat` maps without the stem (each stage's last unit, not the 1x1 head), or
        their `preact` maps."""
        return _unit_taps(self.stage_depths, preact)


@MODELS.register("shufflev1", aliases=["ShuffleV1"])
def shufflev1(num_classes: int = 100) -> ShuffleNetV1:
    """ShuffleNet V1 (groups=3, widths 240/480/960, blocks 4/8/4) for 32x32 inputs."""
    return ShuffleNetV1([240, 480, 960], [4, 8, 4], groups=3, num_classes=num_classes)


# net_size -> (stage widths, basic units per stage, head width): the upstream CIFAR configurations
_V2_SIZES: dict[float, tuple[list[int], list[int], int]] = {
    0.2: ([40, 80, 160], [3, 3, 3], 512),
    0.3: ([40, 80, 160], [3, 7, 3], 512),
    0.5: ([48, 96, 192], [3, 7, 3], 1024),
    1.0: ([116, 232, 464], [3, 7, 3], 1024),
    1.5: ([176, 352, 704], [3, 7, 3], 1024),
    2.0: ([224, 488, 976], [3, 7, 3], 2048),
}


@MODELS.register("shufflev2", aliases=["ShuffleV2"])
def shufflev2(num_classes: int = 100, net_size: float = 1.0) -> ShuffleNetV2:
    """ShuffleNet V2 for 32x32 inputs; `net_size` 1.0 (widths 116/232/464, 1024-d head) is the
    literature's student, 0.2/0.3/0.5/1.5/2.0 the other upstream sizes."""
    if float(net_size) not in _V2_SIZES:
        raise ConfigError(f"shufflev2 net_size must be one of {sorted(_V2_SIZES)}, got {net_size!r}")
    widths, blocks, last = _V2_SIZES[float(net_size)]
    return ShuffleNetV2(widths, blocks, last=last, num_classes=num_classes)
