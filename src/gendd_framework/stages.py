"""Built-in stages: `teacher` (one model, an ensemble, or an earlier run's student), `distill`, `pretrain`
and `born_again` (the previous stage's student teaches a fresh one: self-distillation generations).

A stage is a registered function `(ctx, **kwargs) -> record`; an experiment lists them in `stages:`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from gendd_framework import config as config_lib
from gendd_framework.config import plain
from gendd_framework.context import DataFacts
from gendd_framework.data.base import BatchDataset
from gendd_framework.engine import distributed
from gendd_framework.engine.checkpoint import atomic_save, seed_everything
from gendd_framework.engine.checkpoint import load as load_checkpoint
from gendd_framework.engine.statistics import TeacherStatistics
from gendd_framework.engine.trainer import evaluate
from gendd_framework.errors import ConfigError
from gendd_framework.methods.base import freeze, release_taps, required_views
from gendd_framework.models import build_model, load_state_dict_file
from gendd_framework.models.ensemble import EnsembleTeacher
from gendd_framework.registry import METHODS, STAGES, split_spec
from gendd_framework.runtime import RunContext, build_method, fit_method
from gendd_framework.schema import DEFAULT_COMBINE

# data keys that do not change a trained teacher (it always trains on every label; these loader keys
# change speed, not arithmetic)
TEACHER_NEUTRAL_DATA_KEYS = ("label_fraction",)
TEACHER_NEUTRAL_LOADER_KEYS = ("eval_batch_size", "num_workers", "pin_memory")
TEACHER_EVAL_EVERY = 1  # teachers select their best epoch on every epoch's validation
# Bumped whenever the training loop's arithmetic changes for the same config, so a teacher cached by
# earlier code is retrained rather than reused (2: the train split is drawn by a DistributedSampler;
# 3: the CIFAR VGG and ShuffleNetV1 now compute the upstream networks' functions).
TEACHER_RECIPE_VERSION = 3


def teacher_cache_key(ctx: RunContext, node: DictConfig | dict | None = None) -> str:
    """Hash of everything that determines a trained teacher: data (with its transform settings), model
    and training recipe, and the loop settings that change the arithmetic; nothing else."""
    node = plain(node if node is not None else ctx.cfg.teacher)
    data = {k: v for k, v in plain(ctx.cfg.data).items() if k not in TEACHER_NEUTRAL_DATA_KEYS}
    loader = {
        k: v for k, v in (data.pop("loader", None) or {}).items() if k not in TEACHER_NEUTRAL_LOADER_KEYS
    }
    recipe = {
        "data": {**data, "loader": loader},
        "model": node["model"],
        "train": node.get("train"),
        "loop": {k: ctx.cfg.trainer.get(k) for k in ("accum_steps", "precision", "grad_clip")},
        "eval_every": TEACHER_EVAL_EVERY,
        "version": TEACHER_RECIPE_VERSION,
    }
    world_size = distributed.info().world_size
    if world_size > 1:  # DDP trains on world_size x batch_size samples per step: another teacher
        recipe["world_size"] = world_size
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return f"{node['model']['name']}-{digest}"


def single_teacher(ctx: RunContext, node: dict, stage: str = "teacher") -> tuple[nn.Module, dict[str, Any]]:
    """`weights` file, else the cached teacher for this recipe, else train it (on every label) and cache."""
    num_classes = ctx.data.num_classes
    if node.get("model") is None:
        raise ConfigError("a teacher needs `model: {name: ...}` (pick one with teacher=<name>)")
    if node.get("weights"):
        model = build_model({**node["model"], "checkpoint": node["weights"]}, num_classes=num_classes)
        return model, {"source": str(node["weights"])}
    cache = Path(node["cache_dir"]).expanduser() / f"{teacher_cache_key(ctx, node)}.pt"
    model = build_model(node["model"], num_classes=num_classes)
    # a resumed run that was training this teacher continues that training (a requeued job is not sent
    # back to epoch 0) and, once it is done, gives the record of an uninterrupted run
    resume = ctx.cfg.trainer.get("resume") or False
    own = bool(resume) and (ctx.ckpt_dir / f"{stage}_last.pt").exists()
    if distributed.broadcast_object(cache.exists() and not own):  # rank 0 decides for every rank
        model.load_state_dict(load_state_dict_file(cache))
        return model, {"source": f"cache:{cache}"}
    if not node.get("train_if_missing", True) or node.get("train") is None:
        raise ConfigError(
            f"no teacher weights: set teacher.weights=... (cache {cache} is empty and "
            "teacher.train_if_missing=false or no teacher.train recipe)"
        )
    train = node["train"]
    seed_everything(int(train["seed"]))
    method = METHODS.build({"name": "ce"}, student=model)
    # the run's `select` names the distill method's outputs, not the CE teacher's
    # the teacher's recipe alone decides it: best-on-val checked every epoch, whatever the student's
    # trainer.eval_every (a GenDD preset validating every 5 epochs must not pick another teacher)
    trainer = config_lib.trainer_config(
        ctx.cfg.trainer,
        epochs=int(train["epochs"]),
        resume=resume,
        select=None,
        eval_every=TEACHER_EVAL_EVERY,
    )
    fit = fit_method(
        ctx,
        method,
        stage,
        optim=train["optim"],
        sched=train["sched"],
        trainer=trainer,
        seed=int(train["seed"]),
        all_labels=True,
    )
    # the teacher trains under DDP like any stage (all ranks hold the same weights); rank 0 caches it
    if distributed.is_main_process() and not cache.exists():
        atomic_save(model.state_dict(), cache)
    return model, {"source": f"trained:{cache}", "best_epoch": fit["best_epoch"]}


def teacher_from_run(ctx: RunContext, node: dict) -> tuple[nn.Module, dict[str, Any]]:
    """The predictor an earlier run exported (`<run_dir>/student.pt`), rebuilt from that run's saved
    config (`run_predictor`), or loaded into `teacher.model` when that is set."""
    run_dir = Path(str(node["run_dir"])).expanduser()
    config_path, weights = config_lib.run_config_path(run_dir), run_dir / "student.pt"
    if config_path is None or not weights.is_file():
        raise ConfigError(
            f"teacher.run_dir={run_dir} is not a finished gendd-train run "
            "(needs config_resolved.yaml or .hydra/config.yaml, and student.pt)"
        )
    if node.get("model"):
        spec = {**plain(node["model"]), "checkpoint": str(weights), "freeze": None}
        return build_model(spec, num_classes=ctx.data.num_classes), {"source": f"run:{weights}"}
    model = run_predictor(run_dir, ctx.data.num_classes)
    try:
        model.load_state_dict(load_state_dict_file(weights))
    except RuntimeError as exc:
        raise ConfigError(f"{weights} does not fit the predictor its run exports: {exc}") from None
    return model, {"source": f"run:{weights}"}


def architecture(spec: Any) -> dict[str, Any]:
    """A model spec without its initial weights file or frozen paths: the architecture alone."""
    return {k: v for k, v in plain(spec).items() if k not in ("checkpoint", "freeze")}


def stage_teacher_architecture(cfg: Any, stage: str, num_classes: int) -> nn.Module | None:
    """The teacher a student-training stage of `cfg` had, as modules without trained weights: the
    student architecture for `born_again`, the `teacher:` config's when a `teacher` stage runs before
    it, else None (a teacher-free stage)."""
    kinds = []
    for spec in cfg.stages:
        name, kwargs = split_spec(spec, "stage")
        kinds.append((kwargs.get("stage_name", name), name))
    keys = [key for key, _ in kinds]
    position = keys.index(stage) if stage in keys else len(kinds)
    kind = kinds[position][1] if position < len(kinds) else stage
    if kind == "born_again":
        return build_model(architecture(cfg.student), num_classes=num_classes)
    if any(name == "teacher" for _, name in kinds[:position]) and cfg.get("teacher"):
        return teacher_architecture(cfg.teacher, num_classes)
    return None


def run_predictor(run_dir: Path, num_classes: int) -> nn.Module:
    """The predictor a finished run exported, as modules without trained weights (`student.pt` holds
    them). A run whose method exports more than its student (summary.json's `export` record) gets
    that method rebuilt from its config, with the data facts it was built with, and its `export()`
    (its plugins are loaded by whoever reads the run: `referenced_plugins`); otherwise the run's
    student architecture (`num_classes` is used when the run recorded none)."""
    config_path = config_lib.run_config_path(run_dir)
    if config_path is None:
        raise ConfigError(
            f"teacher.run_dir={run_dir} is not a finished gendd-train run "
            "(no config_resolved.yaml or .hydra/config.yaml)"
        )
    cfg = config_lib.apply_recipe(OmegaConf.load(config_path))
    summary = run_dir / "summary.json"
    export = (json.loads(summary.read_text()).get("export") if summary.is_file() else None) or {}
    if export.get("predictor") != "method":
        return build_model(architecture(cfg.student), num_classes=num_classes)
    facts = DataFacts.from_dict(export["facts"])
    student = build_model(architecture(cfg.student), num_classes=facts.num_classes)
    teacher = stage_teacher_architecture(cfg, export["stage"], facts.num_classes)
    try:
        method = build_method(cfg.method, student, teacher, facts)
    except ConfigError as exc:
        raise ConfigError(f"rebuilding the predictor of {run_dir}: {exc}") from None
    predictor = method.export()
    release_taps(method, keep=predictor)  # the method is discarded: its hooks must not outlive it
    return predictor


def referenced_plugins(cfg: Any) -> list[str]:
    """The `plugins` of the earlier runs a config's teacher comes from (`teacher.run_dir`, followed
    back through their own teachers): what rebuilding their exported predictors needs. The pipeline
    and gendd-eval load them with the run's own plugins."""
    found: list[str] = []
    seen: set[str] = set()
    run_dir = OmegaConf.select(cfg, "teacher.run_dir", default=None, throw_on_missing=False)
    while run_dir and str(run_dir) not in seen:
        seen.add(str(run_dir))
        path = config_lib.run_config_path(Path(str(run_dir)).expanduser())
        if path is None:
            break
        earlier = OmegaConf.load(path)
        found += [str(p) for p in earlier.get("plugins") or []]
        run_dir = OmegaConf.select(earlier, "teacher.run_dir", default=None, throw_on_missing=False)
    return list(dict.fromkeys(found))


