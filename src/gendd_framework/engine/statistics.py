"""Teacher statistics for a method's `prepare` hook, computed once and cached on disk.

The cache key covers the teacher's weights, the data config and the statistic's own parameters, so a
statistic is reused across seeds and sweeps and never across teachers or data. Statistics read the
training split without random augmentation; a sample whose label is hidden (transfer set) is grouped
under the teacher's predicted class.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gendd_framework.context import distill_targets, to_device
from gendd_framework.engine.checkpoint import atomic_save
from gendd_framework.engine.checkpoint import load as load_checkpoint
from gendd_framework.engine.distributed import is_main_process
from gendd_framework.models.tap import FeatureTap, find_classifier


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class TeacherStatistics:
    """Class-wise teacher features and cached derived statistics (class means, cost matrices)."""

    def __init__(
        self,
        teacher: nn.Module,
        dataset: Dataset,
        num_classes: int,
        device: torch.device,
        cache_dir: str | Path | None,
        data_key: Mapping[str, Any],
        batch_size: int = 256,
    ) -> None:
        self.teacher, self.dataset, self.num_classes = teacher, dataset, num_classes
        self.device, self.batch_size = device, batch_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.data_key = dict(data_key)
        self._key: str | None = None
        self._memo: dict[str, Any] = {}

    @property
    def key(self) -> str:
        """Teacher weights + data config (hashed on first use: most methods never ask)."""
        if self._key is None:
            blob = weights_digest(self.teacher) + json.dumps(self.data_key, sort_keys=True, default=str)
            self._key = hashlib.sha256(blob.encode()).hexdigest()
        return self._key

    def cached(
        self, name: str, params: Mapping[str, Any], compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """`compute()` once per (teacher, data, name, params): memoised, then stored under the cache dir."""
        digest = hashlib.sha256(
            (self.key + name + json.dumps(dict(params), sort_keys=True, default=str)).encode()
        ).hexdigest()[:16]
        if digest in self._memo:
            return self._memo[digest]
        path = self.cache_dir / "statistics" / f"{name}-{digest}.pt" if self.cache_dir else None
        if path is not None and path.exists():
            value = load_checkpoint(path)["value"]
        else:
            value = compute()
            if path is not None and is_main_process():  # every rank computes; only rank 0 writes
                atomic_save({"value": value, "name": name, "params": dict(params)}, path)
        self._memo[digest] = value
        return value

    @torch.no_grad()
    def class_features(self, tap: str = "feature", max_per_class: int | None = None) -> list[torch.Tensor]:
        """Teacher `tap` outputs (flattened per sample) grouped by class, in dataset order (cached)."""

        def compute() -> dict[str, torch.Tensor]:
            features, classes = [], []
            probe = FeatureTap(self.teacher, [tap])
            probe.eval()
            loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)
            for batch in loader:
                batch = to_device(batch, self.device)
                out = probe(batch["input"])
                features.append(out[tap].float().flatten(1).cpu())
                classes.append(distill_targets(batch["target"], out["logits"]).cpu())
            return {"features": torch.cat(features), "classes": torch.cat(classes)}

        data = self.cached("class_features", {"tap": tap}, compute)
        groups = []
        for c in range(self.num_classes):
            rows = data["features"][data["classes"] == c]
            groups.append(rows[:max_per_class] if max_per_class else rows)
        return groups

    def class_means(self, tap: str = "feature") -> torch.Tensor:
        """(C, D) mean teacher `tap` output per class over the whole training split."""
        return torch.stack([f.mean(0) for f in self.class_features(tap)])

    def teacher_classifier_weight(self) -> torch.Tensor:
        return find_classifier(self.teacher).weight.detach().cpu()
