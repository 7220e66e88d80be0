"""Atomic checkpoints with every RNG state, loaded with `weights_only=True` (loading runs no code), and
the crash test hook (`kill_point`) that resume tests use to stop a run at an exact point."""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from gendd_framework.errors import ConfigError

LOG = logging.getLogger("gendd_framework")
# atomic_save's temp names: mkstemp(prefix=".<target>.", suffix=".tmp") adds 8 random [a-z0-9_]
TMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
KILL_FILE_ENV = "GENDD_TEST_KILL_FILE"


def kill_point(*parts: object) -> None:
    """Test hook, inert unless $GENDD_TEST_KILL_FILE names a file: when this point is that file's first
    line, drop the line and signal this process (`<point> [SIGNAL]`, default KILL, e.g. `distill:epoch:2
    USR2`). A relaunched run finds the next line, so one file crashes a run at exact points in turn.
    Points: `preflight` (config_resolved.yaml written, no stage run), `<stage>:step:<n>` (after
    optimizer step n), `<stage>:epoch:<e>` (epoch e evaluated and logged, its checkpoint not yet
    saved), `save:<file name>` (temp file complete, not yet renamed), `finish` (stages done, nothing
    of the end written)."""
    path = os.environ.get(KILL_FILE_ENV)
    if not path or not os.path.isfile(path):
        return
    with open(path) as fh:
        lines = fh.read().splitlines()
    head = lines[0].split() if lines else []
    if not head or head[0] != ":".join(str(p) for p in parts):
        return
    with open(path, "w") as fh:  # consumed before the signal: a requeued process runs past this point
        fh.write("".join(line + "\n" for line in lines[1:]))
    LOG.warning("test hook %s: %s at %s", KILL_FILE_ENV, head[1] if len(head) > 1 else "KILL", head[0])
    os.kill(os.getpid(), getattr(signal, "SIG" + (head[1] if len(head) > 1 else "KILL")))


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through `write(file)` to a temp file in the same folder, fsync, then rename: a crash never
    leaves half a file. The file gets the usual permissions (0666 minus the umask), not mkstemp's 0600,
    so the people sharing a cluster folder can read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        kill_point("save", path.name)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save` through `atomic_write`."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


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
