"""Built-in stages: `teacher` (load, reuse from cache, or train) and `distill` (train the student).

A stage is a registered function `(ctx, **kwargs) -> record`; an experiment lists them in `stages:`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gendd_framework import config as config_lib
from gendd_framework.engine.checkpoint import atomic_save, seed_everything
from gendd_framework.engine.checkpoint import load as load_checkpoint
from gendd_framework.engine.trainer import evaluate
from gendd_framework.errors import ConfigError
from gendd_framework.methods.base import freeze
from gendd_framework.models import build_model, load_state_dict_file
from gendd_framework.pipeline import RunContext, fit_method
from gendd_framework.registry import METHODS, STAGES, split_spec


def teacher_cache_key(ctx: RunContext) -> str:
    """Hash of everything that determines the trained teacher: data, model and training recipe."""
    cfg = ctx.cfg
    recipe = {
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "model": OmegaConf.to_container(cfg.teacher.model, resolve=True),
        "train": OmegaConf.to_container(cfg.teacher.train, resolve=True),
        "loop": {k: cfg.trainer.get(k) for k in ("accum_steps", "precision", "grad_clip")},
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg.teacher.model.name}-{digest}"


@STAGES.register("teacher")
def teacher_stage(ctx: RunContext) -> dict[str, Any]:
    """Load `teacher.weights`, else reuse the cached teacher for this recipe, else train and cache it."""
    tcfg = ctx.cfg.get("teacher")
    if tcfg is None:
        raise ConfigError("stage 'teacher' needs a `teacher:` config (pick one with teacher=<name>)")
    num_classes = ctx.data.num_classes
    record: dict[str, Any] = {}
    if tcfg.get("weights"):
        model = build_model(
            {**OmegaConf.to_container(tcfg.model, resolve=True), "checkpoint": tcfg.weights},
            num_classes=num_classes,
        )
        record["source"] = str(tcfg.weights)
    else:
        cache = Path(tcfg.cache_dir).expanduser() / f"{teacher_cache_key(ctx)}.pt"
        model = build_model(tcfg.model, num_classes=num_classes)
        if cache.exists():
            model.load_state_dict(load_state_dict_file(cache))
            record["source"] = f"cache:{cache}"
        elif tcfg.get("train_if_missing", True):
            train = tcfg.train
            seed_everything(int(train.seed))
            method = METHODS.build({"name": "ce"}, student=model)
            # the run's `select` names the distill method's outputs, not the CE teacher's
            trainer = config_lib.trainer_config(
                ctx.cfg.trainer, epochs=int(train.epochs), resume=False, select=None
            )
            fit = fit_method(
                ctx,
                method,
                "teacher",
                optim=train.optim,
                sched=train.sched,
                trainer=trainer,
                seed=int(train.seed),
            )
            atomic_save(model.state_dict(), cache)
            record.update(source=f"trained:{cache}", best_epoch=fit["best_epoch"])
        else:
            raise ConfigError(
                f"no teacher weights: set teacher.weights=... (cache {cache} is empty and "
                "teacher.train_if_missing=false)"
            )
    model.to(ctx.device)
    ctx.models["teacher"] = freeze(model)
    method = METHODS.build({"name": "ce"}, student=model)
    for split in ("val", "test"):
        loader, _ = ctx.loader(split)
        record[split] = evaluate(method, loader, ctx.device)
    freeze(model)
    return record


@STAGES.register("distill")
def distill_stage(ctx: RunContext, stage_name: str = "distill") -> dict[str, Any]:
    """Train the student with `method` (teacher from the `teacher` stage if one ran)."""
    cfg = ctx.cfg
    student = ctx.models.get("student") or build_model(cfg.student, num_classes=ctx.data.num_classes)
    method_name, method_kwargs = split_spec(cfg.method, "method")
    method = METHODS.build(
        {"name": method_name, **method_kwargs},
        student=student,
        teacher=ctx.models.get("teacher"),
        num_classes=ctx.data.num_classes,
    )
    trainer = config_lib.trainer_config(cfg.trainer)
    record = fit_method(
        ctx,
        method,
        stage_name,
        optim=cfg.optim,
        sched=cfg.sched,
        trainer=trainer,
        seed=int(cfg.seed),
        step_callbacks=getattr(method, "step_callbacks", lambda: [])(),
    )
    ctx.models["student"] = method.student_model
    return record


@STAGES.register("pretrain")
def pretrain_stage(ctx: RunContext) -> dict[str, Any]:
    """GenDD stage 1: train the student through the frozen teacher head (`pretrain:` config), keep the
    backbone for the next stage and discard the projection (spec B.4)."""
    pcfg = ctx.cfg.get("pretrain")
    if pcfg is None or "teacher" not in ctx.models:
        raise ConfigError("stage 'pretrain' needs a `pretrain:` config and a `teacher` stage before it")
    student = build_model(ctx.cfg.student, num_classes=ctx.data.num_classes)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    method = METHODS.build({"name": "teacher_head_ce"}, student=student, teacher=ctx.models["teacher"])
    trainer = config_lib.trainer_config(ctx.cfg.trainer, epochs=int(pcfg.epochs), select=None)
    record = fit_method(
        ctx, method, "pretrain", optim=pcfg.optim, sched=pcfg.sched, trainer=trainer, seed=int(ctx.cfg.seed)
    )
    handover = pcfg.get("handover", "last")
    if handover not in ("last", "best"):
        raise ConfigError(f"pretrain.handover must be 'last' or 'best', got '{handover}'")
    if handover == "last":  # the official scripts start stage 2 from the last stage-1 weights
        method.load_state_dict(load_checkpoint(ctx.ckpt_dir / "pretrain_last.pt")["method"])
    record["handover"] = handover
    for name, p in student.named_parameters():  # the student's own head was frozen for this stage only
        p.requires_grad_(name in trainable)
    ctx.models["student"] = student
    return record
