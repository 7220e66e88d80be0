"""What a registered stage declares besides how it runs, so built-in and plugin stages are treated alike.

    @STAGES.register("my_stage")
    @stage_hooks(preflight=check_my_stage, rebuild=rebuild_my_stage)
    def my_stage(ctx, stage_name="my_stage", **settings): ...

- `preflight(check, **settings)` runs before any stage trains, with the stage's own settings from
  `stages:` and a `StagePreflight` (`check.cfg`, `check.models` as the earlier stages' checks left
  them, `check.fresh_student()`, `check.training(method, ...)`, which dry-runs a method): it raises a
  `ConfigError` for anything the stage would fail on. A stage without one is only checked for its
  keyword names.
- `rebuild(cfg, stage_key, facts)` returns the method the stage trained, as modules without trained
  weights (its best checkpoint holds them): what `gendd-eval stage=<key>` and a later run's
  `teacher=from_run` load. A stage without one cannot be re-evaluated (a one-line error says so).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from gendd_framework.context import DataFacts
from gendd_framework.errors import ConfigError
from gendd_framework.registry import STAGES, split_spec

PreflightCheck = Callable[..., None]  # (check: StagePreflight, **settings) -> None
Rebuild = Callable[[Any, str, DataFacts], nn.Module]  # (run config, stage key, facts) -> method


def stage_hooks(
    *, preflight: PreflightCheck | None = None, rebuild: Rebuild | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator attaching a stage's preflight check and evaluation rebuild (see the module docstring)."""

    def decorator(stage: Callable[..., Any]) -> Callable[..., Any]:
        if preflight is not None:
            stage.preflight = preflight  # type: ignore[attr-defined]
        if rebuild is not None:
            stage.rebuild = rebuild  # type: ignore[attr-defined]
        return stage

    return decorator


def preflight_check(stage_name: str) -> PreflightCheck | None:
    """The preflight check a registered stage declares (None: none)."""
    return getattr(STAGES.get(stage_name), "preflight", None)


def stage_entries(cfg: Any) -> list[tuple[str, str, dict]]:
    """(key in summary.json and checkpoints, registered stage name, settings) per entry of `stages:`;
    a repeated stage must name itself (`stage_name`)."""
    entries: list[tuple[str, str, dict]] = []
    for spec in cfg.stages:
        name, kwargs = split_spec(spec, "stage")
        key = kwargs.get("stage_name", name)
        if key in (k for k, _, _ in entries):
            raise ConfigError(f"stage '{key}' appears twice in `stages`; give each a distinct stage_name")
        entries.append((key, name, kwargs))
    return entries


def stage_kind(cfg: Any, stage_key: str) -> str:
    """The registered stage behind a stage key (`gen2` -> `born_again`); the key itself if unlisted."""
    return next((name for key, name, _ in stage_entries(cfg) if key == stage_key), stage_key)


def kinds_before(cfg: Any, stage_key: str) -> list[str]:
    """Registered names of the stages listed before `stage_key` (all of them when it is not listed)."""
    entries = stage_entries(cfg)
    keys = [key for key, _, _ in entries]
    position = keys.index(stage_key) if stage_key in keys else len(entries)
    return [name for _, name, _ in entries[:position]]


def rebuild_stage_method(cfg: Any, stage_key: str, facts: DataFacts) -> nn.Module:
    """The method stage `stage_key` of a finished run's config trained, untrained (its `rebuild`)."""
    kind = stage_kind(cfg, stage_key)
    rebuild = getattr(STAGES.get(kind), "rebuild", None)
    if rebuild is None:
        raise ConfigError(
            f"stage '{stage_key}' ({kind}) declares no evaluation rebuild: only stages registered with "
            "stage_hooks(rebuild=...) (distill, born_again, reflow, ...) can be re-evaluated"
        )
    return rebuild(cfg, stage_key, facts)
