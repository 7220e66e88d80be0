"""Atomic checkpoints with every RNG state, loaded with `weights_only=True` (loading runs no code)."""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gendd_framework.errors import ConfigError

LOG = logging.getLogger("gendd_framework")
# atomic_save's temp names: mkstemp(prefix=".<target>.", suffix=".tmp") adds 8 random [a-z0-9_]
TMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_tmp(directory: str | Path) -> list[Path]:
    """Delete temp files a killed `atomic_save` left behind (only names it generates); returns them.

    Call it only when no save into `directory` can be in flight (a run owns its checkpoint folder)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and TMP_PATTERN.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        LOG.warning("removed %d stale checkpoint temp file(s) in %s", len(removed), directory)
    return removed


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot load checkpoint {path} (weights_only=True): {exc}") from exc


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors/lists (weights_only-safe)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: NumPy and Python `random` seeded from the worker's torch seed
    (`base_seed + worker_id`, the base drawn from the loader's generator), so their draws differ per
    worker and epoch and a resumed run repeats them. torch >= 1.9 already does this in its worker
    loop; this makes it explicit and version-proof (SeedSequence: no correlated MT19937 streams)."""
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(np.random.SeedSequence(seed).generate_state(4))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
