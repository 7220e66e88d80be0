"""Distillation methods (registered by name) and their loss terms."""

from gendd_framework.methods import (  # noqa: F401
    compose,
    feature,
    gendd,
    logit,
    schedules,
    self_distillation,
    terms,
)
from gendd_framework.methods.base import Method, freeze, split_decay

__all__ = ["Method", "freeze", "split_decay"]
