"""The teacher-output cache's storage and guards: one view's entries (`ViewStore`), the per-sample
input fingerprint that proves an entry belongs to the input at hand, and `TeacherWatch`, which notices a
teacher that changes after the cache was attached (engine/teacher_cache.py uses them)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gendd_framework.engine.statistics import weights_digest
from gendd_framework.errors import ConfigError


def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """(B, 2) float64 per-sample sum and sin-weighted sum: equal inputs agree, any change of pixels,
    shift or flip moves the weighted sum."""
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    weights = torch.sin(torch.arange(flat.shape[1], dtype=torch.float64, device=x.device) * 0.7 + 0.3)
    return torch.stack([flat.sum(1), (flat * weights).sum(1)], dim=1)


class ViewStore:
    """One view's entries: per-tap tensors (N, ...), a filled mask and the input fingerprints."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.taps: dict[str, torch.Tensor] = {}
        self.filled = torch.zeros(num_samples, dtype=torch.bool)
        self.prints = torch.zeros(num_samples, 2, dtype=torch.float64)
        self.dtypes: dict[str, str] = {}  # each tap's computed dtype (reads return it, whatever is stored)
        self.dirty = False

    def state(self) -> dict[str, Any]:
        return {"taps": self.taps, "filled": self.filled, "fingerprint": self.prints, "dtypes": self.dtypes}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ViewStore:
        store = cls(len(state["filled"]))
        store.taps, store.filled, store.prints = dict(state["taps"]), state["filled"], state["fingerprint"]
        store.dtypes = dict(state["dtypes"])
        return store

    def read(self, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            k: v.index_select(0, idx).to(device, getattr(torch, self.dtypes[k]), non_blocking=True)
            for k, v in self.taps.items()
        }

    def merge(self, other: ViewStore) -> None:
        """Take `other`'s entries this store lacks (another run filled them since we loaded)."""
        new = other.filled & ~self.filled
        if not bool(new.any()):
            return
        for key, values in other.taps.items():
            if key not in self.taps:
                self.taps[key] = values.clone()
                self.dtypes[key] = other.dtypes[key]
            else:
                self.taps[key][new] = values[new].to(self.taps[key].dtype)
        self.prints[new] = other.prints[new]
        self.filled |= new


class TeacherWatch:
    """Notices a teacher that changes after the cache was attached: replaced, in train mode, or with
    weights changed in place. Per lookup it reads the tensors' version counters (host-side integers,
    no device sync); a changed sum is confirmed by the weights digest, so a load of the same weights
    (a resume) keeps the cache."""

    def __init__(self, tap: nn.Module, digest: str) -> None:
        self.tap, self.digest = tap, digest
        self.tensors = [*tap.parameters(), *tap.buffers()]
        self.versions = self._versions()

    def _versions(self) -> int:
        return sum(t._version for t in self.tensors)

    def same_weights(self) -> bool:
        return weights_digest(getattr(self.tap, "model", self.tap)) == self.digest

    def changed(self, tap: nn.Module | None) -> str | None:
        """Why the teacher's outputs can no longer be read from the cache, or None."""
        if tap is not None and tap is not self.tap:
            return "the method's teacher module was replaced after the cache was attached"
        if getattr(self.tap, "model", self.tap).training:
            return "the teacher runs in train mode (dropout or batch statistics change its outputs)"
        versions = self._versions()
        if versions != self.versions:
            if not self.same_weights():
                return "the teacher's weights changed during training (an EMA or momentum teacher?)"
            self.versions = versions  # same values written again (a resume loading the checkpoint)
        return None


def load_store(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file from a killed save cannot happen (atomic), a foreign one can
        raise ConfigError(f"cannot read teacher cache file {path}: {exc}; delete it to rebuild") from exc
