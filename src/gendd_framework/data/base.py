"""What every dataset factory returns: train/val/test splits plus the facts models need."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from gendd_framework.context import UNLABELLED, as_batch


@dataclass
class DataSplits:
    """Model selection uses `val` (carved from training data); `test` is only read for final numbers.

    `train_plain` is the training split without random augmentation (teacher statistics read it);
    `label_mask` (bool per training sample) marks the labels a student may see: the others are a
    transfer set that only distillation terms use. Teachers always train on every label.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    train_plain: Dataset | None = None
    label_mask: torch.Tensor | None = None


class BatchDataset(Dataset):
    """Serves every sample as `{"input", "target", "index", ...}` (index = position in the split);
    `(x, y)` datasets from plugins are wrapped, and hidden labels (label_mask False) become -1."""

    def __init__(self, dataset: Dataset, label_mask: torch.Tensor | None = None) -> None:
        self.dataset, self.label_mask = dataset, label_mask
        if label_mask is not None and len(label_mask) != len(dataset):
            raise ValueError(f"label_mask has {len(label_mask)} entries for {len(dataset)} samples")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        sample = as_batch(self.dataset[i], index=i)
        if self.label_mask is not None and not bool(self.label_mask[i]):
            target = sample["target"]  # same type as the visible labels, so batches collate
            sample["target"] = torch.full_like(target, UNLABELLED) if torch.is_tensor(target) else UNLABELLED
        return sample


class TensorImages(Dataset):
    """In-memory (image, label) pairs with an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices into len(fractions)+1 parts with class proportions kept; the rest goes last."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    remaining = np.arange(len(labels))
    parts: list[np.ndarray] = []
    left = 1.0
    for frac in fractions:
        take = frac / left
        if take <= 0:
            parts.append(np.array([], dtype=int))
            continue
        chosen, remaining = train_test_split(
            remaining, train_size=take, stratify=labels[remaining], random_state=seed
        )
        parts.append(np.sort(chosen))
        left -= frac
    parts.append(np.sort(remaining))
    return parts


def carve(train_aug: Dataset, train_plain: Dataset, labels: Sequence[int], val_fraction: float, seed: int):
    """(train, val, train without augmentation): a stratified validation subset of the training data is
    held out and served without augmentation."""
    val_idx, train_idx = stratified_split(labels, [val_fraction], seed)
    train_idx = train_idx.tolist()
    return Subset(train_aug, train_idx), Subset(train_plain, val_idx.tolist()), Subset(train_plain, train_idx)
