"""The Trainer: one loop for every method and stage.

It owns device placement, autocast, gradient accumulation and clipping, per-iteration LR schedules,
evaluation on the validation split every N epochs, atomic last/best checkpoints with RNG state (so a
resumed run continues exactly), metric logging and a progress bar. Methods only provide
`training_step`, `predict` and `param_groups`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gendd_framework.context import StepContext, to_device
from gendd_framework.engine import checkpoint as ckpt
from gendd_framework.engine.loggers import MetricLogger, truncate_jsonl
from gendd_framework.engine.metrics import MetricAccumulator
from gendd_framework.errors import ConfigError

StepCallback = Callable[[int, int, torch.optim.Optimizer], None]


@dataclass
class TrainerConfig:
    """Loop settings (the `trainer:` config group)."""

    epochs: int = 10
    eval_every: int = 1
    grad_clip: float | None = None
    accum_steps: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16
    progress: bool = True
    log_every: int = 20
    resume: bool = False
    select: str | None = None  # metric used for "best"; default: acc of the method's primary output


def optimizer_steps_per_epoch(batches: int, accum_steps: int) -> int:
    """Optimizer updates per epoch: schedules advance once per update, not per micro-batch."""
    return -(-batches // max(1, accum_steps))


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ConfigError(f"trainer.precision must be one of fp32, bf16, fp16; got '{precision}'")
    return torch.autocast(device_type=device.type, dtype=dtypes[precision])


@torch.no_grad()
def evaluate(
    method,
    loader: DataLoader,
    device: torch.device,
    precision: str = "fp32",
    teacher: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Accuracy, CE and ECE of every named output of `method.predict` over `loader`, plus agreement and
    KL with `teacher` when one is given (see engine/metrics.py)."""
    method.eval()
    method.on_evaluate_start()
    if teacher is not None:
        teacher.eval()
    metrics = MetricAccumulator()
    for batch in loader:
        batch = to_device(batch, device)
        x, y = batch["input"], batch["target"]
        with autocast_context(device, precision):
            outputs = method.predict(x)
            teacher_logits = teacher(x) if teacher is not None else None
        metrics.update(outputs, y, teacher_logits)
    return metrics.result()


