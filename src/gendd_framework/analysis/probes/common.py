"""What every probe shares: the probed images with both models' clean predictions, batched
no-grad prediction, and the result type a probe returns."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gendd_framework.errors import ConfigError


class ProbeUnavailable(ConfigError):
    """A probe cannot run on these models or inputs (e.g. Grad-CAM on an MLP); the message is the
    one-line reason recorded in probe.json instead of a result."""


@dataclass
class ProbeResult:
    """`metrics`: flat scalars (`<probe>/<metric>`); `details`: small JSON-able extras (per transform,
    per bin); `arrays`: tensors for pictures only, never written to JSON."""

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the probe (BN/dropout fixed), each model's own mode restored afterwards."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def predict(
    model: nn.Module,
    inputs: torch.Tensor,
    batch_size: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Float logits on the CPU for every input (optionally transformed per batch), in eval mode."""
    device = model_device(model)
    out = []
    with eval_mode(model):
        for part in batches(len(inputs), batch_size):
            x = inputs[part]
            if transform is not None:
                x = transform(x)
            out.append(model(x.to(device)).float().cpu())
    return torch.cat(out)


@dataclass
class ProbeData:
    """The probed images (model input space, CPU) with labels and both models' clean logits."""

    inputs: torch.Tensor
    targets: torch.Tensor
    teacher_logits: torch.Tensor
    student_logits: torch.Tensor
    batch_size: int = 256

    @property
    def teacher_pred(self) -> torch.Tensor:
        return self.teacher_logits.argmax(1)

    @property
    def student_pred(self) -> torch.Tensor:
        return self.student_logits.argmax(1)

    @property
    def input_std(self) -> float:
        """The probed inputs' overall standard deviation: the unit of noise, brightness and eps."""
        return float(self.inputs.double().std())

    @property
    def value_range(self) -> tuple[float, float]:
        return float(self.inputs.min()), float(self.inputs.max())


def probe_data(
    teacher: nn.Module, student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int
) -> ProbeData:
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise ConfigError(f"probes need matching non-empty inputs/targets, got {len(inputs)}/{len(targets)}")
    inputs, targets = inputs.float().cpu(), targets.long().cpu()
    return ProbeData(
        inputs,
        targets,
        predict(teacher, inputs, batch_size),
        predict(student, inputs, batch_size),
        batch_size,
    )


def require_images(inputs: torch.Tensor, probe: str) -> None:
    """Image probes need (N, C, H, W) inputs."""
    if inputs.dim() != 4:
        raise ProbeUnavailable(
            f"{probe} transforms images, but the inputs have shape {tuple(inputs.shape[1:])}, not (C, H, W)"
        )


def percent(mask: torch.Tensor) -> float:
    """Share of True in %, NaN for an empty mask (nothing to measure is not 0%)."""
    return float(100.0 * mask.double().mean()) if mask.numel() else float("nan")
