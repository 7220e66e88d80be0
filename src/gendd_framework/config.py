"""Start-up validation of the composed config: a typo fails at once with the key's name.

Hydra's struct mode already rejects unknown `key=value` overrides; this catches what YAML files
(experiments, user configs) add or forget, before any data is read or model built.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from gendd_framework.engine.trainer import TrainerConfig
from gendd_framework.errors import ConfigError

REQUIRED_TOP = ("data", "student", "method", "optim", "sched", "trainer", "seed", "stages")
OPTIONAL_TOP = (
    "teacher", "logger", "plugins", "paths", "name", "eval", "pretrain", "hydra", "notes", "recipe"
)  # fmt: skip
TRAINER_EXTRA = ("device",)
TEACHER_KEYS = ("model", "weights", "cache_dir", "train_if_missing", "train", "members", "combine", "run_dir")
MEMBER_KEYS = ("model", "weights", "train", "cache_dir", "train_if_missing")
LOGGER_KEYS = ("backends",)


def _check_keys(node: DictConfig, allowed: Iterable[str], where: str) -> None:
    allowed = list(allowed)
    for key in node:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{where}{key}'{hint}; allowed: {', '.join(allowed)}")


def _check_named(node, where: str) -> None:
    if not isinstance(node, DictConfig) or "name" not in node:
        raise ConfigError(f"config '{where}' must be a mapping with a 'name' key, got {node!r}")


def validate(cfg: DictConfig) -> None:
    """Raise `ConfigError` for unknown or missing top-level keys and malformed closed sections."""
    _check_keys(cfg, REQUIRED_TOP + OPTIONAL_TOP, "")
    missing = [k for k in REQUIRED_TOP if k not in cfg or cfg[k] is None]
    if missing:
        raise ConfigError(f"missing config key(s): {', '.join(missing)}")
    for key in ("data", "student", "method", "optim", "sched"):
        _check_named(cfg[key], key)
    trainer_fields = [f.name for f in dataclasses.fields(TrainerConfig)] + list(TRAINER_EXTRA)
    _check_keys(cfg.trainer, trainer_fields, "trainer.")
    if cfg.get("teacher") is not None:
        _check_keys(cfg.teacher, TEACHER_KEYS, "teacher.")
        members = cfg.teacher.get("members") or []
        for i, member in enumerate(members):
            _check_keys(member, MEMBER_KEYS, f"teacher.members.{i}.")
            _check_named(member.get("model"), f"teacher.members.{i}.model")
        if cfg.teacher.get("model") is not None or not (members or cfg.teacher.get("run_dir")):
            _check_named(cfg.teacher.get("model"), "teacher.model")
    if cfg.get("logger") is not None:
        _check_keys(cfg.logger, LOGGER_KEYS, "logger.")
    missing_values = OmegaConf.missing_keys(cfg)
    if missing_values:
        raise ConfigError(f"config values still '???' (must be set): {', '.join(sorted(missing_values))}")


def apply_recipe(cfg: DictConfig) -> DictConfig:
    """Merge the method's `per_recipe[<cfg.recipe>]` values into the method node and drop the table.

    Per-pair and per-dataset settings (GenDD's λ per CIFAR pair, DKD's β per pair, the digits head)
    live with the method that owns them, so an experiment names its recipe once (`recipe:
    cifar100/resnet56_resnet20`) and works with every method: `experiment=... method=dkd`.
    """
    method = cfg.get("method")
    if not isinstance(method, DictConfig) or "per_recipe" not in method:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        table = cfg.method.pop("per_recipe") or {}
        recipe = cfg.get("recipe")
        if recipe is not None and recipe in table:
            cfg.method = OmegaConf.merge(cfg.method, table[recipe])
    return cfg


def run_config_path(run_dir: Path) -> Path | None:
    """A finished run's config: `config_resolved.yaml` (written by every run), else Hydra's copy."""
    for path in (run_dir / "config_resolved.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            return path
    return None


def trainer_config(node: DictConfig | dict, **overrides) -> TrainerConfig:
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    values = {k: v for k, v in values.items() if k not in TRAINER_EXTRA}
    values.update(overrides)
    return TrainerConfig(**values)
