"""Building blocks of `benchmarks/gpu_check.py`: a synthetic CIFAR-100 folder, the recipes' models and
training step on a device, timing with device synchronisation, the data-loader pass and the CLI runs.

Everything goes through the framework's own code (Hydra composition of the real recipes, `build_data`,
`RunContext.loader`, `student_method`, `apply_speed`, `build_optimizer`, `autocast_context`), so a GPU
failure here is a failure of the path a user's run takes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import pickle
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from omegaconf import DictConfig

from gendd_framework.cli import config_dir
from gendd_framework.config import apply_recipe
from gendd_framework.context import StepContext, to_device
from gendd_framework.engine.loggers import LoggerGroup
from gendd_framework.engine.optim import build_optimizer
from gendd_framework.engine.speed import apply_speed
from gendd_framework.engine.trainer import autocast_context
from gendd_framework.methods.base import freeze
from gendd_framework.models import build_model
from gendd_framework.registry import split_spec
from gendd_framework.runtime import RunContext, build_data
from gendd_framework.stages import student_method, teacher_architecture

CIFAR100_FOLDER = "cifar-100-python"  # what data/vision.py expects under data.root
MIB = 2**20


# -- a CIFAR-100 folder without downloading anything ----------------------------------------------
def write_synthetic_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """`root/cifar-100-python/{train,test,meta}` in torchvision's python-pickle layout with random uint8
    pixels and balanced labels, so the real loader (PIL conversion, crop, flip, normalise, collation,
    workers) runs on data of the real shape. Returns `root` (the value for `data.root`)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / CIFAR100_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("test", n_test)):
        fine = rng.permutation(np.arange(count) % 100)
        entry = {
            "batch_label": f"synthetic {split}",
            "filenames": [f"synthetic_{i:05d}.png" for i in range(count)],
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "data": rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8),  # RRR..GGG..BBB rows
        }
        with open(folder / split, "wb") as fh:
            pickle.dump(entry, fh, protocol=4)
    meta = {
        "fine_label_names": [f"class_{i:02d}" for i in range(100)],
        "coarse_label_names": [f"superclass_{i:02d}" for i in range(20)],
    }
    with open(folder / "meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=4)
    return Path(root)


@contextlib.contextmanager
def without_cifar_checksums() -> Iterator[None]:
    """torchvision compares the CIFAR files with the published MD5 sums, which random files cannot match:
    while the datasets are built a file only has to exist. Reading and transforms are unchanged."""
    import torchvision.datasets.cifar as cifar

    with mock.patch.object(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)):
        yield


# -- the recipes -----------------------------------------------------------------------------------
def compose_recipe(experiment: str, overrides: list[str]) -> DictConfig:
    """The composed `gendd-train experiment=<experiment> <overrides>` config, recipe values merged in."""
    from hydra import compose, initialize_config_dir

    args = [f"experiment={experiment}", *overrides]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args)
    return apply_recipe(cfg, args)


def recipe_context(cfg: DictConfig, work: Path, device: torch.device) -> RunContext:
    """What a run of `cfg` would train on (its data splits and loader settings) on `device`."""
    with without_cifar_checksums():
        data, loader_cfg = build_data(cfg.data)
    return RunContext(
        cfg=cfg, run_dir=work, device=device, data=data, loader_cfg=loader_cfg, logger=LoggerGroup([])
    )


def first_batch(ctx: RunContext) -> dict[str, Any]:
    """One training batch from the recipe's own loader, on the device (data loading then excluded)."""
    loader, _ = ctx.loader("train", shuffle_seed=0)
    return to_device(next(iter(loader)), ctx.device)


def training_step(
    ctx: RunContext, batch: dict[str, Any], precision: str, speed: dict[str, Any]
) -> tuple[Callable[[], torch.Tensor], list[str]]:
    """A step of the recipe's distillation stage as the Trainer takes it (zero_grad, autocast forward,
    backward, optimizer step) with untrained teacher weights (timings do not depend on them).
    Returns the step (it returns the detached loss) and the speed options `apply_speed` applied."""
    cfg = ctx.cfg
    torch.manual_seed(int(cfg.seed))
    num_classes = ctx.data.num_classes
    teacher = freeze(teacher_architecture(cfg.teacher, num_classes))
    student = build_model(cfg.student, num_classes=num_classes)
    method = student_method(cfg.method, student, teacher, ctx.facts).to(ctx.device).train()
    applied = apply_speed(method, speed)
    _, optim_kwargs = split_spec(cfg.optim, "optimizer")
    optimizer = build_optimizer(cfg.optim, method.param_groups(optim_kwargs.get("weight_decay", 0.0)))
    step_ctx = StepContext()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(ctx.device, precision):
            loss = method.training_step(batch, step_ctx)["loss"]
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step, applied