def teacher_architecture(tcfg: Any, num_classes: int) -> nn.Module:
    """The teacher's modules without trained weights (a method checkpoint holds them): used to rebuild
    a finished run's method for re-evaluation."""
    tcfg = plain(tcfg)
    if tcfg.get("members"):
        members = [build_model(m["model"], num_classes=num_classes) for m in tcfg["members"]]
        return EnsembleTeacher(members, tcfg.get("combine", DEFAULT_COMBINE))
    if tcfg.get("run_dir") and not tcfg.get("model"):
        return run_predictor(Path(str(tcfg["run_dir"])).expanduser(), num_classes)
    return build_model(tcfg["model"], num_classes=num_classes)


def evaluate_teacher(ctx: RunContext, model: nn.Module) -> dict[str, Any]:
    """Val/test metrics of a teacher, keyed `acc/teacher`, `ece/teacher`, ... (never read as a student's)."""
    method = METHODS.build({"name": "ce"}, student=model)
    record = {}
    for split in ("val", "test"):
        loader, _ = ctx.loader(split)
        metrics = evaluate(method, loader, ctx.device)
        record[split] = {k.replace("/student", "/teacher"): v for k, v in metrics.items()}
    return record


@STAGES.register("teacher")
def teacher_stage(ctx: RunContext) -> dict[str, Any]:
    """Build the frozen teacher: `run_dir` (an earlier run's student), `members` (an ensemble combined
    by `combine: probs|logits`, each member loaded, cached or trained like a single teacher), or one
    model (`weights`, else the cache for this recipe, else trained once)."""
    tcfg = plain(ctx.cfg.get("teacher"))
    if tcfg is None:
        raise ConfigError("stage 'teacher' needs a `teacher:` config (pick one with teacher=<name>)")
    record: dict[str, Any] = {}
    if tcfg.get("run_dir"):
        model, record = teacher_from_run(ctx, tcfg)
    elif tcfg.get("members"):
        shared = {k: v for k, v in tcfg.items() if k not in ("members", "combine", "model", "weights")}
        members = []
        for i, member in enumerate(tcfg["members"]):
            seed_everything(int(ctx.cfg.seed))
            node = {**shared, **member}  # a member's `train` refines the shared recipe key by key
            node["train"] = {**(shared.get("train") or {}), **(member.get("train") or {})} or None
            model_i, record_i = single_teacher(ctx, node, stage=f"teacher_{i}")
            members.append(freeze(model_i.to(ctx.device)))
            record[f"member_{i}"] = {**record_i, **evaluate_teacher(ctx, model_i)}
        model = EnsembleTeacher(members, tcfg.get("combine", DEFAULT_COMBINE))
        record["combine"] = model.combine
    else:
        model, record = single_teacher(ctx, tcfg)
    model.to(ctx.device)
    ctx.models["teacher"] = freeze(model)
    record.update(evaluate_teacher(ctx, model))
    freeze(model)
    return record


