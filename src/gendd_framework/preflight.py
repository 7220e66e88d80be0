"""Build the whole run once, before any stage trains, so a bad config fails in seconds, not after the
teacher stage: every registry name and keyword, the models and their weights files, the method with
its build-time shape probe, optimizers and schedules of every training stage, loggers and `select`;
then each training stage's method runs once on a tiny batch (dry_run.py): prepare, one training step
with backward, predict.

Nothing here takes an optimizer step, reads a checkpoint's tensors into a model, or writes a file;
models are built with random weights on the CPU and thrown away, and every RNG is restored afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from gendd_framework.config import plain
from gendd_framework.data.base import DataSplits
from gendd_framework.dry_run import DryRun
from gendd_framework.engine.checkpoint import rng_state, set_rng_state
from gendd_framework.engine.optim import build_optimizer
from gendd_framework.errors import ConfigError
from gendd_framework.models import build_model
from gendd_framework.registry import LOGGERS, METHODS, SCHEDULERS, STAGES, check_kwargs, split_spec
from gendd_framework.runtime import build_method, check_parameters

EVAL_METRICS = ("acc", "ce", "ece", "agree", "kl")
TRAINING_STAGES = ("distill", "born_again")


def check_optimisation(optim: Any, sched: Any, groups: list[dict], epochs: int, where: str) -> None:
    """Build the optimizer on the param groups and its LR schedule, as `fit_method` will."""
    try:
        optimizer = build_optimizer(optim, groups)
        SCHEDULERS.build(plain(sched), optimizer=optimizer, steps_per_epoch=10, epochs=epochs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_training(
    dry: DryRun,
    method: nn.Module,
    *,
    stage: str,
    name: str,
    optim: Any,
    sched: Any,
    epochs: int,
    where: str | None = None,
    select: str | None = None,
    all_labels: bool = False,
) -> None:
    """What `fit_method` does with `method` before its first step (param groups, every trainable
    parameter in one, optimizer, schedule), then the method's dry run."""
    _, opt_kwargs = split_spec(optim, "optimizer")
    groups = method.param_groups(opt_kwargs.get("weight_decay", 0.0))
    check_parameters(method, groups, stage)
    check_optimisation(optim, sched, groups, epochs, where or stage)
    dry.check(method, stage=stage, name=name, select=select, all_labels=all_labels, epochs=epochs)


def teacher_weights_exist(tcfg: dict) -> None:
    nodes = tcfg.get("members") or [tcfg]
    for node in nodes:
        path = node.get("weights") if isinstance(node, dict) else None
        if path and not Path(str(path)).expanduser().is_file():
            raise ConfigError(f"teacher.weights: checkpoint file not found: {Path(str(path)).expanduser()}")


def teacher_for_preflight(cfg: DictConfig, num_classes: int, dry: DryRun) -> nn.Module | None:
    """The teacher's modules (random weights) and a check of what the teacher stage will need: each
    model it trains gets the `ce` method it trains with, checked like any training stage."""
    from gendd_framework.stages import teacher_architecture

    tcfg = plain(cfg.get("teacher"))
    if tcfg is None:
        return None
    teacher_weights_exist(tcfg)
    model = teacher_architecture(tcfg, num_classes)
    members = tcfg.get("members") or []
    shared = tcfg.get("train") or {}
    nodes = [{**shared, **(m.get("train") or {})} for m in members] if members else [tcfg.get("train")]
    models = list(model.members) if members else [model]
    trains = not tcfg.get("run_dir") and tcfg.get("train_if_missing", True)
    for i, (node, member) in enumerate(zip(nodes, models)):
        if not (trains and node) or (members[i] if members else tcfg).get("weights"):
            continue  # loaded from a file (or from an earlier run): nothing trains
        method = METHODS.build({"name": "ce"}, student=member)
        stage = f"teacher_{i}" if members else "teacher"
        check_training(
            dry,
            method,
            stage=stage,
            name="ce",
            optim=node["optim"],
            sched=node["sched"],
            epochs=int(node["epochs"]),
            where="teacher.train",
            all_labels=True,
        )
    return model


