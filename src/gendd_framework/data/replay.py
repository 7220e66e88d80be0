"""Replayable augmentation: each sample's random transform as a function of (seed, view, index).

`ReplayViews` wraps a training dataset so that the draws of sample i in view v come from RNGs seeded by
(seed, v, i) (torch, Python `random` and NumPy, all restored afterwards, so the rest of the run sees
the same random streams as without it); `set_epoch(e)` selects view e mod `views`. Any transform that
draws from those global RNGs (torchvision, timm, this package's RandomShift) replays exactly, in
worker processes too. The teacher-output cache (engine/teacher_cache.py) relies on it to pair a cached
teacher output with the very augmented input the student sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from gendd_framework.errors import ConfigError


def sample_seed(seed: int, view: int, index: int) -> int:
    """A 63-bit seed per (seed, view, index): independent streams for every sample and view."""
    digest = hashlib.blake2b(f"{seed}:{view}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ReplayViews(Dataset):
    """Serves `dataset[i]` with its random transform driven by RNGs seeded from (seed, view, i), adding
    `view` to the sample; `set_epoch(e)` selects view e mod `views`. The global RNG states are restored
    after each sample, so nothing else in the run sees a different random stream."""

    def __init__(self, dataset: Dataset, seed: int, views: int) -> None:
        self.dataset, self.seed, self.views, self.view = dataset, int(seed), int(views), 0

    def set_epoch(self, epoch: int) -> None:
        self.view = int(epoch) % self.views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch of samples (the DataLoader's batched fetch): the RNG states are saved and restored
        once per batch, each sample still drawn from its own seed."""
        with preserved_rngs(get_worker_info() is None):
            return [
                {
                    **_seeded(self.dataset, int(i), sample_seed(self.seed, self.view, int(i))),
                    "view": self.view,
                }
                for i in indices
            ]


@contextlib.contextmanager
def preserved_rngs(enabled: bool = True) -> Iterator[None]:
    """Restore the CPU torch, Python and NumPy RNG states on exit (when `enabled`)."""
    if not enabled:
        yield
        return
    gen = torch.default_generator
    states = gen.get_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        gen.set_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def _seeded(dataset: Dataset, i: int, seed: int) -> Any:
    # the CPU generator alone: torch.manual_seed would also seed every accelerator (slow, pointless)
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    return dataset[i]


def draw(dataset: Dataset, i: int, seed: int, restore: bool | None = None) -> Any:
    """`dataset[i]` with the CPU torch, Python and NumPy RNGs seeded by `seed`.

    The previous states are restored afterwards in the main process (the training step keeps its own
    random streams); a DataLoader worker skips that (every sample it loads in replay mode is seeded
    anyway). `restore` forces either behaviour."""
    with preserved_rngs(get_worker_info() is None if restore is None else restore):
        return _seeded(dataset, i, seed)


def check_deterministic(dataset: Dataset, probes: int = 4) -> None:
    """Two draws of the first samples under different RNG seeds must agree (mode=deterministic)."""
    for i in range(min(probes, len(dataset))):
        a, b = _input(draw(dataset, i, 1)), _input(draw(dataset, i, 2))
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)):
            raise ConfigError(
                "trainer.teacher_cache.mode=deterministic needs a deterministic training transform, but "
                f"sample {i} changed between two draws: use trainer.teacher_cache.mode=replay (replayable "
                "augmentation) or turn augmentation off (e.g. data.augment=false)"
            )


def _input(sample: Any) -> Any:
    if isinstance(sample, Mapping):
        return sample.get("input")
    return sample[0] if isinstance(sample, (tuple, list)) else sample


def describe_transform(dataset: Any) -> str:
    """repr of the transforms found by walking `.dataset` wrappers (Subset, BatchDataset, ...)."""
    parts, seen = [], 0
    while dataset is not None and seen < 16:
        for attr in ("transform", "transforms", "target_transform"):
            value = getattr(dataset, attr, None)
            if value is not None and not isinstance(value, (str, int, float)):
                parts.append(f"{type(dataset).__name__}.{attr}={value!r}")
        dataset, seen = getattr(dataset, "dataset", None), seen + 1
    return " | ".join(parts) or "none"