def train_student(
    ctx: RunContext, student: nn.Module, teacher: nn.Module | None, stage_name: str
) -> dict[str, Any]:
    """Build `cfg.method` around student and teacher (None: a teacher-free stage), check what it
    declares against the data, run its prepare hook, then fit and evaluate."""
    cfg = ctx.cfg
    method = build_method(cfg.method, student, teacher, ctx.facts)
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


@STAGES.register("distill")
def distill_stage(ctx: RunContext, stage_name: str = "distill") -> dict[str, Any]:
    """Train the student with `method` (teacher from the `teacher` stage if one ran)."""
    student = ctx.models.get("student") or build_model(ctx.cfg.student, num_classes=ctx.data.num_classes)
    return train_student(ctx, student, ctx.models.get("teacher"), stage_name)


@STAGES.register("born_again")
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


@STAGES.register("pretrain")
def pretrain_stage(ctx: RunContext) -> dict[str, Any]:
    """GenDD stage 1: train the student through the frozen teacher head (`pretrain:` config), keep the
    backbone for the next stage and discard the projection (the official two-stage recipe)."""
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
    if handover == "last":  # the official scripts start stage 2 from the last (official) stage-1 weights
        method.load_state_dict(load_checkpoint(ctx.ckpt_dir / "pretrain_last.pt")["method"])
    record["handover"] = handover
    for name, p in student.named_parameters():  # the student's own head was frozen for this stage only
        p.requires_grad_(name in trainable)
    ctx.models["student"] = student
    return record
