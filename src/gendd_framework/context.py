"""What every training step is told: a batch as a mapping and where the loop stands (StepContext).

Batches are dicts so methods can read more than (input, target): CRD needs sample ids (`index`), a
semi-supervised transfer set marks unlabelled samples with target -1. Warm-ups and weight schedules read
the StepContext instead of counting steps in buffers of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gendd_framework.errors import ConfigError

UNLABELLED = -1  # target value of a sample whose label the student may not see


@dataclass(frozen=True)
class StepContext:
    """Where the loop stands when `training_step` runs (steps count optimizer updates, from 0)."""

    step: int = 0
    epoch: int = 0  # 0-indexed epoch being trained
    steps_per_epoch: int = 1
    total_steps: int = 1
    epochs: int = 1

    @property
    def epoch_progress(self) -> float:
        """Epochs completed so far as a float (step / steps_per_epoch)."""
        return self.step / max(self.steps_per_epoch, 1)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return min(1.0, self.step / max(self.total_steps, 1))


def as_batch(item: Any, index: int | None = None) -> dict[str, Any]:
    """One sample as `{"input", "target", "index", ...}`; mappings pass through, `(x, y)` is wrapped."""
    if isinstance(item, Mapping):
        missing = {"input", "target"} - set(item)
        if missing:
            raise ConfigError(
                f"a dataset sample mapping needs keys 'input' and 'target', missing {sorted(missing)}"
            )
        out = dict(item)
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        out = {"input": item[0], "target": item[1]}
    else:
        raise ConfigError(
            "dataset samples must be (input, target) pairs or mappings with 'input'/'target', "
            f"got {type(item).__name__}"
        )
    if index is not None:
        out.setdefault("index", index)
    return out


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to `device` (other values unchanged). `all_labelled` is read from
    the targets on the host first, so label-aware terms never sync with the device to branch on it."""
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    target = batch.get("target")
    if "all_labelled" not in out and isinstance(target, torch.Tensor) and target.device.type == "cpu":
        out["all_labelled"] = bool((target != UNLABELLED).all())
    return out


def labelled_mask(target: torch.Tensor) -> torch.Tensor:
    """True where the student may see the label."""
    return target != UNLABELLED


def distill_targets(
    target: torch.Tensor, teacher_logits: torch.Tensor | None, all_labelled: bool | None = None
) -> torch.Tensor:
    """Class indices for terms that decompose around a class (DKD, WKD-L, PLD, contraction): the label
    where the student may see it, else the teacher's prediction (the transfer-set convention).
    `all_labelled` (the batch's host-side flag) skips the device check."""
    if all_labelled is None:
        all_labelled = not bool((target == UNLABELLED).any())  # a host sync on an accelerator
    if all_labelled:
        return target
    hidden = ~labelled_mask(target)
    if teacher_logits is None:
        raise ConfigError("unlabelled samples need a teacher to stand in for their labels")
    return torch.where(hidden, teacher_logits.argmax(dim=1), target)
