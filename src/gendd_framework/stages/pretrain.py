"""The `pretrain` stage: GenDD's stage 1, the student trained through the frozen teacher head."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from gendd_framework import config as config_lib
from gendd_framework.engine.checkpoint import load as load_checkpoint
from gendd_framework.errors import ConfigError
from gendd_framework.models import build_model
from gendd_framework.registry import METHODS, STAGES
from gendd_framework.runtime import RunContext, fit_method
from gendd_framework.stages.hooks import stage_hooks

if TYPE_CHECKING:
    from gendd_framework.preflight import StagePreflight

MISSING = "stage 'pretrain' needs a `pretrain:` config and a `teacher` stage before it"


def pretrain_method(student: nn.Module, teacher: nn.Module) -> nn.Module:
    """The student trained through the frozen teacher head (GenDD's stage 1)."""
    return METHODS.build({"name": "teacher_head_ce"}, student=student, teacher=teacher)


def check_pretrain(check: StagePreflight, **_: Any) -> None:
    """The `teacher_head_ce` method, optimizer and schedule the stage will train with."""
    pcfg, teacher = check.cfg.get("pretrain"), check.models.get("teacher")
    if pcfg is None or teacher is None:
        raise ConfigError(MISSING)
    head = pretrain_method(check.fresh_student(), teacher)
    check.training(head, name="teacher_head_ce", optim=pcfg.optim, sched=pcfg.sched, epochs=int(pcfg.epochs))
    check.models["student"] = head.student_model


@STAGES.register("pretrain")
@stage_hooks(preflight=check_pretrain)
def pretrain_stage(ctx: RunContext) -> dict[str, Any]:
    """GenDD stage 1: train the student through the frozen teacher head (`pretrain:` config), keep the
    backbone for the next stage and discard the projection (the official two-stage recipe)."""
    pcfg = ctx.cfg.get("pretrain")
    if pcfg is None or "teacher" not in ctx.models:
        raise ConfigError(MISSING)
    student = build_model(ctx.cfg.student, num_classes=ctx.data.num_classes)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    method = pretrain_method(student, ctx.models["teacher"])
    trainer = config_lib.trainer_config(ctx.cfg.trainer, epochs=int(pcfg.epochs), select=None)
    record = fit_method(
        ctx, method, "pretrain", optim=pcfg.optim, sched=pcfg.sched, trainer=trainer, seed=int(ctx.cfg.seed)
    )
    handover = pcfg.get("handover", "last")
    if handover not in ("last", "best"):
        raise ConfigError(f"pretrain.handover must be 'last' or 'best', got '{handover}'")
    if handover == "last":  # the official scripts start stage 2 from the last (official) stage-1 weights
        method.load_state_dict(load_checkpoint(ctx.ckpt_dir / "pretrain_last.pt")["method"])
    record["handover"] = handover
    for name, p in student.named_parameters():  # the student's own head was frozen for this stage only
        p.requires_grad_(name in trainable)
    ctx.models["student"] = student
    return record
