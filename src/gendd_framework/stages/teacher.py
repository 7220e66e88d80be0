"""The `teacher` stage: one model (a weights file, the cache for its recipe, or trained once on every
label), an ensemble of such members, or an earlier run's exported predictor; frozen for later stages.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig
from torch import nn

from gendd_framework import config as config_lib
from gendd_framework.config import plain
from gendd_framework.engine import distributed
from gendd_framework.engine.checkpoint import atomic_save, seed_everything
from gendd_framework.engine.trainer import evaluate
from gendd_framework.errors import ConfigError
from gendd_framework.methods.base import freeze
from gendd_framework.models import build_model, load_state_dict_file
from gendd_framework.models.ensemble import EnsembleTeacher
from gendd_framework.registry import METHODS, STAGES
from gendd_framework.runtime import RunContext, fit_method
from gendd_framework.schema import DEFAULT_COMBINE
from gendd_framework.stages.hooks import stage_hooks
from gendd_framework.stages.runs import run_predictor

if TYPE_CHECKING:
    from gendd_framework.preflight import StagePreflight

# data keys that do not change a trained teacher (it always trains on every label; these loader keys
# change speed, not arithmetic)
TEACHER_NEUTRAL_DATA_KEYS = ("label_fraction",)
TEACHER_NEUTRAL_LOADER_KEYS = ("eval_batch_size", "num_workers", "pin_memory")
TEACHER_EVAL_EVERY = 1  # teachers select their best epoch on every epoch's validation
# Bumped whenever the training loop's arithmetic changes for the same config, so a teacher cached by
# earlier code is retrained rather than reused (2: the train split is drawn by a DistributedSampler;
# 3: the CIFAR VGG and ShuffleNetV1 now compute the upstream networks' functions).
TEACHER_RECIPE_VERSION = 3


def ce_method(model: nn.Module) -> nn.Module:
    """The plain CE method a teacher trains with, and the wrapper its test metrics are read through."""
    return METHODS.build({"name": "ce"}, student=model)


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
    method = ce_method(model)
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
    method = ce_method(model)
    record = {}
    for split in ("val", "test"):
        loader, _ = ctx.loader(split)
        metrics = evaluate(method, loader, ctx.device)
        record[split] = {k.replace("/student", "/teacher"): v for k, v in metrics.items()}
    return record


def teacher_weights_exist(tcfg: dict) -> None:
    for node in tcfg.get("members") or [tcfg]:
        path = node.get("weights") if isinstance(node, dict) else None
        if path and not Path(str(path)).expanduser().is_file():
            raise ConfigError(f"teacher.weights: checkpoint file not found: {Path(str(path)).expanduser()}")


def check_teacher(check: StagePreflight, **_: Any) -> None:
    """The teacher's modules (random weights) for the later checks, and what the stage will train:
    each model without weights gets the `ce` method it trains with, checked like any training stage."""
    tcfg = plain(check.cfg.get("teacher"))
    if tcfg is None:
        raise ConfigError("stage 'teacher' needs a `teacher:` config (pick one with teacher=<name>)")
    teacher_weights_exist(tcfg)
    model = teacher_architecture(tcfg, check.num_classes)
    members = tcfg.get("members") or []
    shared = tcfg.get("train") or {}
    nodes = [{**shared, **(m.get("train") or {})} for m in members] if members else [tcfg.get("train")]
    models = list(model.members) if members else [model]
    trains = not tcfg.get("run_dir") and tcfg.get("train_if_missing", True)
    for i, (node, member) in enumerate(zip(nodes, models)):
        if not (trains and node) or (members[i] if members else tcfg).get("weights"):
            continue  # loaded from a file (or from an earlier run): nothing trains
        check.training(
            ce_method(member),
            stage=f"teacher_{i}" if members else "teacher",
            name="ce",
            optim=node["optim"],
            sched=node["sched"],
            epochs=int(node["epochs"]),
            where="teacher.train",
            all_labels=True,
        )
    check.models["teacher"] = model


@STAGES.register("teacher")
@stage_hooks(preflight=check_teacher)
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
