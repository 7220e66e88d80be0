"""Preflight's dry run: each training stage's method runs once, as its stage will run it, on a tiny batch
of the real training split, so that what only a running method can find (a value error raised in a later
step such as GenDD's contraction λ, a broken `training_step`, a `predict` missing a declared output)
fails before any stage trains or writes a file, in one line naming the stage and the method.

One dry run: `prepare` with stand-in teacher statistics (computed on the tiny batch; the cache folder is
never read or written), one `training_step` and `backward()` (no optimizer step), the loop's hooks in
their order, then `predict` in eval mode, whose outputs must cover what the method declares
(`output_names()`, its primary output and `trainer.select`'s output) as `(batch, num_classes)` logits.
The batch comes from the stage's own training loader (BatchDataset, label mask, the views the method
asks for, collate), cut to `SAMPLES` samples. It runs on the CPU in fp32 (on the rank's GPU under
NCCL, whose collectives CRD and GenDD call in their step); the caller restores every RNG afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from gendd_framework.context import StepContext, to_device
from gendd_framework.data.base import BatchDataset, DataSplits
from gendd_framework.engine import distributed
from gendd_framework.engine.loggers import LoggerGroup
from gendd_framework.engine.statistics import TeacherStatistics
from gendd_framework.errors import ConfigError
from gendd_framework.methods.base import release_taps, required_views
from gendd_framework.models.tap import FeatureTap
from gendd_framework.runtime import RunContext

SAMPLES = 2  # enough for BatchNorm in train mode; a forward/backward of 2 samples costs little
# Methods are built for this many training samples (`facts.num_samples`), their statistics taken on as
# many spread over the split: per-sample memories (CRD's banks, ~1.3 GB on ImageNet) are not built a
# second time, and every class of a class-sorted split (ImageFolder) is still among them.
STAND_IN_SAMPLES = 64


class StandInStatistics(TeacherStatistics):
    """What `prepare` reads, for the dry run: the stage's statistics dataset (so size and label checks
    are real; every label visible, so no teacher pass over hidden ones) and class features taken from
    the tiny batch and given to every class (real shapes, meaningless values). No weights digest, no
    cache folder: nothing is read from or written to disk."""

    def __init__(self, teacher: nn.Module, dataset: Dataset, num_classes: int, inputs: torch.Tensor) -> None:
        super().__init__(teacher, dataset, num_classes, inputs.device, cache_dir=None, data_key={})
        self.batch_size = len(dataset)
        self.inputs = inputs

    @property
    def key(self) -> str:
        return "preflight-stand-in"

    @torch.no_grad()
    def class_features(self, tap: str = "feature", max_per_class: int | None = None) -> list[torch.Tensor]:
        probe = FeatureTap(self.teacher, [tap])
        probe.eval()
        rows = probe(self.inputs)[tap].float().flatten(1).cpu()
        release_taps(probe)
        return [rows[:max_per_class] if max_per_class else rows] * self.num_classes


@contextlib.contextmanager
def blame(where: str) -> Iterator[None]:
    """A ConfigError gets `where` in front (still one line); any other error keeps its traceback (the
    CLI shows a plugin's frames) with `where` added as a note."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except Exception as exc:
        exc.add_note(f"(raised in {where})")
        raise


def dry_run_device() -> torch.device:
    """The CPU, or this rank's GPU when ranks talk through NCCL (it only moves CUDA tensors)."""
    current = distributed.info()
    if current.world_size > 1 and current.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DryRun:
    """Runs methods once on the run's tiny batch; one instance per preflight (batches are reused)."""

    def __init__(self, cfg: DictConfig, data: DataSplits, loader_cfg: dict[str, Any]) -> None:
        self.device = dry_run_device()
        self.ctx = RunContext(cfg, Path(), self.device, data, loader_cfg, LoggerGroup([]))
        self.num_classes = data.num_classes
        self.epochs = int(cfg.trainer.epochs)
        n = len(data.train)
        self.stand_in = torch.linspace(0, n - 1, min(n, STAND_IN_SAMPLES)).round().long().unique().tolist()
        self.facts = dataclasses.replace(self.ctx.facts, num_samples=len(self.stand_in))
        self._batches: dict[tuple[bool, int], dict[str, Any]] = {}

    def batch(self, all_labels: bool, views: int) -> dict[str, Any]:
        """The first SAMPLES samples of the stage's training loader (its dataset, views and collate)."""
        key = (all_labels, views)
        if key not in self._batches:
            loader, _ = self.ctx.loader("train", shuffle_seed=0, all_labels=all_labels, views=views)
            k = min(SAMPLES, len(loader.dataset))
            tiny = DataLoader(Subset(loader.dataset, range(k)), batch_size=k, collate_fn=loader.collate_fn)
            self._batches[key] = to_device(next(iter(tiny)), self.device)
        return self._batches[key]

    def statistics(self, teacher: nn.Module, inputs: torch.Tensor) -> StandInStatistics:
        data = self.ctx.data
        dataset = BatchDataset(data.train_plain or data.train)  # as the stage's statistics, all labels
        return StandInStatistics(teacher, Subset(dataset, self.stand_in), self.num_classes, inputs)

    def check(
        self,
        method: nn.Module,
        *,
        stage: str,
        name: str,
        select: str | None = None,
        all_labels: bool = False,
        epochs: int | None = None,
    ) -> None:
        """The loop's calls in its order, once: prepare (when the method has a teacher, as the stage
        does), on_epoch_start, training_step, backward, after_optimizer_step (no update before it),
        on_epoch_end, then on_evaluate_start and predict in eval mode. The method's taps are released
        afterwards (the preflight teacher is shared by every stage's check)."""
        where = f"preflight of stage '{stage}', method '{name}'"
        try:
            with blame(where):
                views = required_views(method, self.facts.sample_keys)
            batch = self.batch(all_labels, views)
            method.to(self.device)
            teacher = getattr(method, "teacher", None)
            if teacher is not None:
                with blame(f"{where}, prepare"):
                    method.prepare(self.statistics(teacher.model, batch["input"]))
            epochs = epochs or self.epochs
            steps = max(1, -(-len(self.ctx.data.train) // int(self.ctx.loader_cfg["batch_size"])))
            step = StepContext(0, 0, steps, steps * epochs, epochs)
            method.train()
            with blame(f"{where}, training_step"):
                method.on_epoch_start(0)
                losses = method.training_step(batch, step)
            loss = check_losses(losses, f"{where}, training_step")
            with blame(f"{where}, backward"):
                loss.backward()
            method.zero_grad(set_to_none=True)
            with blame(f"{where}, after_optimizer_step"):
                method.after_optimizer_step(step)
                method.on_epoch_end(0)
            method.eval()
            with blame(f"{where}, predict"), torch.no_grad():
                method.on_evaluate_start()
                outputs = method.predict(batch["input"])
            check_outputs(method, outputs, len(batch["input"]), self.num_classes, select, f"{where}, predict")
        finally:
            release_taps(method)


def check_losses(losses: Any, where: str) -> torch.Tensor:
    """The step's 'loss': a scalar tensor that depends on something trainable."""
    if not isinstance(losses, Mapping) or not isinstance(losses.get("loss"), torch.Tensor):
        got = sorted(losses) if isinstance(losses, Mapping) else type(losses).__name__
        raise ConfigError(f"{where} must return a dict with a 'loss' tensor, got {got}")
    loss = losses["loss"]
    if loss.ndim != 0:
        raise ConfigError(f"{where}: 'loss' must be a scalar, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ConfigError(f"{where}: 'loss' does not depend on any trainable parameter (no gradient)")
    return loss


def check_outputs(
    method: nn.Module, outputs: Any, batch_size: int, num_classes: int, select: str | None, where: str
) -> None:
    """`predict` returns every declared output (and trainer.select's) as (batch, num_classes) logits."""
    primary = getattr(method, "primary_output", "student")
    declared = list(dict.fromkeys([*method.output_names(), primary]))
    if not isinstance(outputs, Mapping):
        raise ConfigError(f"{where} must return a dict of logits, got {type(outputs).__name__}")
    missing = [k for k in declared if k not in outputs]
    if missing:
        raise ConfigError(
            f"{where} returned outputs {sorted(outputs)} but the method declares {declared} "
            f"(primary_output '{primary}', output_names()): missing {missing}"
        )
    wanted = select.split("/", 1)[1] if select and "/" in select else None
    if wanted is not None and wanted not in outputs:
        raise ConfigError(
            f"{where}: trainer.select='{select}' needs output '{wanted}', got {sorted(outputs)}"
        )
    for key, value in outputs.items():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        if shape != (batch_size, num_classes):
            raise ConfigError(
                f"{where}: output '{key}' is {shape}; evaluation needs logits of shape "
                f"(batch, num_classes) = ({batch_size}, {num_classes})"
            )
