"""Loss-weight schedules: a factor in [0, 1] from the StepContext, so warm-ups and decays are config.

A term's YAML node takes `schedule: {name: linear_warmup, epochs: 20}`; its weight is multiplied by the
factor at every step. Epoch-granular schedules follow the reference code's 1-indexed epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from gendd_framework.context import StepContext
from gendd_framework.errors import ConfigError
from gendd_framework.registry import WEIGHT_SCHEDULES

Schedule = Callable[[StepContext], float]


def _granularity(value: str) -> str:
    if value not in ("epoch", "step"):
        raise ConfigError(f"schedule granularity must be 'epoch' or 'step', got '{value}'")
    return value


@WEIGHT_SCHEDULES.register("constant")
def constant() -> Schedule:
    """Always 1."""
    return lambda ctx: 1.0


@WEIGHT_SCHEDULES.register("linear_warmup")
def linear_warmup(epochs: float = 20.0, granularity: str = "epoch") -> Schedule:
    """min(1, e/epochs): DKD/ReviewKD warm-up. `epoch`: e is the 1-indexed epoch (the first epoch gets
    1/epochs, as mdistiller); `step`: e is the fractional epoch count, so the ramp is smooth."""
    if epochs < 0:
        raise ConfigError(f"linear_warmup epochs must be >= 0, got {epochs}")
    mode = _granularity(granularity)

    def factor(ctx: StepContext) -> float:
        if epochs == 0:
            return 1.0
        done = ctx.epoch + 1 if mode == "epoch" else ctx.epoch_progress
        return min(1.0, done / epochs)

    return factor


@WEIGHT_SCHEDULES.register("cosine_decay")
def cosine_decay(start_epoch: float = 0.0, granularity: str = "epoch") -> Schedule:
    """1 up to `start_epoch`, then 0.5·(1 + cos(π·(e − e0)/(E − e0))) down to 0 at the last epoch E
    (WKD's weight decay; e is the 1-indexed epoch, or the fractional epoch count with `step`)."""
    mode = _granularity(granularity)

    def factor(ctx: StepContext) -> float:
        done = ctx.epoch + 1 if mode == "epoch" else ctx.epoch_progress
        if done <= start_epoch or ctx.epochs <= start_epoch:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (done - start_epoch) / (ctx.epochs - start_epoch)))

    return factor
