"""Teacher-output cache (`trainer.teacher_cache`): a step reads the frozen teacher's taps by sample.

The correctness rule: a cached output is only ever used for the very input it was computed from.

- The cache folder is keyed by a hash of the teacher (every weight and buffer, its class and taps),
  the data config and a description of the training transform, the cache mode, replay seed and view
  count, and the numerics (autocast precision, channels_last, teacher compile, device type). Another
  teacher, transform or dataset gets another folder: nothing is ever reused across them.
- Inside a folder an entry is addressed by `(view, index)`: `index` is the sample's position in the
  training split, `view` which augmented draw of it the student saw.
- Every entry stores a fingerprint of its input (two float64 sums per sample); a read whose batch input
  differs from the fingerprint raises instead of returning another view's teacher output.
- Only what the cache can prove it keyed is cached: the tensor the teacher is called on must be one of
  the batch's own tensors (`batch["input"]`, or a view such as `batch["input_1"]`, stored apart), and
  the teacher must be frozen: a method declaring `teacher_is_frozen = False` (an EMA teacher) gets no
  cache, and a teacher whose weights change in place (tensor version counters, confirmed by a digest),
  that is replaced or put in train mode turns the cache off for the rest of the run. Any other input
  (a mixed or sliced tensor) is computed and counted as `bypassed`. Each decision is logged once and
  recorded in the stage's summary (`teacher_cache`).

Modes:
- `deterministic`: one view per sample. Allowed only when the training transform is deterministic
  (checked at start: two draws of the same samples must agree), e.g. `data.augment=false`.
- `replay`: random augmentation made replayable. Each sample's augmentation draws come from RNGs seeded
  by `(seed, view, index)` (torch, Python `random` and NumPy, restored afterwards), view = epoch mod
  `views` (null: one view per epoch). The student and the cached teacher then see the same draw, in
  this run and every later run with the same seed. The augmentation stream no longer depends on the
  run's seed (that is what lets other seeds reuse the cache); the batch order still does.

Entries are filled lazily: a batch with any sample missing runs the teacher on the whole batch (the
uncached computation, so a filling run's losses equal an uncached run's) and stores the new samples;
a batch whose samples are all present skips the teacher. Views are saved as
`<dir>/<key>/view_<v>.pt` (`view_<v>.<batch key>.pt` for `input_1`, ...) when the epoch moves on and at
the end of training, after checking that the teacher's weights still hash to the key's digest (a
teacher changed behind the version counters, e.g. through `.data`, stops the run instead).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from gendd_framework.data.replay import ReplayViews, check_deterministic, describe_transform
from gendd_framework.engine.checkpoint import atomic_save
from gendd_framework.engine.statistics import weights_digest
from gendd_framework.engine.teacher_store import TeacherWatch, ViewStore, fingerprint, load_store
from gendd_framework.errors import ConfigError
from gendd_framework.schema import CACHE_DTYPES, CacheConfig, SpeedConfig, TrainerConfig

__all__ = ["CacheConfig", "TeacherCache", "RefusedCache", "TeacherWatch", "ViewStore", "fingerprint"]

LOG = logging.getLogger("gendd_framework")
DTYPES = {name: getattr(torch, name) for name in CACHE_DTYPES}
FINGERPRINT_RTOL = 1e-9


# -- fingerprints and keys --------------------------------------------------------------------------
def cache_key(teacher: nn.Module, taps: list[str], recipe: Mapping[str, Any]) -> tuple[str, dict]:
    """(hex key, the recipe it hashes): teacher weights digest + class + taps + data/transform/numerics."""
    full = {
        "teacher": {
            "class": type(teacher).__name__,
            "weights": weights_digest(teacher),
            "taps": sorted(taps),
        },
        **recipe,
    }
    return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:20], full


# -- the cache --------------------------------------------------------------------------------------
class TeacherCache:
    """Teacher taps by (view, index) in `root/key/view_<v>.pt`; see the module docstring."""

    def __init__(
        self,
        root: str | Path,
        key: str,
        num_samples: int,
        *,
        dtype: str | None = None,
        verify: bool = True,
        mode: str = "deterministic",
        seed: int = 0,
        views: int = 1,
        watch: TeacherWatch | None = None,
    ) -> None:
        self.folder = Path(root).expanduser() / key
        self.key, self.num_samples, self.verify = key, int(num_samples), verify
        self.mode, self.seed, self.views = mode, int(seed), int(views)  # how the loader draws views
        self.dtype = DTYPES[dtype] if dtype else None
        self.watch = watch
        self.view: int | None = None
        self.stores: dict[str, ViewStore] = {}  # the current view's stores, by batch key
        self.hits = self.misses = self.bypassed = 0
        self.off: str | None = None  # why the cache turned itself off (None: on)
        self._bypass_noted = False

    def path(self, view: int, key: str = "input") -> Path:
        return self.folder / (f"view_{view}.pt" if key == "input" else f"view_{view}.{key}.pt")

    def _select(self, view: int, key: str = "input") -> ViewStore:
        if self.view != view:
            self.flush()
            self.stores, self.view = {}, view
        if key not in self.stores:
            path = self.path(view, key)
            self.stores[key] = (
                ViewStore.from_state(load_store(path)) if path.is_file() else ViewStore(self.num_samples)
            )
        return self.stores[key]

    def turn_off(self, reason: str) -> None:
        """Stop reading and writing for the rest of the run (entries saved so far stay valid)."""
        if self.off is None:
            self.off = reason
            LOG.warning("teacher cache off: %s; the teacher runs on every batch from now on", reason)
            for store in self.stores.values():
                store.dirty = False  # entries of this view may postdate the change: never saved

    def lookup(
        self,
        batch: Mapping[str, Any],
        compute: Callable[[], dict[str, torch.Tensor]],
        x: torch.Tensor | None = None,
        teacher: nn.Module | None = None,
    ) -> dict:
        """The teacher taps of `x` (default `batch["input"]`): read when every sample is cached, else
        `compute()` and store. `x` must be one of the batch's tensors, else it is computed uncached."""
        if self.off is not None:
            return compute()
        key = "input" if x is None else next((k for k, v in batch.items() if v is x), None)
        if key is None:
            self.bypassed += 1
            if not self._bypass_noted:
                self._bypass_noted = True
                LOG.info(
                    "teacher cache: the teacher was called on a tensor that is not one of the batch's "
                    "(%s); such calls are computed, never cached",
                    ", ".join(map(str, batch)),
                )
            return compute()
        reason = self.watch.changed(teacher) if self.watch is not None else None
        if reason is not None:
            self.turn_off(reason)
            return compute()
        index = batch.get("index")
        x = batch[key]
        if not isinstance(index, torch.Tensor):
            return compute()
        views = batch.get("view")
        view = int(views.reshape(-1)[0]) if isinstance(views, torch.Tensor) else int(views or 0)
        if isinstance(views, torch.Tensor) and not bool((views == view).all()):
            return compute()  # a batch mixing views (never built by the loop): no cache
        idx = index.reshape(-1).cpu()
        if int(idx.max()) >= self.num_samples or int(idx.min()) < 0:
            raise ConfigError(
                f"teacher cache: batch index {int(idx.max())} outside the training split "
                f"({self.num_samples} samples); the cache reads only training batches"
            )
        store = self._select(view, key)
        prints = fingerprint(x).cpu()
        known = store.filled[idx]
        if self.verify and bool(known.any()):
            self._check(store, idx[known], prints[known], view)
        if bool(known.all()) and store.taps:
            self.hits += 1
            return store.read(idx, x.device)
        self.misses += 1
        out = compute()
        self._put(store, idx, known, out, prints)
        return out

    def _check(self, store: ViewStore, idx: torch.Tensor, prints: torch.Tensor, view: int) -> None:
        stored = store.prints[idx]
        scale = stored.abs().clamp_min(1.0)
        bad = ((stored - prints).abs() > FINGERPRINT_RTOL * scale).any(dim=1)
        if bool(bad.any()):
            sample = int(idx[bad][0])
            raise ConfigError(
                f"teacher cache {self.folder}: sample {sample} (view {view}) differs from the input its "
                "teacher output was cached for; the training transform is not what the cache key "
                "describes (a code change in a transform or dataset?). Delete the folder or set "
                "trainer.teacher_cache.mode=off"
            )

    def _put(self, store: ViewStore, idx: torch.Tensor, known: torch.Tensor, out: Mapping, prints) -> None:
        new = idx[~known]
        if not len(new):
            return
        rows = (~known).nonzero().reshape(-1)
        for key, value in out.items():
            if not isinstance(value, torch.Tensor) or value.shape[:1] != idx.shape:
                continue
            value = value.detach()
            if key not in store.taps:
                dtype = self.dtype or value.dtype
                store.taps[key] = torch.zeros((self.num_samples, *value.shape[1:]), dtype=dtype)
                store.dtypes[key] = str(value.dtype).removeprefix("torch.")
            store.taps[key][new] = value.index_select(0, rows.to(value.device)).to(
                "cpu", store.taps[key].dtype
            )
        store.prints[new] = prints[~known]
        store.filled[new] = True
        store.dirty = True

    def flush(self) -> None:
        """Save the current view's stores that gained entries (merged with what other runs saved
        meanwhile), once the teacher is confirmed unchanged."""
        dirty = {k: s for k, s in self.stores.items() if s.dirty}
        if not dirty or self.view is None:
            return
        if self.watch is not None and not self.watch.same_weights():
            self.turn_off("the teacher's weights changed behind its version counters (a `.data` write?)")
            raise ConfigError(
                f"teacher cache {self.folder}: the teacher's weights changed during training, so cached "
                "outputs were stale; declare `teacher_is_frozen = False` on the method (nothing was saved)"
            )
        for key, store in dirty.items():
            path = self.path(self.view, key)
            if path.is_file():
                store.merge(ViewStore.from_state(load_store(path)))
            atomic_save(store.state(), path)
            store.dirty = False

    def stats(self) -> dict[str, Any]:
        """What the stage summary records: on/off (and why), hits, misses, bypassed calls, where."""
        state = {"state": "off", "reason": self.off} if self.off else {"state": "on"}
        counts = {"hits": self.hits, "misses": self.misses, "bypassed": self.bypassed}
        return {**state, "mode": self.mode, **counts, "key": self.key, "folder": str(self.folder)}


