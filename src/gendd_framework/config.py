"""Start-up validation of the composed config: a typo fails at once with the key's name.

Hydra's struct mode already rejects unknown `key=value` overrides; this catches what YAML files
(experiments, user configs) add or forget, before any data is read or model built.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gendd_framework.config_checks import check_values, unresolvable
from gendd_framework.engine.speed import KEYS_COMPILE, KEYS_SPEED
from gendd_framework.engine.teacher_cache import KEYS as CACHE_KEYS
from gendd_framework.engine.trainer import TrainerConfig
from gendd_framework.errors import ConfigError

REQUIRED_TOP = ("data", "student", "method", "optim", "sched", "trainer", "seed", "stages")
OPTIONAL_TOP = (
    "teacher", "logger", "plugins", "paths", "name", "eval", "pretrain", "hint", "hydra", "notes", "recipe"
)  # fmt: skip
TRAINER_EXTRA = ("device",)
TEACHER_KEYS = ("model", "weights", "cache_dir", "train_if_missing", "train", "members", "combine", "run_dir")
MEMBER_KEYS = ("model", "weights", "train", "cache_dir", "train_if_missing")
TRAIN_KEYS = ("seed", "epochs", "optim", "sched")
PRETRAIN_KEYS = ("handover", "epochs", "optim", "sched")
HINT_KEYS = ("epochs", "optim", "sched", "student_layers", "teacher_layers", "regressor")
LOADER_KEYS = ("batch_size", "eval_batch_size", "num_workers", "pin_memory")
LOGGER_KEYS = ("backends",)


def _check_keys(node: Any, allowed: Iterable[str], where: str) -> None:
    """Closed sections: an unknown key is a typo, reported with the closest allowed key."""
    if not isinstance(node, DictConfig):
        return  # a wrong type (or null) is reported by the value rules with the key's name
    allowed = list(allowed)
    for key in node:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{where}{key}'{hint}; allowed: {', '.join(allowed)}")


def _closed_sections(cfg: DictConfig) -> Iterator[tuple[Any, tuple[str, ...], str]]:
    """(node, allowed keys, dotted prefix) for every section whose keys the framework fixes."""
    trainer_fields = tuple(f.name for f in dataclasses.fields(TrainerConfig)) + TRAINER_EXTRA
    yield cfg.trainer, trainer_fields, "trainer."
    if isinstance(cfg.trainer, DictConfig):
        speed = cfg.trainer.get("speed")
        yield speed, KEYS_SPEED, "trainer.speed."
        if isinstance(speed, DictConfig):
            yield speed.get("compile"), KEYS_COMPILE, "trainer.speed.compile."
        yield cfg.trainer.get("teacher_cache"), CACHE_KEYS, "trainer.teacher_cache."
    data = cfg.data if isinstance(cfg.data, DictConfig) else None
    if data is not None and data.get("loader") is not None:
        yield data.loader, LOADER_KEYS, "data.loader."
    teacher = cfg.get("teacher")
    if isinstance(teacher, DictConfig):
        yield teacher, TEACHER_KEYS, "teacher."
        if teacher.get("train") is not None:
            yield teacher.train, TRAIN_KEYS, "teacher.train."
        members = teacher.get("members")
        for i, member in enumerate(members if isinstance(members, ListConfig) else []):
            yield member, MEMBER_KEYS, f"teacher.members.{i}."
            if isinstance(member, DictConfig) and member.get("train") is not None:
                yield member.train, TRAIN_KEYS, f"teacher.members.{i}.train."
    if cfg.get("pretrain") is not None:
        yield cfg.pretrain, PRETRAIN_KEYS, "pretrain."
    if cfg.get("hint") is not None:
        yield cfg.hint, HINT_KEYS, "hint."
    if cfg.get("logger") is not None:
        yield cfg.logger, LOGGER_KEYS, "logger."


def validate(cfg: DictConfig) -> None:
    """Raise a one-line `ConfigError` for the first unknown, missing, unset (`???`) or ill-typed key,
    before any data is read or model built (value rules: `config_checks.RULES`)."""
    _check_keys(cfg, REQUIRED_TOP + OPTIONAL_TOP, "")
    missing = [k for k in REQUIRED_TOP if k not in cfg or cfg[k] is None]
    if missing:
        raise ConfigError(f"missing config key(s): {', '.join(missing)}")
    try:  # resolves every value once: a broken interpolation is named by its key here
        missing_values = OmegaConf.missing_keys(cfg)
    except OmegaConfBaseException as err:
        raise unresolvable(err) from None
    for node, allowed, where in _closed_sections(cfg):
        _check_keys(node, allowed, where)
    if missing_values:
        raise ConfigError(f"config values still '???' (must be set): {', '.join(sorted(missing_values))}")
    check_values(cfg)


def plain(node: Any) -> Any:
    """A config node as plain Python containers (interpolations resolved); other values unchanged."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig | ListConfig) else node


def apply_recipe(cfg: DictConfig, overrides: Iterable[str] = ()) -> DictConfig:
    """Merge the method's `per_recipe[<cfg.recipe>]` values into the method node and drop the table.

    Per-pair and per-dataset settings (GenDD's λ per CIFAR pair, DKD's β per pair, the digits head)
    live with the method that owns them, so an experiment names its recipe once (`recipe:
    cifar100/resnet56_resnet20`) and works with every method: `experiment=... method=dkd`. The
    command line still wins: `method.*` keys and `method/<group>` choices named in `overrides` (the
    job's Hydra overrides) keep the values the user gave.
    """
    method = cfg.get("method")
    if not isinstance(method, DictConfig) or "per_recipe" not in method:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        table = cfg.method.pop("per_recipe") or {}
        # a variant's defining values (gendd_unsup's lam=0) are never replaced by its parent's table
        fixed = list(cfg.method.pop("recipe_keeps", None) or [])
        recipe = cfg.get("recipe")
        if recipe is None or recipe not in table:
            return cfg
        kept = {path: OmegaConf.select(cfg, path) for path in user_method_keys(overrides)}
        entry = OmegaConf.masked_copy(table[recipe], [k for k in table[recipe] if k not in fixed])
        cfg.method = OmegaConf.merge(cfg.method, entry)
        for path, value in kept.items():
            if value is not None:
                OmegaConf.update(cfg, path, value, merge=False, force_add=True)
    return cfg


def user_method_keys(overrides: Iterable[str]) -> list[str]:
    """Config paths under `method` that command-line overrides set (`method.lam=0.5` -> method.lam,
    `method/sampler=euler` -> method.sampler)."""
    paths = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("method.") or key.startswith("method/"):
            paths.append(key.replace("/", "."))
    return paths


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
