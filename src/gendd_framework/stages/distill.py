"""Student-training stages: `distill` (the configured method around the student and the teacher stage's
teacher, or none) and `born_again` (the previous stage's student, frozen, teaches a fresh one).

`student_method` is the one place a configured method is built: by these stages, by their preflight
checks and by their evaluation rebuild (`gendd-eval`, exported predictors).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from torch import nn

from gendd_framework import config as config_lib
from gendd_framework.config import plain
from gendd_framework.context import DataFacts
from gendd_framework.data.base import BatchDataset
from gendd_framework.engine.statistics import TeacherStatistics
from gendd_framework.errors import ConfigError
from gendd_framework.methods.base import freeze, required_views
from gendd_framework.models import build_model
from gendd_framework.registry import METHODS, STAGES, split_spec
from gendd_framework.runtime import RunContext, fit_method
from gendd_framework.stages.hooks import kinds_before, stage_hooks
from gendd_framework.stages.runs import architecture
from gendd_framework.stages.teacher import evaluate_teacher, teacher_architecture

if TYPE_CHECKING:
    from gendd_framework.preflight import StagePreflight

EVAL_METRICS = ("acc", "ce", "ece", "agree", "kl")


def student_method(node: Any, student: nn.Module, teacher: nn.Module | None, facts: DataFacts) -> nn.Module:
    """The configured method (`method:` node) around `student` and `teacher` (None: teacher-free): the
    node's keys plus the runtime objects a factory may accept (`student`, `teacher`, `facts` and its
    fields `num_classes`, `input_shape`, `num_samples`)."""
    name, kwargs = split_spec(node, "method")
    return METHODS.build(
        {"name": name, **kwargs},
        student=student,
        teacher=teacher,
        facts=facts,
        num_classes=facts.num_classes,
        input_shape=facts.input_shape,
        num_samples=facts.num_samples,
    )


def train_student(
    ctx: RunContext, student: nn.Module, teacher: nn.Module | None, stage_name: str
) -> dict[str, Any]:
    """Build `cfg.method` around student and teacher (None: a teacher-free stage), check what it
    declares against the data, run its prepare hook, then fit and evaluate."""
    cfg = ctx.cfg
    method = student_method(cfg.method, student, teacher, ctx.facts)
    required_views(method, ctx.facts.sample_keys)  # keys the data cannot serve fail here, in one line
    method.to(ctx.device)
    if getattr(method, "teacher", None) is not None:
        method.prepare(teacher_statistics(ctx, method.teacher.model))
    record = fit_method(
        ctx,
        method,
        stage_name,
        optim=cfg.optim,
        sched=cfg.sched,
        trainer=config_lib.trainer_config(cfg.trainer),
        seed=int(cfg.seed),
        reference=teacher,
    )
    ctx.models["student"] = method.student_model
    ctx.models["method"] = method  # later stages (reflow) continue from the trained method
    ctx.method_stage = stage_name  # its export() is the run's student.pt
    return record


def teacher_statistics(ctx: RunContext, teacher: nn.Module) -> TeacherStatistics:
    data = ctx.data
    dataset = BatchDataset(data.train_plain or data.train, data.label_mask)
    data_key = {k: v for k, v in plain(ctx.cfg.data).items() if k != "loader"}
    return TeacherStatistics(
        teacher,
        dataset,
        data.num_classes,
        ctx.device,
        cache_dir=ctx.cfg.get("paths", {}).get("cache_dir"),
        data_key=data_key,
        batch_size=ctx.loader_cfg["eval_batch_size"],
    )


def check_select(cfg: Any, method: nn.Module) -> None:
    """`trainer.select` names a validation metric of the method's outputs."""
    select = cfg.trainer.get("select")
    if select is None:
        return
    allowed = [f"{m}/{o}" for m in EVAL_METRICS for o in method.output_names()]
    if select not in allowed:
        raise ConfigError(
            f"trainer.select='{select}' is not a validation metric of this method; allowed: {allowed}"
        )


def check_student_training(check: StagePreflight, teacher: nn.Module | None) -> None:
    """What `train_student` builds and does before its first step, on a fresh student."""
    cfg = check.cfg
    method = student_method(cfg.method, check.fresh_student(), teacher, check.facts)
    check_select(cfg, method)
    check.training(
        method,
        name=split_spec(cfg.method, "method")[0],
        optim=cfg.optim,
        sched=cfg.sched,
        epochs=int(cfg.trainer.epochs),
        select=cfg.trainer.get("select"),
    )
    check.models["method"] = method
    check.models["student"] = method.student_model


def rebuild_distill(cfg: Any, stage_key: str, facts: DataFacts) -> nn.Module:
    """The distill method untrained: the teacher's architecture when a `teacher` stage ran before."""
    teacher = None
    if "teacher" in kinds_before(cfg, stage_key) and cfg.get("teacher"):
        teacher = teacher_architecture(cfg.teacher, facts.num_classes)
    student = build_model(architecture(cfg.student), num_classes=facts.num_classes)
    return student_method(cfg.method, student, teacher, facts)


def rebuild_born_again(cfg: Any, stage_key: str, facts: DataFacts) -> nn.Module:
    """The born-again method untrained: its teacher has the student's architecture."""
    teacher = build_model(architecture(cfg.student), num_classes=facts.num_classes)
    student = build_model(architecture(cfg.student), num_classes=facts.num_classes)
    return student_method(cfg.method, student, teacher, facts)


def check_distill(check: StagePreflight, **_: Any) -> None:
    check_student_training(check, check.models.get("teacher"))


@STAGES.register("distill")
@stage_hooks(preflight=check_distill, rebuild=rebuild_distill)
def distill_stage(ctx: RunContext, stage_name: str = "distill") -> dict[str, Any]:
    """Train the student with `method` (teacher from the `teacher` stage if one ran)."""
    student = ctx.models.get("student") or build_model(ctx.cfg.student, num_classes=ctx.data.num_classes)
    return train_student(ctx, student, ctx.models.get("teacher"), stage_name)


def check_born_again(check: StagePreflight, **_: Any) -> None:
    if "student" not in check.models:
        raise ConfigError("stage 'born_again' needs an earlier stage that trained a student (e.g. distill)")
    check_student_training(check, check.fresh_student())


@STAGES.register("born_again")
@stage_hooks(preflight=check_born_again, rebuild=rebuild_born_again)
def born_again_stage(ctx: RunContext, stage_name: str = "born_again") -> dict[str, Any]:
    """Self-distillation generation: the previous stage's student, frozen, teaches a fresh student of
    the same config with the same method (Born-Again Networks). Repeat with distinct `stage_name`s."""
    previous = ctx.models.get("student")
    if previous is None:
        raise ConfigError("stage 'born_again' needs an earlier stage that trained a student (e.g. distill)")
    teacher = freeze(copy.deepcopy(previous))
    student = build_model(ctx.cfg.student, num_classes=ctx.data.num_classes)
    record = train_student(ctx, student, teacher, stage_name)
    record["teacher"] = evaluate_teacher(ctx, teacher)
    return record
