"""The Trainer: one loop for every method and stage.

It owns device placement, autocast, gradient accumulation and clipping, per-iteration LR schedules,
evaluation on the validation split every N epochs, atomic last/best checkpoints with RNG state (so a
resumed run continues exactly), metric logging, a progress bar (terminals only) and one console line per
epoch through `logging` (Hydra sends it to the console and `<run_dir>/<job>.log`). A non-finite loss
stops the run on the step it happens, before the optimizer step. Methods only provide `training_step`,
`predict` and `param_groups`; the loop calls their optional hooks at fixed points (`METHOD_HOOKS`).
Under torchrun/SLURM the same loop runs on every rank: the step goes through DDP, metrics are gathered
over ranks and only rank 0 writes (engine/distributed.py).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gendd_framework.context import StepContext, to_device
from gendd_framework.engine import checkpoint as ckpt
from gendd_framework.engine import distributed
from gendd_framework.engine.loggers import MetricLogger, count_rows, truncate_jsonl
from gendd_framework.engine.metrics import MetricAccumulator
from gendd_framework.engine.step_losses import RunningSums, all_finite_list, first_non_finite
from gendd_framework.errors import ConfigError, NonFiniteLossError
from gendd_framework.schema import TrainerConfig

LOG = logging.getLogger("gendd_framework")
# Called on the method itself (every rank, never a DDP wrapper): after each optimizer update and its
# LR-schedule step with that step's StepContext; at the start and end of every training epoch with
# its 0-indexed number (the end before validation and the checkpoint). `on_evaluate_start` is called
# by `evaluate`.
METHOD_HOOKS = ("after_optimizer_step", "on_epoch_start", "on_epoch_end")


def method_hook(method: Any, name: str):
    """The method's hook `name`, or None when it has none or only the base class's no-op (so the hot
    loop does no work for it)."""
    fn = getattr(method, name, None)
    return None if not callable(fn) or getattr(fn, "noop_hook", False) else fn


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
    if isinstance(loader.dataset, distributed.EvalShard):  # this rank saw its shard: sum every rank's
        metrics.merge(distributed.all_gather_object(metrics.state()))
        if metrics.total != loader.dataset.full_size:
            raise AssertionError(
                f"evaluated {metrics.total} samples of a {loader.dataset.full_size}-sample split"
            )
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
        reference: torch.nn.Module | None = None,
    ) -> None:
        self.method, self.optimizer, self.scheduler = method, optimizer, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.cfg, self.device, self.stage, self.logger = config, device, stage, logger
        self.ckpt_dir = Path(ckpt_dir)
        self.shuffle_seed, self.shuffle_generator = shuffle_seed, shuffle_generator
        self.reference = reference  # the teacher that validation metrics (agreement, KL) compare with
        self.select = config.select or f"acc/{getattr(method, 'primary_output', 'student')}"
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        self.epoch, self.step = 0, 0
        self.best: dict[str, Any] = {"epoch": -1, "value": float("-inf"), "metrics": {}}
        self.jsonl: Path | None = getattr(logger, "jsonl_path", None)
        # the training step, through DDP when several ranks run (engine/distributed.py)
        self.dist = distributed.info()
        self.runner = distributed.StepRunner(
            method,
            optimizer,
            device,
            sync_bn=config.sync_bn,
            find_unused_parameters=config.find_unused_parameters,
        )
        self.hooks = {name: method_hook(method, name) for name in METHOD_HOOKS}

    # -- checkpoints ----------------------------------------------------------------------------
    def path(self, which: str) -> Path:
        return self.ckpt_dir / f"{self.stage}_{which}.pt"

    def state(self) -> dict[str, Any]:
        """Everything a resume needs; under DDP every rank calls it (RNG states are gathered)."""
        rngs = distributed.all_gather_object(ckpt.rng_state())
        extra = {"rng_ranks": rngs} if len(rngs) > 1 else {}
        return {
            **extra,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "rng": rngs[0],
            # this stage's JSONL records so far: a resume keeps exactly these (see truncate_jsonl)
            "log_rows": count_rows(self.jsonl, self.stage) if self.jsonl is not None else None,
        }

    def restore(self, path: Path) -> dict[str, Any]:
        state = ckpt.load(path)
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.best = state["epoch"], state["step"], state["best"]
        rngs = state.get("rng_ranks") or [state["rng"]]
        if len(rngs) == self.dist.world_size:
            ckpt.set_rng_state(rngs[self.dist.rank])
        else:  # e.g. an elastic restart with fewer ranks: data order is still exact, draws are not
            LOG.warning(
                "%s: checkpoint written by %d rank(s), resuming with %d: random draws differ from an "
                "uninterrupted run",
                self.stage,
                len(rngs),
                self.dist.world_size,
            )
            ckpt.seed_everything(distributed.rank_seed(self.shuffle_seed + self.epoch, self.dist.rank))
        return state

    # -- loop -----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train for `epochs` (continuing from `<stage>_last.pt` if `resume`), return the best record."""
        if self.dist.is_main:  # a killed save's orphan; no save of this run is in flight
            ckpt.remove_stale_tmp(self.ckpt_dir)
        if self.cfg.resume and distributed.broadcast_object(self.path("last").exists()):
            state = self.restore(self.path("last"))
            line = "resume=auto: continuing stage %s" if self.cfg.resume == "auto" else "%s: resumed"
            LOG.info(
                line + " from %s at epoch %d/%d (step %d)",
                self.stage,
                self.path("last"),
                self.epoch,
                self.cfg.epochs,
                self.step,
            )
            if self.jsonl is not None:
                truncate_jsonl(self.jsonl, self.stage, self.step, state.get("log_rows"))
            if self.train_loader.num_workers > 0 and self.train_loader.persistent_workers:
                LOG.warning(  # persistent workers carry their RNG across epochs instead of re-seeding
                    "%s: train loader has persistent_workers=True: augmentation draws after this "
                    "resume differ from an uninterrupted run (use persistent_workers=False)",
                    self.stage,
                )
        else:
            # every rank draws its own augmentation and noise; the data order comes from the sampler
            ckpt.seed_everything(distributed.rank_seed(self.shuffle_seed, self.dist.rank))
            if self.jsonl is not None:  # a fresh start replaces whatever an earlier attempt logged
                truncate_jsonl(self.jsonl, self.stage, -1, keep_rows=0)
        total_steps = self.cfg.epochs * optimizer_steps_per_epoch(
            len(self.train_loader), self.cfg.accum_steps
        )
        while self.epoch < self.cfg.epochs:
            started = time.perf_counter()
            record = self.train_one_epoch(total_steps)
            if self.hooks["on_epoch_end"] is not None:
                self.hooks["on_epoch_end"](self.epoch)
            self.runner.sync_buffers()  # every rank evaluates and saves rank 0's model
            self.epoch += 1
            metrics = None
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
                    if self.dist.is_main:
                        ckpt.atomic_save(
                            {"method": self.method.state_dict(), "epoch": self.epoch}, self.path("best")
                        )
                    LOG.info(
                        "%s: new best val %s %.4g at epoch %d -> %s",
                        self.stage,
                        self.select,
                        metrics[self.select],
                        self.epoch,
                        self.path("best"),
                    )
            ckpt.kill_point(self.stage, "epoch", self.epoch)  # test hook (inert unless its env var is set)
            state = self.state()  # a collective under DDP: every rank builds it, rank 0 writes it
            if self.dist.is_main:
                ckpt.atomic_save(state, self.path("last"))
            distributed.barrier()  # no rank reads a checkpoint before rank 0 has written it
            LOG.info(self.epoch_line(record, metrics, time.perf_counter() - started))
        return self.best

    def epoch_line(self, record: dict[str, Any] | None, metrics: dict | None, seconds: float) -> str:
        """`distill epoch 3/60  loss 0.4123  val acc/student 96.12  (1.2 s)`: one line, greppable."""
        parts = [f"{self.stage} epoch {self.epoch}/{self.cfg.epochs}"]
        if record and "train/loss" in record:
            parts.append(f"loss {record['train/loss']:.4f}")
        if metrics is not None and self.select in metrics:
            parts.append(f"val {self.select} {metrics[self.select]:.4g}")
        parts.append(f"({seconds:.1f} s)")
        return "  ".join(parts)

    def train_one_epoch(self, total_steps: int) -> dict[str, Any]:
        """One pass over the training split; returns (and logs) the epoch's train record.

        Non-finite losses are caught on the step: each micro-batch adds `isfinite` of its losses to a
        device-side flag (no sync), read once per optimizer step, before the update. That read is a
        host sync (free on CPU; on GPU it waits for the backward before queuing the update, as
        GradScaler's own inf check does every fp16 step). A sync-free flag could only be read a step
        late, after the bad update."""
        self.start_epoch()
        accum = max(1, self.cfg.accum_steps)
        steps_per_epoch = optimizer_steps_per_epoch(len(self.train_loader), accum)
        sums = RunningSums()
        pending: list[dict[str, torch.Tensor]] = []  # losses of the micro-batches since the last update
        finite: torch.Tensor | None = None
        started = time.perf_counter()
        bar = tqdm(
            self.train_loader,
            desc=f"{self.stage} {self.epoch + 1}/{self.cfg.epochs}",
            disable=not (self.cfg.progress and sys.stderr.isatty() and self.dist.is_main),  # not in logs
            leave=False,
            dynamic_ncols=True,
        )
        self.optimizer.zero_grad(set_to_none=True)
        with contextlib.closing(bar):
            for i, batch in enumerate(bar):
                batch = to_device(batch, self.device)
                ctx = StepContext(self.step, self.epoch, steps_per_epoch, total_steps, self.cfg.epochs)
                update = (i + 1) % accum == 0 or i + 1 == len(self.train_loader)
                with self.runner.sync(update):  # DDP all-reduces gradients on the update's micro-batch
                    with autocast_context(self.device, self.cfg.precision):
                        losses = self.runner(batch, ctx)
                    detached = {k: v.detach() for k, v in losses.items()}
                    ok = sums.add(detached)
                    finite = ok if finite is None else finite & ok
                    pending.append(detached)
                    loss = losses["loss"] if accum == 1 else losses["loss"] / accum
                    (self.scaler.scale(loss) if self.scaler.is_enabled() else loss).backward()
                if update:
                    if not distributed.all_true(finite):  # the one host sync per optimizer step
                        self.stop_non_finite(pending)
                    self.optimizer_step(total_steps, ctx)
                    pending, finite = [], None
                if not bar.disable and (
                    sums.count % self.cfg.log_every == 0 or i + 1 == len(self.train_loader)
                ):
                    bar.set_postfix(loss=f"{sums.mean('loss'):.4f}")
        return self.epoch_record(sums, time.perf_counter() - started)

    def start_epoch(self) -> None:
        """Train mode, the method's epoch hook, and this epoch's sampler, replay and worker seeds."""
        self.method.train()
        if self.hooks["on_epoch_start"] is not None:
            self.hooks["on_epoch_start"](self.epoch)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: this rank's shard of epoch's permutation
            sampler.set_epoch(self.epoch)
        dataset = getattr(self.train_loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):  # replayed augmentation views (engine/teacher_cache.py)
            dataset.set_epoch(self.epoch)
        if self.shuffle_generator is not None:  # depends only on (seed, epoch, rank): resume-safe
            seed = distributed.rank_seed(self.shuffle_seed * 1_000_003 + self.epoch, self.dist.rank)
            self.shuffle_generator.manual_seed(seed)

    def epoch_record(self, sums: RunningSums, elapsed: float) -> dict[str, Any]:
        """The epoch's train record (loss means over every rank's steps), logged and returned."""
        totals, count = distributed.mean_over_ranks(sums.totals(), sums.count)
        record = {
            "stage": self.stage,
            "epoch": self.epoch + 1,
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_time_s": round(elapsed, 3),
        }
        record.update({f"train/{k}": v / max(count, 1) for k, v in totals.items()})  # every rank's
        self.logger.log(record)
        return record

    def stop_non_finite(self, pending: list[dict[str, torch.Tensor]]) -> None:
        """Log the event and raise before the update: no optimizer step, no `last` checkpoint.
        Under DDP every rank stops; the first offending rank's value is reported."""
        local = first_non_finite(pending) if not bool(all_finite_list(pending)) else None
        key, value = next(f for f in distributed.all_gather_object(local) if f is not None)
        self.logger.log(
            {
                "stage": self.stage,
                "epoch": self.epoch + 1,
                "step": self.step,
                "event": "non_finite_loss",
                "key": key,
                "value": str(value),
            }
        )
        LOG.error("%s: non-finite loss '%s' = %s at step %d; stopping", self.stage, key, value, self.step)
        raise NonFiniteLossError(self.stage, self.step, key, value)

    def optimizer_step(self, total_steps: int, ctx: StepContext) -> None:
        """One update: clip, step, LR schedule, then the method's `after_optimizer_step(ctx)`."""
        before_step = getattr(self.optimizer, "before_step", None)  # e.g. the AdamW beta2 ramp
        if before_step is not None:
            before_step(self.step, total_steps)
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        ckpt.kill_point(self.stage, "step", self.step)
        after = self.hooks["after_optimizer_step"]
        if after is not None:
            after(ctx)