class Trainer:
    """Fits one method for one stage; checkpoints go to `<ckpt_dir>/<stage>_{last,best}.pt`."""

    def __init__(
        self,
        method,
        optimizer: torch.optim.Optimizer,
        scheduler,
        train_loader: DataLoader,
        val_loader: DataLoader | None,
        *,
        config: TrainerConfig,
        device: torch.device,
        ckpt_dir: str | Path,
        stage: str,
        logger: MetricLogger,
        shuffle_seed: int = 0,
        shuffle_generator: torch.Generator | None = None,
        step_callbacks: list[StepCallback] | None = None,
        reference: torch.nn.Module | None = None,
    ) -> None:
        self.method, self.optimizer, self.scheduler = method, optimizer, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.cfg, self.device, self.stage, self.logger = config, device, stage, logger
        self.ckpt_dir = Path(ckpt_dir)
        self.shuffle_seed, self.shuffle_generator = shuffle_seed, shuffle_generator
        self.step_callbacks = step_callbacks or []
        self.reference = reference  # the teacher that validation metrics (agreement, KL) compare with
        self.select = config.select or f"acc/{getattr(method, 'primary_output', 'student')}"
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        self.epoch, self.step = 0, 0
        self.best: dict[str, Any] = {"epoch": -1, "value": float("-inf"), "metrics": {}}

    # -- checkpoints ----------------------------------------------------------------------------
    def path(self, which: str) -> Path:
        return self.ckpt_dir / f"{self.stage}_{which}.pt"

    def state(self) -> dict[str, Any]:
        return {
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "rng": ckpt.rng_state(),
        }

    def restore(self, path: Path) -> None:
        state = ckpt.load(path)
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.best = state["epoch"], state["step"], state["best"]
        ckpt.set_rng_state(state["rng"])

    # -- loop -----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train for `epochs` (continuing from `<stage>_last.pt` if `resume`), return the best record."""
        jsonl = getattr(self.logger, "jsonl_path", None)
        if self.cfg.resume and self.path("last").exists():
            self.restore(self.path("last"))
            if jsonl is not None:
                truncate_jsonl(jsonl, self.stage, self.step)
        total_steps = self.cfg.epochs * optimizer_steps_per_epoch(
            len(self.train_loader), self.cfg.accum_steps
        )
        while self.epoch < self.cfg.epochs:
            self.train_one_epoch(total_steps)
            self.epoch += 1
            if self.val_loader is not None and (
                self.epoch % self.cfg.eval_every == 0 or self.epoch == self.cfg.epochs
            ):
                metrics = evaluate(
                    self.method, self.val_loader, self.device, self.cfg.precision, self.reference
                )
                self.logger.log(
                    {
                        "stage": self.stage,
                        "epoch": self.epoch,
                        "step": self.step,
                        **{f"val/{k}": v for k, v in metrics.items()},
                    }
                )
                if self.select not in metrics:
                    raise ConfigError(f"trainer.select='{self.select}' is not among {sorted(metrics)}")
                if metrics[self.select] > self.best["value"]:
                    self.best = {"epoch": self.epoch, "value": metrics[self.select], "metrics": metrics}
                    ckpt.atomic_save(
                        {"method": self.method.state_dict(), "epoch": self.epoch}, self.path("best")
                    )
            ckpt.atomic_save(self.state(), self.path("last"))
        return self.best

    def train_one_epoch(self, total_steps: int) -> None:
        self.method.train()
        if self.shuffle_generator is not None:  # the order depends only on (seed, epoch): resume-safe
            self.shuffle_generator.manual_seed(self.shuffle_seed * 1_000_003 + self.epoch)
        accum = max(1, self.cfg.accum_steps)
        steps_per_epoch = optimizer_steps_per_epoch(len(self.train_loader), accum)
        running: dict[str, float] = {}
        count, started = 0, time.perf_counter()
        bar = tqdm(
            self.train_loader,
            desc=f"{self.stage} {self.epoch + 1}/{self.cfg.epochs}",
            disable=not self.cfg.progress,
            leave=False,
            dynamic_ncols=True,
        )
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            batch = to_device(batch, self.device)
            ctx = StepContext(self.step, self.epoch, steps_per_epoch, total_steps, self.cfg.epochs)
            with autocast_context(self.device, self.cfg.precision):
                losses = self.method.training_step(batch, ctx)
            loss = losses["loss"]
            self.scaler.scale(loss / accum).backward()
            if (i + 1) % accum == 0 or i + 1 == len(self.train_loader):
                self.optimizer_step(total_steps)
            for k, v in losses.items():  # summed on device: no host sync per step
                running[k] = running.get(k, 0.0) + v.detach().float()
            count += 1
            if count % self.cfg.log_every == 0 or i + 1 == len(self.train_loader):
                mean_loss = running["loss"].item() / count
                if mean_loss != mean_loss or mean_loss in (float("inf"), float("-inf")):
                    raise FloatingPointError(f"non-finite loss in {self.stage} by step {self.step}")
                bar.set_postfix(loss=f"{mean_loss:.4f}")
        elapsed = time.perf_counter() - started
        record = {
            "stage": self.stage,
            "epoch": self.epoch + 1,
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_time_s": round(elapsed, 3),
        }
        record.update({f"train/{k}": float(v) / max(count, 1) for k, v in running.items()})
        self.logger.log(record)

    def optimizer_step(self, total_steps: int) -> None:
        before_step = getattr(self.optimizer, "before_step", None)  # e.g. the AdamW beta2 ramp
        if before_step is not None:
            before_step(self.step, total_steps)
        for callback in self.step_callbacks:
            callback(self.step, total_steps, self.optimizer)
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
