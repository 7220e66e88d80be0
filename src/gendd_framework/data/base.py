"""What every dataset factory returns: train/val/test splits plus the facts models need."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from gendd_framework.context import UNLABELLED, DataFacts, as_batch, view_key
from gendd_framework.data.replay import preserved_rngs


@dataclass
class DataSplits:
    """Model selection uses `val` (carved from training data); `test` is only read for final numbers.

    `val=None` is the literature protocol (`data.val_fraction: 0`, `protocol=literature`): nothing is
    held out, and the per-epoch validation reads the test split, so the best epoch is selected on test
    (`val_is_test`), as the published tables report it.
    `train_plain` is the training split without random augmentation (teacher statistics read it);
    `label_mask` (bool per training sample) marks the labels a student may see: the others are a
    transfer set that only distillation terms use. Teachers always train on every label.
    """

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    train_plain: Dataset | None = None
    label_mask: torch.Tensor | None = None
    val_is_test: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if self.val is None:
            self.val, self.val_is_test = self.test, True


class BatchDataset(Dataset):
    """Serves every sample as `{"input", "target", "index", ...}` (index = position in the split);
    `(x, y)` datasets from plugins are wrapped, and hidden labels (label_mask False) become -1.

    `views` > 1 draws the sample `views` times (so its random transform runs again each time) and adds
    the later draws' inputs as `input_1`, `input_2`, ...; a key the dataset already serves is kept."""

    def __init__(self, dataset: Dataset, label_mask: torch.Tensor | None = None, views: int = 1) -> None:
        self.dataset, self.label_mask, self.views = dataset, label_mask, int(views)
        if label_mask is not None and len(label_mask) != len(dataset):
            raise ValueError(f"label_mask has {len(label_mask)} entries for {len(dataset)} samples")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        sample = as_batch(self.dataset[i], index=i)
        for k in range(1, self.views):
            if view_key(k) not in sample:
                sample[view_key(k)] = as_batch(self.dataset[i])["input"]
        if self.label_mask is not None and not bool(self.label_mask[i]):
            target = sample["target"]  # same type as the visible labels, so batches collate
            sample["target"] = torch.full_like(target, UNLABELLED) if torch.is_tensor(target) else UNLABELLED
        return sample


def data_facts(splits: DataSplits) -> DataFacts:
    """The build-time facts of `splits` (one training sample is read to learn its keys; its random
    transform draws leave every RNG as it was)."""
    with preserved_rngs():
        keys = BatchDataset(splits.train, splits.label_mask)[0].keys() if len(splits.train) else ()
    mask = splits.label_mask
    return DataFacts(
        num_classes=int(splits.num_classes),
        input_shape=tuple(splits.input_shape) if splits.input_shape is not None else None,
        num_samples=len(splits.train),
        sample_keys=tuple(dict.fromkeys([*keys, "all_labelled"])),
        all_labelled=mask is None or bool(torch.as_tensor(mask).all()),
    )


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
    held out and served without augmentation. `val_fraction` 0 holds nothing out: every training image
    trains and val is None (`DataSplits` then validates on the test split)."""
    if val_fraction == 0:
        return train_aug, None, train_plain
    val_idx, train_idx = stratified_split(labels, [val_fraction], seed)
    train_idx = train_idx.tolist()
    return Subset(train_aug, train_idx), Subset(train_plain, val_idx.tolist()), Subset(train_plain, train_idx)
