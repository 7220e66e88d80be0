"""The run config's schema: the keys, defaults and allowed values of the sections the framework fixes.

Start-up validation (`config.py`, `config_checks.py`), the engine (trainer, speed options, teacher-output
cache) and the runtime all read these sections; this module sits below all of them and imports none,
so each key list, default and allowed value is written once. What the engine receives is plain values
built here (`TrainerConfig`, `SpeedConfig`, `CacheConfig`), never the run config itself.

The YAML presets under `conf/` (`trainer/default.yaml`, each dataset's `loader:`) spell these defaults
out so the command line can override any key; `tests/test_defaults_agree.py` checks they agree.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from gendd_framework.errors import ConfigError

# -- top level and the closed sections (an unknown key is a typo) -----------------------------------
REQUIRED_TOP = ("data", "student", "method", "optim", "sched", "trainer", "seed", "stages")
OPTIONAL_TOP = (
    "teacher", "logger", "plugins", "paths", "name", "eval", "pretrain", "hint", "hydra", "notes", "recipe"
)  # fmt: skip
TEACHER_KEYS = ("model", "weights", "cache_dir", "train_if_missing", "train", "members", "combine", "run_dir")
MEMBER_KEYS = ("model", "weights", "train", "cache_dir", "train_if_missing")
TRAIN_KEYS = ("seed", "epochs", "optim", "sched")
PRETRAIN_KEYS = ("handover", "epochs", "optim", "sched")
HINT_KEYS = ("epochs", "optim", "sched", "student_layers", "teacher_layers", "regressor")
LOGGER_KEYS = ("backends",)

# -- allowed values ----------------------------------------------------------------------------------
PRECISIONS = ("fp32", "bf16", "fp16")  # trainer.precision (autocast dtype)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TEACHER_MODES = ("inference", "no_grad")  # trainer.speed.teacher_mode
CACHE_MODES = ("off", "deterministic", "replay")  # trainer.teacher_cache.mode
CACHE_DTYPES = ("float32", "float16", "bfloat16")  # trainer.teacher_cache.dtype (torch dtype names)
COMBINE = ("probs", "logits")  # teacher.combine: how an ensemble teacher's members are combined
DEFAULT_COMBINE = "probs"

# -- data.loader ---------------------------------------------------------------------------------------
LOADER_DEFAULTS: dict[str, Any] = {
    "batch_size": 64,
    "eval_batch_size": 256,
    "num_workers": 0,
    "pin_memory": None,
}
LOADER_KEYS = tuple(LOADER_DEFAULTS)


def closed(node: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """An unknown key of a closed section fails in one line, with the closest allowed key."""
    for key in node:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{where}{key}'{hint}; allowed: {', '.join(allowed)}")


def plain(node: Any) -> Any:
    """A config node as plain Python containers (interpolations resolved); other values unchanged."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig | ListConfig) else node


def loader_config(node: Mapping[str, Any] | None) -> dict[str, Any]:
    """`data.loader` merged over `LOADER_DEFAULTS`; an unknown key fails naming the allowed ones."""
    node = dict(plain(node) or {})
    closed(node, LOADER_KEYS, "data.loader.")
    return {**LOADER_DEFAULTS, **node}


# -- paths -----------------------------------------------------------------------------------------------
def cache_dir(paths: Mapping[str, Any] | None) -> Path | None:
    """`paths.cache_dir` expanded (its one default, $GENDD_CACHE_DIR or a folder in the user's home, is
    in conf/train.yaml); None when a config sets none."""
    value = (plain(paths) or {}).get("cache_dir")
    return Path(str(value)).expanduser() if value else None


# -- trainer.speed -----------------------------------------------------------------------------------
def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' = {value!r}: must be true or false")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class CompileOptions:
    """Which parts `torch.compile` compiles, and how (`mode` / `backend` / `dynamic` / `fullgraph`)."""

    student: bool = False
    teacher: bool = False
    head: bool = False
    mode: str = "default"
    backend: str = "inductor"
    dynamic: bool | None = None
    fullgraph: bool = False

    @property
    def any(self) -> bool:
        return self.student or self.teacher or self.head

    @classmethod
    def from_mapping(
        cls, node: Mapping[str, Any] | None, where: str = "trainer.speed.compile"
    ) -> CompileOptions:
        node = dict(plain(node) or {})
        closed(node, KEYS_COMPILE, f"{where}.")
        for key in ("student", "teacher", "head", "fullgraph"):
            if key in node:
                _flag(node[key], f"{where}.{key}")
        if node.get("mode", "default") not in COMPILE_MODES:
            raise ConfigError(
                f"config key '{where}.mode' = {node['mode']!r}: must be one of {', '.join(COMPILE_MODES)}"
            )
        if not isinstance(node.get("backend", "inductor"), str) or not node.get("backend", "inductor"):
            raise ConfigError(f"config key '{where}.backend' = {node['backend']!r}: must be a backend name")
        if node.get("dynamic") is not None:
            _flag(node["dynamic"], f"{where}.dynamic")
        return cls(**node)

    def kwargs(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "backend": self.backend,
            "dynamic": self.dynamic,
            "fullgraph": self.fullgraph,
        }