class RefusedCache:
    """A cache the method's declarations rule out (e.g. `teacher_is_frozen = False`): every lookup
    computes; `stats()` says why, so the stage summary records it."""

    def __init__(self, mode: str, reason: str) -> None:
        self.mode, self.off = mode, reason
        LOG.warning("teacher cache off: %s", reason)

    def lookup(self, batch: Mapping[str, Any], compute: Callable[[], dict], **_: Any) -> dict:
        return compute()

    def flush(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"state": "off", "reason": self.off, "mode": self.mode}


# -- wiring -----------------------------------------------------------------------------------------
def attach_teacher_cache(
    method: nn.Module,
    config: CacheConfig | Mapping[str, Any] | None,
    *,
    train_dataset: Dataset,
    data_config: Mapping[str, Any],
    numerics: Mapping[str, Any],
    default_dir: str | Path | None,
    epochs: int,
) -> TeacherCache | None:
    """Build the cache for `method`'s teacher and attach it (`method.teacher_cache`); None when the
    mode is off or the method has no teacher, a `RefusedCache` when the method declares a teacher that
    changes (`teacher_is_frozen = False`) or the teacher is in train mode. `numerics` names what
    changes the teacher's arithmetic (precision, channels_last, teacher compile, device type)."""
    config = CacheConfig.from_mapping(config)
    tap = getattr(method, "teacher", None)
    if config.mode == "off" or tap is None:
        return None
    refusal = None
    if not getattr(method, "teacher_is_frozen", True):
        refusal = f"method {type(method).__name__} declares teacher_is_frozen = False (its teacher changes)"
    elif getattr(tap, "model", tap).training:
        refusal = "the teacher runs in train mode (dropout or batch statistics change its outputs)"
    if refusal is not None:
        method.teacher_cache = RefusedCache(config.mode, refusal)
        return method.teacher_cache
    folder = config.dir or default_dir
    if folder is None:
        raise ConfigError(
            "trainer.teacher_cache needs a folder: set trainer.teacher_cache.dir or paths.cache_dir"
        )
    if config.mode == "deterministic":
        check_deterministic(train_dataset)
    views = 1 if config.mode == "deterministic" else int(config.views or epochs)
    data = {k: v for k, v in dict(data_config).items() if k != "loader"}
    recipe = {
        "data": data,
        "num_samples": len(train_dataset),
        "transform": describe_transform(train_dataset),
        "mode": config.mode,
        "replay": {"seed": config.seed, "views": views} if config.mode == "replay" else None,
        "numerics": dict(numerics),
        "dtype": config.dtype,
    }
    model = getattr(tap, "model", tap)
    key, full = cache_key(model, list(getattr(tap, "taps", ["logits"])), recipe)
    cache = TeacherCache(
        folder,
        key,
        len(train_dataset),
        dtype=config.dtype,
        verify=config.verify,
        mode=config.mode,
        seed=config.seed,
        views=views,
        watch=TeacherWatch(tap, full["teacher"]["weights"]),
    )
    cache.folder.mkdir(parents=True, exist_ok=True)
    meta = cache.folder / "meta.json"
    if not meta.exists():
        meta.write_text(json.dumps(full, indent=2, sort_keys=True, default=str) + "\n")
    method.teacher_cache = cache
    return cache


