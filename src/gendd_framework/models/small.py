"""Small models for the embedded 8x8 digits data (and any flat-vector data): CPU-fast teachers/students."""

from __future__ import annotations

import torch
from torch import nn

from gendd_framework.registry import MODELS


@MODELS.register("mlp")
class MLP(nn.Module):
    """Fully connected net: flatten -> [Linear-BN-ReLU(-Dropout)] x len(hidden) -> Linear classifier."""

    def __init__(
        self,
        in_features: int = 64,
        hidden: list[int] | tuple[int, ...] = (256, 128),
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@MODELS.register("small_cnn")
class SmallCNN(nn.Module):
    """Conv net for small images: [conv3x3-BN-ReLU] blocks, pool after each stage, global pool, Linear."""

    def __init__(
        self,
        in_channels: int = 1,
        channels: list[int] | tuple[int, ...] = (32, 64, 128),
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for i, c in enumerate(channels):
            layers += [
                nn.Conv2d(width, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            width = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
