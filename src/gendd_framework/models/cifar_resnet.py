"""CIFAR ResNets: the 3-stage basic-block family (resnet8 ... resnet110, x4 variants) and the 4-stage
ResNet-18/34/50 for 32x32 inputs.

They compute the networks of the CIFAR distillation literature (He et al. 2016, section 4.2; the
RepDistiller/mdistiller model files `resnet.py` and `resnetv2.py`), so their checkpoints load (see
`checkpoints.py`): a 3x3 stem without max-pool, projection (1x1 conv + BN) shortcuts wherever the
shape changes, global average pooling and one linear classifier `fc` on the pooled feature.

Each block ends with its own non-inplace `relu` module, so the residual sum before it (the official
`preact` map) is readable as the tap `layers.<i>.relu:input`.
"""

from __future__ import annotations

import torch
from torch import nn

from gendd_framework.models.init import init_conv_bn
from gendd_framework.registry import MODELS


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    """Bias-free conv + BN (the bias would be cancelled by BN's shift anyway)."""
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


def _projection(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity when shapes agree, otherwise a 1x1 conv + BN so the residual sum is well-typed."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(cin, cout, 1, stride))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (post-activation, as in the original ResNet).

    `relu` is not in place: its input, the pre-activation sum, must survive for a `relu:input` tap."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, planes, 3, stride), nn.ReLU(inplace=True), *_conv_bn(planes, planes, 3)
        )
        self.shortcut = _projection(cin, planes, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand by 4, for the deep ResNet-50."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            *_conv_bn(cin, planes, 1),
            nn.ReLU(inplace=True),
            *_conv_bn(planes, planes, 3, stride),
            nn.ReLU(inplace=True),
            *_conv_bn(planes, cout, 1),
        )
        self.shortcut = _projection(cin, cout, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv, then one stage per width (first stage stride 1, later ones stride 2), pool, `fc`.

    `layout` names the upstream file whose checkpoints it reads: `resnet` (the 3-stage nets) or
    `resnetv2` (ResNet-18/34/50); the two differ only in parameter names.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        stem: int,
        widths: list[int],
        blocks: list[int],
        num_classes: int = 100,
        layout: str = "resnet",
    ) -> None:
        super().__init__()
        self.stage_depths = list(blocks)
        self.layout = layout
        self.stem = nn.Sequential(*_conv_bn(3, stem, 3), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        cin = stem
        for i, (width, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(cin, width, stride))
                cin = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))

    def stage_taps(self, preact: bool = False) -> list[str]:
        """The official `is_feat` maps without the stem (each stage's last block), or the `preact` ones
        (that block's sum before its final ReLU)."""
        ends = [sum(self.stage_depths[: i + 1]) - 1 for i in range(len(self.stage_depths))]
        return [f"layers.{e}.relu:input" if preact else f"layers.{e}" for e in ends]


def _basic(depth: int, stem: int, widths: list[int], num_classes: int) -> CifarResNet:
    """A depth-`depth` basic-block net: (depth - 2) / 6 blocks in each of the three stages."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return CifarResNet(BasicBlock, stem, widths, [n, n, n], num_classes)


_THIN = [16, 32, 64]
_WIDE = [64, 128, 256]


@MODELS.register("resnet8")
def resnet8(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-8 (16/32/64 channels, 1 block per stage)."""
    return _basic(8, 16, _THIN, num_classes)


@MODELS.register("resnet14")
def resnet14(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-14 (16/32/64 channels, 2 blocks per stage)."""
    return _basic(14, 16, _THIN, num_classes)


@MODELS.register("resnet20")
def resnet20(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-20 (16/32/64 channels, 3 blocks per stage)."""
    return _basic(20, 16, _THIN, num_classes)


@MODELS.register("resnet32")
def resnet32(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-32 (16/32/64 channels, 5 blocks per stage)."""
    return _basic(32, 16, _THIN, num_classes)


@MODELS.register("resnet44")
def resnet44(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-44 (16/32/64 channels, 7 blocks per stage)."""
    return _basic(44, 16, _THIN, num_classes)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-56 (16/32/64 channels, 9 blocks per stage)."""
    return _basic(56, 16, _THIN, num_classes)


@MODELS.register("resnet110")
def resnet110(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-110 (16/32/64 channels, 18 blocks per stage)."""
    return _basic(110, 16, _THIN, num_classes)


@MODELS.register("resnet8x4")
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-8 at 4x width (32-ch stem, 64/128/256 stages): the classic small student."""
    return _basic(8, 32, _WIDE, num_classes)


@MODELS.register("resnet32x4")
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-32 at 4x width (32-ch stem, 64/128/256 stages): the classic strong teacher."""
    return _basic(32, 32, _WIDE, num_classes)


_FOUR = [64, 128, 256, 512]


@MODELS.register("resnet18_cifar", aliases=["ResNet18"])
def resnet18_cifar(num_classes: int = 100) -> CifarResNet:
    """ResNet-18 for 32x32 inputs: 3x3 stem (64 ch, no max-pool), basic-block stages [2, 2, 2, 2]."""
    return CifarResNet(BasicBlock, 64, _FOUR, [2, 2, 2, 2], num_classes, layout="resnetv2")


@MODELS.register("resnet34_cifar", aliases=["ResNet34"])
def resnet34_cifar(num_classes: int = 100) -> CifarResNet:
    """ResNet-34 for 32x32 inputs: 3x3 stem (64 ch, no max-pool), basic-block stages [3, 4, 6, 3]."""
    return CifarResNet(BasicBlock, 64, _FOUR, [3, 4, 6, 3], num_classes, layout="resnetv2")


@MODELS.register("resnet50_cifar", aliases=["ResNet50"])
def resnet50_cifar(num_classes: int = 100) -> CifarResNet:
    """ResNet-50 for 32x32 inputs: 3x3 stem (64 ch, no max-pool), bottleneck stages [3, 4, 6, 3]."""
    return CifarResNet(Bottleneck, 64, _FOUR, [3, 4, 6, 3], num_classes, layout="resnetv2")
