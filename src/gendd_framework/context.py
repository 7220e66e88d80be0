"""What every training step is told: a batch as a mapping and where the loop stands (StepContext);
what a method may know of the data when it is built (DataFacts).

Batches are dicts so methods can read more than (input, target): CRD needs sample ids (`index`), a
semi-supervised transfer set marks unlabelled samples with target -1, a two-view method reads a second
augmented draw of each sample as `input_1`. Warm-ups and weight schedules read the StepContext instead
of counting steps in buffers of their own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from gendd_framework.errors import ConfigError

UNLABELLED = -1  # target value of a sample whose label the student may not see
VIEW_PREFIX = "input_"  # `input_1`, `input_2`, ...: further augmented draws of a training sample


def view_key(k: int) -> str:
    """The batch key of augmented view `k` of a sample (view 0 is `input`)."""
    return "input" if k == 0 else f"{VIEW_PREFIX}{k}"


def view_index(key: str) -> int | None:
    """`input_3` -> 3; None for a key that is not a view."""
    rest = key[len(VIEW_PREFIX) :] if key.startswith(VIEW_PREFIX) else ""
    return int(rest) if rest.isdigit() and int(rest) > 0 else None


@dataclass(frozen=True)
class DataFacts:
    """What a method may know of the data when it is built (passed as `facts=`; loss terms get it in
    `bind`): nothing is read from the data beyond these. Reads like a mapping too (`facts["input_shape"]`).

    `sample_keys` are the keys of a training batch as served (`input`, `target`, `index`, a mapping
    dataset's own keys, and `all_labelled`, which the loop adds); views `input_1`, ... are drawn on
    request (`Method.batch_keys`) and are not listed. `all_labelled` is False when the training split
    hides some labels (target -1: a transfer set)."""

    num_classes: int | None
    input_shape: tuple[int, ...] | None = None
    num_samples: int | None = None  # size of the training split (per-sample memories)
    sample_keys: tuple[str, ...] = ("input", "target", "index", "all_labelled")
    all_labelled: bool = True

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in self.keys() else default

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (recorded with a run's export, so the method can be rebuilt)."""
        out = asdict(self)
        out["input_shape"] = list(self.input_shape) if self.input_shape is not None else None
        out["sample_keys"] = list(self.sample_keys)
        return out

    @classmethod
    def from_dict(cls, node: Mapping[str, Any]) -> DataFacts:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in node.items() if k in known}
        if values.get("input_shape") is not None:
            values["input_shape"] = tuple(values["input_shape"])
        if "sample_keys" in values:
            values["sample_keys"] = tuple(values["sample_keys"])
        return cls(**values)


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
