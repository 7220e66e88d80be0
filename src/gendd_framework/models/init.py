"""One weight-init recipe for the CIFAR zoo (the usual ResNet/RepDistiller choice)."""

from __future__ import annotations

from torch import nn


def init_conv_bn(model: nn.Module, linear_std: float | None = None) -> None:
    """Kaiming-normal convs (fan-out, ReLU) with zero bias, unit-scale BN; Linear layers get N(0, std²)
    weights and zero bias when `linear_std` is given, else keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
