"""The `hint` stage: stage 1 of FitNets (Romero et al. ICLR'15), before `distill`.

The student's parameters up to its guided layer and a regressor are trained on the hint loss
MSE(r(student guided map), teacher hint map) alone, for `hint.epochs` epochs with their own `hint.optim`
and `hint.sched`; the student (every later layer untouched) is handed to the next stage through
`ctx.models["student"]` and the regressor is discarded. The layers and the regressor are those of the
configured method's `fitnet` term (`method=fitnet`, or a `fitnet` entry of `method=distill`'s losses),
else FitNet's defaults; `hint.student_layers` / `hint.teacher_layers` / `hint.regressor` override them.

    stages: [teacher, hint, distill]
    hint: {epochs: 20, optim: {name: adamw, lr: 0.003}, sched: {name: cosine, warmup_epochs: 0}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig
from torch import nn

from gendd_framework import config as config_lib
from gendd_framework.config import plain
from gendd_framework.engine.checkpoint import load as load_checkpoint
from gendd_framework.errors import ConfigError
from gendd_framework.models import build_model
from gendd_framework.registry import METHODS, STAGES, split_spec
from gendd_framework.runtime import RunContext, fit_method
from gendd_framework.stages.hooks import stage_hooks

if TYPE_CHECKING:
    from gendd_framework.preflight import StagePreflight

TERM_KEYS = ("student_layers", "teacher_layers", "regressor")  # read from the method's fitnet term
HINT_KEYS = ("epochs", "optim", "sched", *TERM_KEYS)
MISSING = (
    "stage 'hint' needs a `hint:` config with epochs, optim and sched (e.g. "
    "experiment=digits/fitnet_stagewise, or hint: {epochs: 20, optim: {name: adamw, lr: 0.003}, "
    "sched: {name: cosine}})"
)


def hint_config(cfg: DictConfig) -> dict[str, Any]:
    """The `hint:` node as plain containers, its keys and value types checked (one-line errors)."""
    node = plain(cfg.get("hint"))
    if node is None:
        raise ConfigError(MISSING)
    if not isinstance(node, Mapping):
        raise ConfigError(f"config key 'hint' = {node!r}: must be a mapping ({MISSING})")
    unknown = sorted(set(node) - set(HINT_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(f'hint.{k}' for k in unknown)}; allowed: {HINT_KEYS}"
        )
    epochs = node.get("epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"config key 'hint.epochs' = {epochs!r}: must be an integer >= 1")
    for key in ("optim", "sched"):
        value = node.get(key)
        if not isinstance(value, Mapping) or "name" not in value:
            raise ConfigError(f"config key 'hint.{key}' = {value!r}: must be a mapping with a 'name' key")
    return node


def fitnet_term_settings(method: Any) -> dict[str, Any]:
    """Layer and regressor settings of the configured method's `fitnet` term ({} when it has none)."""
    name, kwargs = split_spec(method, "method")
    found: Mapping[str, Any] = {}
    if name == "fitnet":
        found = kwargs
    elif name == "distill":
        terms = [
            t for t in kwargs.get("losses") or [] if isinstance(t, Mapping) and t.get("name") == "fitnet"
        ]
        if len(terms) > 1:
            raise ConfigError(
                "stage 'hint' reads the layers of the method's fitnet term, but method.losses has "
                f"{len(terms)}; set hint.student_layers and hint.teacher_layers"
            )
        found = terms[0] if terms else {}
    return {k: found[k] for k in TERM_KEYS if k in found}


def build_hint_method(
    cfg: DictConfig, student: nn.Module, teacher: nn.Module | None, input_shape: tuple[int, ...] | None
) -> nn.Module:
    """`fitnet_hint` with the method's fitnet-term settings, refined by the `hint:` node's."""
    node = hint_config(cfg)
    settings = {**fitnet_term_settings(cfg.method), **{k: node[k] for k in TERM_KEYS if k in node}}
    try:
        return METHODS.build(
            {"name": "fitnet_hint", **settings}, student=student, teacher=teacher, input_shape=input_shape
        )
    except ConfigError as exc:
        raise ConfigError(f"stage 'hint': {exc}") from None


def check_hint(check: StagePreflight, **_: Any) -> None:
    """The `hint:` node, a teacher before it, and the method (layers, regressor, guided path),
    optimizer and schedule the stage will train with."""
    node = hint_config(check.cfg)
    teacher = check.models.get("teacher")
    if teacher is None:
        raise ConfigError("stage 'hint' needs a `teacher` stage before it")
    method = build_hint_method(check.cfg, check.fresh_student(), teacher, check.input_shape)
    check.training(
        method, name="fitnet_hint", optim=node["optim"], sched=node["sched"], epochs=int(node["epochs"])
    )
    check.models["student"] = method.student_model


@STAGES.register("hint")
@stage_hooks(preflight=check_hint)
def hint_stage(ctx: RunContext, stage_name: str = "hint") -> dict[str, Any]:
    """FitNets stage 1: train the student's guided path + a regressor on the hint loss only (`hint:`
    config), then hand the student (its last weights) to the next stage."""
    node = hint_config(ctx.cfg)
    teacher = ctx.models.get("teacher")
    if teacher is None:
        raise ConfigError("stage 'hint' needs a `teacher` stage before it")
    student = ctx.models.get("student") or build_model(ctx.cfg.student, num_classes=ctx.data.num_classes)
    method = build_hint_method(ctx.cfg, student, teacher, ctx.data.input_shape)
    epochs = int(node["epochs"])
    # validated once, after the last epoch: nothing is selected on val (the hint loss is the objective)
    trainer = config_lib.trainer_config(ctx.cfg.trainer, epochs=epochs, select=None, eval_every=epochs)
    record = fit_method(
        ctx,
        method,
        stage_name,
        optim=node["optim"],
        sched=node["sched"],
        trainer=trainer,
        seed=int(ctx.cfg.seed),
        reference=teacher,
    )
    method.load_state_dict(load_checkpoint(ctx.ckpt_dir / f"{stage_name}_last.pt")["method"])
    ctx.models["student"] = method.student_model
    record.update(
        handover="last",
        guided_layer=method.guided,
        hint_layer=method.hint,
        trained_parameters=len(method.hint_parameter_names),
    )
    return record