# -- timing ----------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels: a CUDA timer read without it measures the launches only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device, compiled: bool = False) -> None:
    """Free what the previous measurement left (so each peak-memory figure is its own)."""
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_step(
    step: Callable[[], torch.Tensor], device: torch.device, images: int, warmup: int, rounds: int, steps: int
) -> dict[str, Any]:
    """Images/s of `step` per round of `steps` steps after `warmup` steps (which include any
    compilation), each round closed by a device synchronisation; peak device memory of the timed steps."""
    started = time.perf_counter()
    loss = None
    for _ in range(warmup):
        loss = step()
    synchronize(device)
    warmup_s = time.perf_counter() - started
    resident = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device) / MIB
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(steps):
            loss = step()
        synchronize(device)
        rates.append(steps * images / (time.perf_counter() - started))
    median = statistics.median(rates)
    final = float(loss) if loss is not None else math.nan
    record: dict[str, Any] = {
        "batch": images,
        "warmup_steps": warmup,
        "warmup_s": round(warmup_s, 3),
        "rounds": rounds,
        "steps_per_round": steps,
        "images_per_s": rates,
        "median_images_per_s": median,
        "best_images_per_s": max(rates),
        "ms_per_step": 1000 * images / median,
        "final_loss": final,
        "finite": math.isfinite(final),
        "resident_mib": resident,
        "peak_allocated_mib": None,
        "peak_reserved_mib": None,
    }
    if device.type == "cuda":
        record["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        record["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / MIB
    return record


def loader_throughput(ctx: RunContext, max_batches: int | None) -> dict[str, Any]:
    """Images/s of the recipe's training loader (its workers, pinning, transforms) including the copy to
    the device, as the Trainer consumes it; the first batch (worker start-up) is timed apart."""
    loader, _ = ctx.loader("train", shuffle_seed=0)
    started = time.perf_counter()
    batches = iter(loader)
    to_device(next(batches), ctx.device)
    synchronize(ctx.device)
    first_s = time.perf_counter() - started
    count = images = 0
    started = time.perf_counter()
    for batch in batches:
        to_device(batch, ctx.device)
        count, images = count + 1, images + len(batch["target"])
        if max_batches is not None and count >= max_batches:
            break
    synchronize(ctx.device)
    seconds = time.perf_counter() - started
    del batches  # shuts the workers down
    return {
        "num_workers": loader.num_workers,
        "pin_memory": bool(loader.pin_memory),
        "batch_size": loader.batch_size,
        "train_images": len(loader.dataset),
        "first_batch_s": round(first_s, 3),
        "batches": count,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": images / seconds if seconds > 0 else math.nan,
    }


# -- the CLI ---------------------------------------------------------------------------------------
def train_command() -> list[str]:
    """`gendd-train` next to this interpreter (an installed environment), else the same entry point as a
    module (a source checkout on PYTHONPATH, e.g. a machine where nothing can be installed)."""
    script = Path(sys.executable).with_name("gendd-train")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "gendd_framework.cli"]


def cli_run(
    experiment: str, overrides: list[str], run_dir: Path, env: dict[str, str], timeout: float
) -> dict:
    """One `gendd-train experiment=<experiment> <overrides>` run: exit status, wall time, device and test
    accuracy from its summary.json; its output goes to <run_dir>.log."""
    command = [*train_command(), f"experiment={experiment}", *overrides, f"hydra.run.dir={run_dir}"]
    log = run_dir.with_suffix(".log")
    started = time.perf_counter()
    with open(log, "w") as fh:
        try:
            status: int | str = subprocess.run(
                command, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            status = f"timeout after {timeout:.0f} s"
    record: dict[str, Any] = {
        "experiment": experiment,
        "command": " ".join(["gendd-train", *command[len(train_command()) :]]),
        "entry_point": " ".join(train_command()),
        "exit_status": status,
        "wall_s": round(time.perf_counter() - started, 2),
        "log": str(log),
    }
    summary_path = run_dir / "summary.json"
    if status == 0 and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        record["device"] = summary.get("device")
        record["run_elapsed_s"] = summary.get("elapsed_s")
        record["teacher_source"] = (summary.get("teacher") or {}).get("source")
        record["test_accuracy"] = {
            f"{stage}/{key[4:]}": value
            for stage in ("teacher", "distill")
            for key, value in ((summary.get(stage) or {}).get("test") or {}).items()
            if key.startswith("acc/")
        }
    else:
        record["output_tail"] = log.read_text()[-1500:]
    return record
