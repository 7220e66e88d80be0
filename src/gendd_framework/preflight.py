"""Build the whole run once, before any stage trains, so a bad config fails in seconds, not after the
teacher stage: every registry name and keyword, logger, and then each listed stage's own preflight
check (`stage_hooks(preflight=...)`, stages/hooks.py), in order. The built-in checks build the models
and weights files, the method with its build-time shape probe, optimizer and schedule of every
training stage and `select`, and run each method once on a tiny batch (dry_run.py): prepare, one
training step with backward, predict.

Nothing here takes an optimizer step, reads a checkpoint's tensors into a model, or writes a file;
models are built with random weights on the CPU and thrown away, and every RNG is restored afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig
from torch import nn

from gendd_framework.config import plain
from gendd_framework.context import DataFacts
from gendd_framework.data.base import DataSplits
from gendd_framework.dry_run import DryRun
from gendd_framework.engine.checkpoint import rng_state, set_rng_state
from gendd_framework.engine.optim import build_optimizer
from gendd_framework.errors import ConfigError
from gendd_framework.models import build_model
from gendd_framework.registry import LOGGERS, SCHEDULERS, STAGES, check_kwargs, split_spec
from gendd_framework.runtime import optimizer_groups
from gendd_framework.stages.hooks import preflight_check, stage_entries


@dataclass
class StagePreflight:
    """What a stage's preflight check is given: the run config, the dry run, its stage key, and the
    modules the earlier stages' checks left in `models` (`teacher`, `student`, `method`), as the
    stages leave them in `ctx.models`."""

    cfg: DictConfig
    dry: DryRun
    stage: str = ""
    models: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.dry.num_classes

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self.dry.ctx.data.input_shape

    @property
    def facts(self) -> DataFacts:
        """The data facts methods are built with here (stand-in sample count: dry_run.py)."""
        return self.dry.facts

    def fresh_student(self) -> nn.Module:
        return build_model(self.cfg.student, num_classes=self.num_classes)

    def training(
        self,
        method: nn.Module,
        *,
        name: str,
        optim: Any,
        sched: Any,
        epochs: int,
        stage: str | None = None,
        where: str | None = None,
        select: str | None = None,
        all_labels: bool = False,
    ) -> None:
        """What `fit_method` does with `method` before its first step (param groups holding every
        trainable parameter, optimizer, schedule), then the method's dry run."""
        stage = stage or self.stage
        groups = optimizer_groups(method, optim, stage)
        check_optimisation(optim, sched, groups, epochs, where or stage)
        self.dry.check(method, stage=stage, name=name, select=select, all_labels=all_labels, epochs=epochs)


def check_optimisation(optim: Any, sched: Any, groups: list[dict], epochs: int, where: str) -> None:
    """Build the optimizer on the param groups and its LR schedule, as `fit_method` will."""
    try:
        optimizer = build_optimizer(optim, groups)
        SCHEDULERS.build(plain(sched), optimizer=optimizer, steps_per_epoch=10, epochs=epochs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def preflight(cfg: DictConfig, data: DataSplits, loader_cfg: dict[str, Any]) -> None:
    """Raise for anything the run would fail on later; cheap (no optimizer step, a 2-sample dry run per
    training stage, no data pass). Every RNG is as it was when this returns."""
    saved = rng_state()
    try:
        _preflight(cfg, DryRun(cfg, data, loader_cfg))
    finally:
        set_rng_state(saved)


def _preflight(cfg: DictConfig, dry: DryRun) -> None:
    entries = stage_entries(cfg)
    for _, name, kwargs in entries:
        check_kwargs(STAGES.get(name), {"ctx": None, **kwargs}, f"stage '{name}'")
    for spec in (cfg.get("logger") or {}).get("backends") or []:
        name, kwargs = split_spec(spec, "logger")
        check_kwargs(LOGGERS.get(name), {"run_dir": "", **kwargs}, f"logger '{name}'")
    state = StagePreflight(cfg, dry)
    for key, name, kwargs in entries:
        check = preflight_check(name)
        if check is not None:
            state.stage = key
            check(state, **kwargs)
