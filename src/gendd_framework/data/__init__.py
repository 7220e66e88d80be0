"""Datasets, registered by name (their transforms are plain functions of each dataset module)."""

from gendd_framework.data import digits, vision  # noqa: F401  (registration side effects)
from gendd_framework.data.base import DataSplits

__all__ = ["DataSplits"]
