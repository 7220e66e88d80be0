"""Optimizers and per-iteration LR schedules, registered by name.

Schedules are `LambdaLR` multipliers of each param group's initial LR evaluated at every iteration, so
warmup and decay are smooth, a group with its own LR (a method's `custom_param_groups`, resolved by
`build_optimizer`) follows the same curve at its own scale, and their state (just the step count) is
checkpointed exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from gendd_framework.errors import ConfigError
from gendd_framework.registry import OPTIMIZERS, SCHEDULERS, split_spec


def build_optimizer(node: Mapping[str, Any] | Any, groups: list[dict]) -> torch.optim.Optimizer:
    """The `optim:` node's optimizer over a method's param groups. A group may carry `lr` (absolute),
    `lr_scale` (times the optimizer's lr) and `weight_decay`; built before the LR schedule, so the
    schedule's multipliers apply to every group's own initial lr."""
    name, kwargs = split_spec(node, "optimizer")
    for group in groups:
        scale = group.get("lr_scale")
        where = f"param group '{group.get('group', '?')}'"
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0
        ):
            raise ConfigError(f"{where}: lr_scale must be a number > 0, got {scale!r}")
        if scale is not None and "lr" in group:
            raise ConfigError(f"{where} sets both lr and lr_scale; keep one")
    try:
        optimizer = OPTIMIZERS.build({"name": name, **kwargs}, params=groups)
    except ValueError as exc:  # e.g. a parameter in two groups
        raise ConfigError(f"optimizer {name}: {exc}") from None
    for group in optimizer.param_groups:
        if group.get("lr_scale") is not None:
            group["lr"] = group["lr"] * group["lr_scale"]
    return optimizer


def implementation(name: str, fused: bool | None, foreach: bool | None) -> dict[str, bool | None]:
    """The update kernel: `fused` (one kernel for all parameters), `foreach` (batched per-op kernels)
    or the per-parameter loop (both false); None leaves torch's choice (foreach on CUDA, loop on CPU).
    Same maths either way, to float rounding."""
    for key, value in (("fused", fused), ("foreach", foreach)):
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"config key 'optim.{key}' = {value!r}: must be null, true or false")
    if fused and foreach:
        raise ConfigError(f"optimizer {name}: optim.fused and optim.foreach cannot both be true; pick one")
    return {"fused": fused, "foreach": foreach}


@OPTIMIZERS.register("sgd")
def sgd(
    params: Iterable,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    fused: bool | None = None,
    foreach: bool | None = None,
) -> torch.optim.Optimizer:
    """SGD with momentum (the CIFAR KD protocol: lr 0.05, wd 5e-4); `fused`/`foreach` pick the kernel."""
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        **implementation("sgd", fused, foreach),
    )


@OPTIMIZERS.register("adamw")
def adamw(
    params: Iterable,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
    beta2_min: float | None = None,
    foreach: bool | None = None,
) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay); `fused` defaults to on for CUDA parameters (unless `foreach`).

    `beta2_min` turns on GenDD's per-iteration cosine ramp of β2 from `beta2_min` up to `betas[1]`.
    """
    params = list(params)
    kernel = implementation("adamw", fused, foreach)
    if fused is None and not foreach:
        tensors = [p for g in params for p in g["params"]] if isinstance(params[0], dict) else params
        kernel["fused"] = bool(tensors and tensors[0].is_cuda)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **kernel)
    if beta2_min is not None:
        beta2_max = float(betas[1])

        def ramp_beta2(step: int, total_steps: int) -> None:
            value = beta2_cosine_ramp(step, total_steps, float(beta2_min), beta2_max)
            for group in opt.param_groups:
                group["betas"] = (group["betas"][0], value)

        opt.before_step = ramp_beta2  # a function of the step count alone, so resume stays exact
    return opt


def beta2_cosine_ramp(step: int, total_steps: int, beta_min: float, beta_max: float) -> float:
    """β2(s) = β_max − ½(β_max − β_min)(1 + cos(π·s/S)), S = total_steps − 1 (β_min first, β_max last)."""
    span = max(1, total_steps - 1)
    return beta_max - 0.5 * (beta_max - beta_min) * (1 + math.cos(math.pi * min(step, span) / span))


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


@SCHEDULERS.register("constant")
def constant(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0):
    """Constant LR after an optional linear warmup."""
    warm = int(round(warmup_epochs * steps_per_epoch))
    return LambdaLR(optimizer, lambda s: _warmup(s, warm))


@SCHEDULERS.register("cosine")
def cosine(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float = 0,
    min_lr_ratio: float = 0.0,
):
    """Linear warmup then half-cosine from the base LR to `min_lr_ratio`·base, stepped per iteration."""
    total = max(1, epochs * steps_per_epoch)
    warm = int(round(warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return _warmup(step, warm)
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


@SCHEDULERS.register("multistep")
def multistep(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    epochs: int,
    milestones: Sequence[float] = (150, 180, 210),
    gamma: float = 0.1,
    warmup_epochs: float = 0,
):
    """Linear warmup then ×`gamma` at each milestone epoch (per-iteration granularity)."""
    bounds = sorted(int(round(m * steps_per_epoch)) for m in milestones)
    warm = int(round(warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        return _warmup(step, warm) * gamma ** sum(step >= b for b in bounds)

    return LambdaLR(optimizer, factor)
