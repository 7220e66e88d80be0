"""The losses of training steps: the finite check read once per optimizer step, and an epoch's running
sums kept on the device (no host sync per step)."""

from __future__ import annotations

import torch


def all_finite(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """One device-side bool for a losses dict: no host sync until someone reads it."""
    device = losses["loss"].device
    return torch.stack([torch.isfinite(v).all().to(device) for v in losses.values()]).all()


def stack_scalars(losses: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The losses as one float vector when every entry is a scalar on one device, else None."""
    values = list(losses.values())
    if any(v.ndim != 0 for v in values) or len({v.device for v in values}) != 1:
        return None
    return torch.stack([v.float() for v in values])


def all_finite_list(pending: list[dict[str, torch.Tensor]]) -> bool:
    return all(bool(all_finite(losses)) for losses in pending)


def first_non_finite(pending: list[dict[str, torch.Tensor]]) -> tuple[str, float]:
    """(key, value) of the first non-finite entry over micro-batches, 'loss' before the terms."""
    for losses in pending:
        for key in sorted(losses, key=lambda k: k != "loss"):  # stable: dict order after 'loss'
            flat = losses[key].float().flatten()
            bad = flat[~torch.isfinite(flat)]
            if bad.numel():
                return key, float(bad[0])
    raise AssertionError("first_non_finite called on finite losses")  # pragma: no cover


class RunningSums:
    """Per-key sums of an epoch's step losses, kept on the device (no host sync per step): one stacked
    vector add in the usual case of the same scalar keys every step, per-key sums otherwise."""

    def __init__(self) -> None:
        self.keys: list[str] | None = None
        self.vector: torch.Tensor | None = None
        self.running: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, detached: dict[str, torch.Tensor]) -> torch.Tensor:
        """Add one step's losses; returns whether all of them are finite (a device tensor)."""
        values = stack_scalars(detached)
        ok = torch.isfinite(values).all() if values is not None else all_finite(detached)
        if values is not None and self.keys in (None, list(detached)):
            self.keys = list(detached)
            self.vector = values if self.vector is None else self.vector + values
        else:  # keys changed or non-scalar entries
            for k, v in detached.items():
                self.running[k] = self.running.get(k, 0.0) + v.float()
        self.count += 1
        return ok

    def mean(self, key: str) -> float:
        total = self.vector[self.keys.index(key)] if self.keys and key in self.keys else self.running[key]
        return float(total) / max(self.count, 1)

    def totals(self) -> dict[str, float]:
        running = dict(self.running)
        if self.vector is not None:
            for k, v in zip(self.keys, self.vector):
                running[k] = running.get(k, 0.0) + v
        return {k: float(v) for k, v in running.items()}
