"""CIFAR VGGs with batch norm (Simonyan & Zisserman 2015, adapted to 32x32 inputs).

Five conv stages of 3x3 convs (with bias) + BN + ReLU; the last stage is globally average-pooled to
a 512-d vector read by a single linear `classifier` (no FC stack), which is what makes these small
enough to be CIFAR students. This is the function of the RepDistiller/mdistiller `vgg.py` (`vgg*_bn`),
whose checkpoints load (see `checkpoints.py`): 2x2 max-pools follow the first three stages, but the
one before the last stage is applied only to 64-pixel inputs (Tiny-ImageNet), so at 32x32 the last two
stages both run at 4x4.

Each stage ends with a non-inplace ReLU module, so its input (the official `preact` map) is the tap
`features.<2i>.<last>:input`.
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
    """Conv3x3 (bias) + BN + ReLU for each entry of `channels`; the last ReLU keeps its input intact."""
    layers: list[nn.Module] = []
    for i, cout in enumerate(channels):
        last = i == len(channels) - 1
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=not last)]
        cin = cout
    return nn.Sequential(*layers)


@torch.fx.wrap  # one call in a torch.fx trace (the hint stage cuts models with it): decided at run time
def pool_at_input_size(pool: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    """`pool(x)` when x is `size` pixels high, else x unchanged (the official forward's size test)."""
    return pool(x) if x.shape[2] == size else x


class CifarVGG(nn.Module):
    """Five stages (max-pools between them, see the module docstring for the fourth), global average
    pool, one linear `classifier`."""

    LAST_POOL = 7  # index in `features` of the max-pool before the last stage
    LAST_POOL_INPUT = 64  # the only input height the official forward applies it at

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
        for i, module in enumerate(self.features):
            x = pool_at_input_size(module, x, self.LAST_POOL_INPUT) if i == self.LAST_POOL else module(x)
        return self.classifier(torch.flatten(self.pool(x), 1))

    def stage_taps(self, preact: bool = False) -> list[str]:
        """Official `is_feat` maps without the stem (stages 2-5), or their `preact` maps."""
        stages = [f"features.{2 * i}" for i in range(1, 5)]
        if preact:
            return [f"{p}.{len(self.features[2 * i]) - 1}:input" for i, p in enumerate(stages, 1)]
        return stages


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
