"""Build the whole run once, before any stage trains, so a bad config fails in seconds, not after the
teacher stage: every registry name and keyword, the models and their weights files, the method with
its build-time shape probe, optimizers and schedules of every training stage, loggers and `select`.

Nothing here trains, reads a checkpoint's tensors into a model, or writes a file; models are built with
random weights on the CPU and thrown away (stages re-seed every RNG before they start).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from gendd_framework.config import plain
from gendd_framework.errors import ConfigError
from gendd_framework.models import build_model
from gendd_framework.registry import (
    LOGGERS,
    METHODS,
    OPTIMIZERS,
    SCHEDULERS,
    STAGES,
    check_kwargs,
    split_spec,
)

EVAL_METRICS = ("acc", "ce", "ece", "agree", "kl")
TRAINING_STAGES = ("distill", "born_again")


def check_optimisation(optim: Any, sched: Any, params: list, epochs: int, where: str) -> None:
    """Build the optimizer on `params` and its LR schedule, as the stage will."""
    name, kwargs = split_spec(optim, f"{where} optimizer")
    try:
        optimizer = OPTIMIZERS.build({"name": name, **kwargs}, params=params)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    try:
        SCHEDULERS.build(plain(sched), optimizer=optimizer, steps_per_epoch=10, epochs=epochs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def teacher_weights_exist(tcfg: dict) -> None:
    nodes = tcfg.get("members") or [tcfg]
    for node in nodes:
        path = node.get("weights") if isinstance(node, dict) else None
        if path and not Path(str(path)).expanduser().is_file():
            raise ConfigError(f"teacher.weights: checkpoint file not found: {Path(str(path)).expanduser()}")


def teacher_for_preflight(cfg: DictConfig, num_classes: int) -> nn.Module | None:
    """The teacher's modules (random weights) and a check of what the teacher stage will need."""
    from gendd_framework.stages import teacher_architecture

    tcfg = plain(cfg.get("teacher"))
    if tcfg is None:
        return None
    teacher_weights_exist(tcfg)
    model = teacher_architecture(tcfg, num_classes)
    train_nodes = [tcfg.get("train")] + [
        {**(tcfg.get("train") or {}), **(m.get("train") or {})} for m in tcfg.get("members") or []
    ]
    needs_training = not tcfg.get("run_dir") and tcfg.get("train_if_missing", True)
    for node in train_nodes if needs_training else []:
        if node:
            params = [p for p in model.parameters()]
            check_optimisation(node["optim"], node["sched"], params, int(node["epochs"]), "teacher.train")
    return model


def check_hint_stage(
    cfg: DictConfig,
    stage_names: list[str],
    student: nn.Module,
    teacher: nn.Module | None,
    input_shape: tuple[int, ...],
) -> None:
    """FitNets' `hint` stage: its `hint:` node, a teacher stage before it, and its method (layers,
    regressor, guided path), optimizer and schedule, built as the stage will build them."""
    from gendd_framework.hint_stage import build_hint_method, hint_config

    node = hint_config(cfg)
    if teacher is None or "teacher" not in stage_names[: stage_names.index("hint")]:
        raise ConfigError("stage 'hint' needs a `teacher` stage before it")
    method = build_hint_method(cfg, student, teacher, input_shape)
    params = method.param_groups(float(node["optim"].get("weight_decay", 0.0)))
    check_optimisation(node["optim"], node["sched"], params, int(node["epochs"]), "hint")


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


def preflight(
    cfg: DictConfig, num_classes: int, input_shape: tuple[int, ...], num_samples: int | None = None
) -> None:
    """Raise `ConfigError` for anything the run would fail on later; cheap (no training, no data pass)."""
    stage_names = []
    for spec in cfg.stages:
        name, kwargs = split_spec(spec, "stage")
        check_kwargs(STAGES.get(name), {"ctx": None, **kwargs}, f"stage '{name}'")
        stage_names.append(name)
    for spec in (cfg.get("logger") or {}).get("backends") or []:
        name, kwargs = split_spec(spec, "logger")
        check_kwargs(LOGGERS.get(name), {"run_dir": "", **kwargs}, f"logger '{name}'")
    teacher = teacher_for_preflight(cfg, num_classes) if "teacher" in stage_names else None
    student = build_model(cfg.student, num_classes=num_classes)
    if "pretrain" in stage_names:
        pcfg = cfg.get("pretrain")
        if pcfg is None or teacher is None:
            raise ConfigError("stage 'pretrain' needs a `pretrain:` config and a `teacher` stage before it")
        head = METHODS.build({"name": "teacher_head_ce"}, student=student, teacher=teacher)
        params = [p for g in head.param_groups(0.0) for p in g["params"]]
        check_optimisation(pcfg.optim, pcfg.sched, params, int(pcfg.epochs), "pretrain")
        student = build_model(cfg.student, num_classes=num_classes)
    if "hint" in stage_names:
        check_hint_stage(cfg, stage_names, student, teacher, input_shape)
        student = build_model(cfg.student, num_classes=num_classes)
    for stage in dict.fromkeys(n for n in stage_names if n in TRAINING_STAGES):
        stage_teacher = (
            build_model(cfg.student, num_classes=num_classes) if stage == "born_again" else teacher
        )
        method_name, method_kwargs = split_spec(cfg.method, "method")
        method = METHODS.build(
            {"name": method_name, **method_kwargs},
            student=student,
            teacher=stage_teacher,
            num_classes=num_classes,
            input_shape=input_shape,
            num_samples=num_samples,
        )
        weight_decay = float(plain(cfg.optim).get("weight_decay", 0.0))
        params = method.param_groups(weight_decay)
        check_optimisation(cfg.optim, cfg.sched, params, int(cfg.trainer.epochs), stage)
        check_select(cfg, method)
        if "reflow" in stage_names and getattr(getattr(method, "objective", None), "kind", None) != "flow":
            raise ConfigError("stage 'reflow' retrains a flow head: use method=gendd, method/objective=flow")
        student = build_model(cfg.student, num_classes=num_classes)
    torch.manual_seed(int(cfg.seed))  # what preflight drew from the RNG does not leak into the run