def wrap_train_dataset(dataset: Dataset, cache: TeacherCache | RefusedCache | None) -> Dataset:
    """The training dataset the loader should serve: replayable views in replay mode, else unchanged."""
    if not isinstance(cache, TeacherCache) or cache.mode != "replay":
        return dataset
    return ReplayViews(dataset, cache.seed, cache.views)


def cache_for_run(
    method: nn.Module,
    trainer: TrainerConfig,
    *,
    root: Path | None,
    data_config: Mapping[str, Any],
    device: torch.device,
    train_dataset: Dataset,
) -> TeacherCache | RefusedCache | None:
    """`attach_teacher_cache` with a run's settings, as plain values: `trainer.teacher_cache`, the
    numerics of `trainer.precision` / `trainer.speed` on `device`, the data config and training split,
    and `root` (`<paths.cache_dir>/teacher_outputs`) as the folder when `teacher_cache.dir` is null."""
    config = CacheConfig.from_mapping(trainer.teacher_cache)
    if config.mode == "off" or getattr(method, "teacher", None) is None:
        return None
    speed = SpeedConfig.from_mapping(trainer.speed)
    if config.mode == "replay" and speed.persistent_workers:
        raise ConfigError(
            "trainer.teacher_cache.mode=replay needs trainer.speed.persistent_workers=false: persistent "
            "workers keep the dataset copy of their first epoch and would replay that epoch's views"
        )
    numerics = {
        "precision": trainer.precision,
        "channels_last": speed.channels_last,
        "compile_teacher": speed.compile.kwargs() if speed.compile.teacher else None,
        "device": torch.device(device).type,
    }
    return attach_teacher_cache(
        method,
        config,
        train_dataset=train_dataset,
        data_config=data_config,
        numerics=numerics,
        default_dir=root,
        epochs=trainer.epochs,
    )