@dataclass(frozen=True)
class SpeedConfig:
    """The `trainer.speed` node (what each option does: engine/speed.py)."""

    channels_last: bool = False
    compile: CompileOptions = field(default_factory=CompileOptions)
    teacher_mode: str = "no_grad"
    head_checkpointing: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = None

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any] | SpeedConfig | None) -> SpeedConfig:
        """Parse `trainer.speed` (None: all defaults); a bad key or value raises a ConfigError naming it."""
        if isinstance(node, SpeedConfig):
            return node
        node = dict(plain(node) or {})
        closed(node, KEYS_SPEED, "trainer.speed.")
        for key in ("channels_last", "head_checkpointing", "persistent_workers"):
            if key in node:
                _flag(node[key], f"trainer.speed.{key}")
        if node.get("teacher_mode", "no_grad") not in TEACHER_MODES:
            raise ConfigError(
                f"config key 'trainer.speed.teacher_mode' = {node['teacher_mode']!r}: must be one of "
                + ", ".join(TEACHER_MODES)
            )
        prefetch = node.get("prefetch_factor")
        if prefetch is not None and (not _is_int(prefetch) or prefetch < 1):
            raise ConfigError(
                f"config key 'trainer.speed.prefetch_factor' = {prefetch!r}: must be null or >= 1"
            )
        node["compile"] = CompileOptions.from_mapping(node.get("compile"))
        return cls(**node)


KEYS_COMPILE = tuple(f.name for f in fields(CompileOptions))
KEYS_SPEED = tuple(f.name for f in fields(SpeedConfig))


# -- trainer.teacher_cache ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheConfig:
    """`trainer.teacher_cache`: mode off|deterministic|replay, folder, replay views/seed, storage dtype
    (what each does: engine/teacher_cache.py)."""

    mode: str = "off"
    dir: str | None = None  # null: <paths.cache_dir>/teacher_outputs
    views: int | None = None  # replay: distinct augmented views per sample (null: one per epoch)
    seed: int = 0  # replay: augmentation seed (independent of the run's seed)
    dtype: str | None = None  # null: as computed; float16/bfloat16 halve the storage (values rounded)
    verify: bool = True  # compare each cached sample's input fingerprint before using it

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any] | CacheConfig | None) -> CacheConfig:
        if isinstance(node, CacheConfig):
            return node
        node = dict(plain(node) or {})
        if node.get("mode") is False:  # an unquoted YAML `off`
            node["mode"] = "off"
        closed(node, CACHE_KEYS, "trainer.teacher_cache.")
        cfg = cls(**node)
        where = "config key 'trainer.teacher_cache"
        if cfg.mode not in CACHE_MODES:
            raise ConfigError(f"{where}.mode' = {cfg.mode!r}: must be one of {', '.join(CACHE_MODES)}")
        if cfg.views is not None and (not _is_int(cfg.views) or cfg.views < 1):
            raise ConfigError(f"{where}.views' = {cfg.views!r}: must be null or an integer >= 1")
        if not _is_int(cfg.seed):
            raise ConfigError(f"{where}.seed' = {cfg.seed!r}: must be an integer")
        if cfg.dtype is not None and cfg.dtype not in CACHE_DTYPES:
            raise ConfigError(
                f"{where}.dtype' = {cfg.dtype!r}: must be null or one of {', '.join(CACHE_DTYPES)}"
            )
        if not isinstance(cfg.verify, bool):
            raise ConfigError(f"{where}.verify' = {cfg.verify!r}: must be true or false")
        return cfg


CACHE_KEYS = tuple(f.name for f in fields(CacheConfig))


# -- trainer -------------------------------------------------------------------------------------------
@dataclass
class TrainerConfig:
    """Loop settings (the `trainer:` config group; conf/trainer/default.yaml spells them out)."""

    epochs: int = 60
    eval_every: int = 1
    grad_clip: float | None = None
    accum_steps: int = 1
    precision: str = "fp32"  # one of PRECISIONS
    progress: bool = True
    log_every: int = 20
    resume: bool | str = False  # true | false | auto (the pipeline decides what auto does: check_resume)
    select: str | None = None  # metric used for "best"; default: acc of the method's primary output
    sync_bn: bool = False  # DDP: BatchNorm statistics over the global batch (CUDA only)
    find_unused_parameters: bool = False  # DDP: allow optimised parameters without a gradient in a step
    speed: dict | None = None  # channels_last, compile, teacher_mode, ... (SpeedConfig)
    teacher_cache: dict | None = None  # off | deterministic | replay (CacheConfig)


TRAINER_EXTRA = ("device",)  # trainer keys read by the pipeline, not by the loop
TRAINER_KEYS = tuple(f.name for f in dataclasses.fields(TrainerConfig)) + TRAINER_EXTRA


def trainer_config(node: Mapping[str, Any], **overrides: Any) -> TrainerConfig:
    """The loop settings of a `trainer:` node (interpolations resolved), `overrides` applied on top."""
    values = {k: v for k, v in dict(plain(node)).items() if k not in TRAINER_EXTRA}
    values.update(overrides)
    return TrainerConfig(**values)
