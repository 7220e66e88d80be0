"""One weight-init recipe for the CIFAR zoo (the usual ResNet/RepDistiller choice) and OFA's exit branches."""

from __future__ import annotations

from torch import nn


def init_conv_bn(model: nn.Module, linear_std: float | None = None, truncated: bool = False) -> None:
    """Kaiming-normal convs (fan-out, ReLU) with zero bias, unit-scale BN; Linear layers get N(0, std²)
    weights (truncated to [-2, 2] when `truncated`, as timm/OFA draw them) and zero bias when
    `linear_std` is given, else keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            if truncated:
                nn.init.trunc_normal_(m.weight, std=linear_std)
            else:
                nn.init.normal_(m.weight, 0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
