"""scikit-learn's `load_digits` (1,797 8x8 images, shipped inside the package): the CPU default data."""

from __future__ import annotations

import torch
from torch import nn

from gendd_framework.data.base import DataSplits, TensorImages, stratified_split
from gendd_framework.registry import DATASETS


class RandomShift(nn.Module):
    """Translate an image by up to `max_shift` pixels (zero fill) and add Gaussian pixel noise."""

    def __init__(self, max_shift: int = 0, noise_std: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        self.max_shift, self.noise_std, self.generator = max_shift, noise_std, generator

    def extra_repr(self) -> str:  # the settings appear in repr(): teacher-output cache keys read it
        return f"max_shift={self.max_shift}, noise_std={self.noise_std}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_shift > 0:
            dy, dx = torch.randint(
                -self.max_shift, self.max_shift + 1, (2,), generator=self.generator
            ).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
            if dy > 0:
                x[..., :dy, :] = 0
            elif dy < 0:
                x[..., dy:, :] = 0
            if dx > 0:
                x[..., :, :dx] = 0
            elif dx < 0:
                x[..., :, dx:] = 0
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn(x.shape, generator=self.generator)
        return x


@DATASETS.register("digits")
def digits(
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    train_fraction: float = 1.0,
    label_fraction: float = 1.0,
    split_seed: int = 0,
    augment: bool = True,
    max_shift: int = 0,
    noise_std: float = 0.1,
) -> DataSplits:
    """Digits as (1, 8, 8) images, standardised with training statistics; stratified fixed-seed splits.

    `train_fraction` < 1 keeps only that stratified share of the training split (low-data studies).
    `label_fraction` < 1 keeps every training image but shows the student the labels of only that
    stratified share (a transfer set: distillation terms see all images, CE the labelled ones).
    """
    from gendd_framework.errors import ConfigError

    for key, value in (("train_fraction", train_fraction), ("label_fraction", label_fraction)):
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"data.{key} must be in (0, 1], got {value}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    test_idx, val_idx, train_idx = stratified_split(labels.numpy(), [test_fraction, val_fraction], split_seed)
    if train_fraction < 1.0:
        kept, _ = stratified_split(labels[train_idx].numpy(), [train_fraction], split_seed)
        train_idx = train_idx[kept]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    transform = RandomShift(max_shift, noise_std) if augment else None
    label_mask = None
    if label_fraction < 1.0:
        shown, _ = stratified_split(labels[train_idx].numpy(), [label_fraction], split_seed + 1)
        label_mask = torch.zeros(len(train_idx), dtype=torch.bool)
        label_mask[torch.as_tensor(shown)] = True

    def part(idx, tf=None) -> TensorImages:
        return TensorImages(images[idx], labels[idx], tf)

    return DataSplits(
        train=part(train_idx, transform),
        val=part(val_idx) if val_fraction > 0 else None,  # 0: the literature protocol, val is test
        test=part(test_idx),
        num_classes=10,
        input_shape=(1, 8, 8),
        train_plain=part(train_idx),
        label_mask=label_mask,
    )
