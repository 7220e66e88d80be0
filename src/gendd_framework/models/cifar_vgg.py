"""CIFAR VGGs with batch norm (Simonyan & Zisserman 2015, adapted to 32x32 inputs).

Five conv stages of 3x3 convs (with bias) + BN + ReLU, separated by 2x2 max-pools; the last stage is
globally average-pooled to a 512-d vector read by a single linear `classifier` (no FC stack), which
is what makes these small enough to be CIFAR students.
"""

from __future__ import annotations

import torch
from torch import nn

from gendd_framework.models.init import init_conv_bn
from gendd_framework.registry import MODELS

# Output channels of the convs in each of the five stages.
_CONFIGS: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _stage(cin: int, channels: list[int]) -> nn.Sequential:
    """Conv3x3 (bias) + BN + ReLU for each entry of `channels`."""
    layers: list[nn.Module] = []
    for cout in channels:
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        cin = cout
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """Five stages (max-pool between them), global average pool, one linear `classifier`."""

    def __init__(self, depth: int, num_classes: int = 100) -> None:
        super().__init__()
        cfg = _CONFIGS[depth]
        stages: list[nn.Module] = []
        cin = 3
        for i, channels in enumerate(cfg):
            if i > 0:
                stages.append(nn.MaxPool2d(2, 2))
            stages.append(_stage(cin, channels))
            cin = channels[-1]
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin
        self.classifier = nn.Linear(cin, num_classes)
        init_conv_bn(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@MODELS.register("vgg8")
def vgg8(num_classes: int = 100) -> CifarVGG:
    """VGG-8 with BN: one conv per stage."""
    return CifarVGG(8, num_classes)


@MODELS.register("vgg11")
def vgg11(num_classes: int = 100) -> CifarVGG:
    """VGG-11 with BN (configuration A)."""
    return CifarVGG(11, num_classes)


@MODELS.register("vgg13")
def vgg13(num_classes: int = 100) -> CifarVGG:
    """VGG-13 with BN (configuration B): the usual CIFAR VGG teacher."""
    return CifarVGG(13, num_classes)


@MODELS.register("vgg16")
def vgg16(num_classes: int = 100) -> CifarVGG:
    """VGG-16 with BN (configuration D)."""
    return CifarVGG(16, num_classes)


@MODELS.register("vgg19")
def vgg19(num_classes: int = 100) -> CifarVGG:
    """VGG-19 with BN (configuration E)."""
    return CifarVGG(19, num_classes)