def check_hint_stage(
    cfg: DictConfig,
    stage_names: list[str],
    student: nn.Module,
    teacher: nn.Module | None,
    input_shape: tuple[int, ...],
    dry: DryRun,
) -> None:
    """FitNets' `hint` stage: its `hint:` node, a teacher stage before it, and its method (layers,
    regressor, guided path), optimizer and schedule, built as the stage will build them."""
    from gendd_framework.hint_stage import build_hint_method, hint_config

    node = hint_config(cfg)
    if teacher is None or "teacher" not in stage_names[: stage_names.index("hint")]:
        raise ConfigError("stage 'hint' needs a `teacher` stage before it")
    method = build_hint_method(cfg, student, teacher, input_shape)
    check_training(
        dry,
        method,
        stage="hint",
        name="fitnet_hint",
        optim=node["optim"],
        sched=node["sched"],
        epochs=int(node["epochs"]),
    )


def check_select(cfg: DictConfig, method: nn.Module) -> None:
    select = cfg.trainer.get("select")
    if select is None:
        return
    outputs = method.output_names()
    allowed = [f"{m}/{o}" for m in EVAL_METRICS for o in outputs]
    if select not in allowed:
        raise ConfigError(
            f"trainer.select='{select}' is not a validation metric of this method; allowed: {allowed}"
        )


def preflight(cfg: DictConfig, data: DataSplits, loader_cfg: dict[str, Any]) -> None:
    """Raise for anything the run would fail on later; cheap (no optimizer step, a 2-sample dry run per
    training stage, no data pass). Every RNG is as it was when this returns."""
    saved = rng_state()
    try:
        _preflight(cfg, data, DryRun(cfg, data, loader_cfg))
    finally:
        set_rng_state(saved)


def _preflight(cfg: DictConfig, data: DataSplits, dry: DryRun) -> None:
    num_classes, input_shape = data.num_classes, data.input_shape
    stage_names = []
    for spec in cfg.stages:
        name, kwargs = split_spec(spec, "stage")
        check_kwargs(STAGES.get(name), {"ctx": None, **kwargs}, f"stage '{name}'")
        stage_names.append(name)
    for spec in (cfg.get("logger") or {}).get("backends") or []:
        name, kwargs = split_spec(spec, "logger")
        check_kwargs(LOGGERS.get(name), {"run_dir": "", **kwargs}, f"logger '{name}'")
    teacher = teacher_for_preflight(cfg, num_classes, dry) if "teacher" in stage_names else None
    student = build_model(cfg.student, num_classes=num_classes)
    if "pretrain" in stage_names:
        pcfg = cfg.get("pretrain")
        if pcfg is None or teacher is None:
            raise ConfigError("stage 'pretrain' needs a `pretrain:` config and a `teacher` stage before it")
        head = METHODS.build({"name": "teacher_head_ce"}, student=student, teacher=teacher)
        check_training(
            dry,
            head,
            stage="pretrain",
            name="teacher_head_ce",
            optim=pcfg.optim,
            sched=pcfg.sched,
            epochs=int(pcfg.epochs),
        )
        student = build_model(cfg.student, num_classes=num_classes)
    if "hint" in stage_names:
        check_hint_stage(cfg, stage_names, student, teacher, input_shape, dry)
        student = build_model(cfg.student, num_classes=num_classes)
    for stage in dict.fromkeys(n for n in stage_names if n in TRAINING_STAGES):
        stage_teacher = (
            build_model(cfg.student, num_classes=num_classes) if stage == "born_again" else teacher
        )
        method = build_method(cfg.method, student, stage_teacher, dry.ctx.facts)
        check_select(cfg, method)
        if "reflow" in stage_names and getattr(getattr(method, "objective", None), "kind", None) != "flow":
            raise ConfigError("stage 'reflow' retrains a flow head: use method=gendd, method/objective=flow")
        check_training(
            dry,
            method,
            stage=stage,
            name=split_spec(cfg.method, "method")[0],
            optim=cfg.optim,
            sched=cfg.sched,
            epochs=int(cfg.trainer.epochs),
            select=cfg.trainer.get("select"),
        )
        student = build_model(cfg.student, num_classes=num_classes)
