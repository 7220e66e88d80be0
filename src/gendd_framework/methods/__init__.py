"""Distillation methods (registered by name) and their loss terms."""

from gendd_framework.methods import compose, feature, gendd, logit, schedules, terms  # noqa: F401
from gendd_framework.methods.base import Method, freeze, split_decay

__all__ = ["Method", "freeze", "split_decay"]
