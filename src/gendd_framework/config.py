"""Start-up validation of the composed config: a typo fails at once with the key's name.

Hydra's struct mode already rejects unknown `key=value` overrides; this catches what YAML files
(experiments, user configs) add or forget, before any data is read or model built.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gendd_framework.config_checks import check_values, unresolvable
from gendd_framework.errors import ConfigError
from gendd_framework.schema import (  # noqa: F401  (plain, trainer_config: re-exported for the stages)
    CACHE_KEYS,
    HINT_KEYS,
    KEYS_COMPILE,
    KEYS_SPEED,
    LOADER_KEYS,
    LOGGER_KEYS,
    MEMBER_KEYS,
    OPTIONAL_TOP,
    PRETRAIN_KEYS,
    REQUIRED_TOP,
    TEACHER_KEYS,
    TRAIN_KEYS,
    TRAINER_KEYS,
    closed,
    plain,
    trainer_config,
)


def _check_keys(node: Any, allowed: Iterable[str], where: str) -> None:
    """Closed sections: an unknown key is a typo, reported with the closest allowed key."""
    if isinstance(node, DictConfig):  # a wrong type (or null) is reported by the value rules
        closed(node, tuple(allowed), where)


def _closed_sections(cfg: DictConfig) -> Iterator[tuple[Any, tuple[str, ...], str]]:
    """(node, allowed keys, dotted prefix) for every section whose keys the framework fixes."""
    yield cfg.trainer, TRAINER_KEYS, "trainer."
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
    """Config paths under `method` that the job's command-line overrides set (`method.lam=0.5` ->
    method.lam, `method/sampler=euler` -> method.sampler, or its `@package`).

    The overrides are read with Hydra's own grammar (quoting, `+`/`++` prefixes, sweeps, `@package`),
    for their keys only: the values kept are those Hydra already merged into the config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    paths = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if override.is_delete() or not key.startswith(("method.", "method/")):
            continue
        paths.append(override.package if "/" in key and override.package else key.replace("/", "."))
    return paths


def run_config_path(run_dir: Path) -> Path | None:
    """A finished run's config: `config_resolved.yaml` (written by every run), else Hydra's copy."""
    for path in (run_dir / "config_resolved.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            return path
    return None
