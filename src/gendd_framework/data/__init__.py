"""Datasets and transforms, registered by name."""

from gendd_framework.data import digits, vision  # noqa: F401  (registration side effects)
from gendd_framework.data.base import DataSplits

__all__ = ["DataSplits"]
