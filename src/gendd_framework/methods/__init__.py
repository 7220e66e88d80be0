"""Distillation methods (registered by name) and their loss terms."""

from gendd_framework.methods import classic, gendd, losses  # noqa: F401  (registration side effects)
from gendd_framework.methods.base import Method, freeze, split_decay

__all__ = ["Method", "freeze", "split_decay"]
