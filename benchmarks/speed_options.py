"""Images/s per speed option (trainer.precision, trainer.speed.*, optim kernels, teacher-output cache).

1. `digits`: digits KD (experiment=digits/kd: CNN teacher small_cnn [32,64,128] -> MLP student [32],
   batch 64, AdamW), one training epoch through the real `Trainer` and DataLoader (data loading
   included, num_workers 0), per option: fp32, bf16, channels_last, bf16+channels_last, teacher under
   no_grad, foreach / fused AdamW, compile (student+teacher), replayed augmentation without a cache,
   and replay with a warm teacher-output cache (the teacher never runs).
2. `gendd`: the CIFAR-shaped GenDD training step (resnet32x4 teacher -> resnet8x4 student, batch 64,
   diffusion_batch_mul 30, head width 1024 depth 3, teacher feature 256 = 4 tokens of 64; forward,
   backward, AdamW; random inputs, data loading excluded), per option: fp32, bf16, bf16+channels_last,
   bf16 with a warm teacher cache, fp32 with head checkpointing, and (with --compile) bf16 + compiled
   head / student / teacher.

Options are measured in one process, interleaved (every round runs every option, rotating the order);
we report the median over rounds and each option's per-round speed-up over fp32 (median), from wall-clock
time and from process CPU time (OMP_WAIT_POLICY=PASSIVE, so idle threads do not burn CPU: on a shared
machine the CPU-time figures are the steadier ones).

    python benchmarks/speed_options.py                     # both parts (~15-25 min on 2 cores)
    python benchmarks/speed_options.py --part gendd --compile
    python benchmarks/speed_options.py --quick             # tiny shapes, 2 rounds (smoke)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: CPU time counts work

import argparse  # noqa: E402
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from _common import machine_info, md_table, results_dir, write_outputs
from gendd_framework.context import StepContext
from gendd_framework.data.base import BatchDataset
from gendd_framework.data.replay import ReplayViews
from gendd_framework.engine.loggers import MetricLogger
from gendd_framework.engine.optim import adamw
from gendd_framework.engine.speed import apply_speed
from gendd_framework.engine.teacher_cache import TeacherCache
from gendd_framework.engine.trainer import Trainer, TrainerConfig, autocast_context
from gendd_framework.models import build_model
from gendd_framework.plugins import load_plugins
from gendd_framework.registry import DATASETS, METHODS

CPU = torch.device("cpu")
EPOCHS_PER_CALL = 3  # digits: one measurement = 3 epochs (~50 steps), long enough to time


class NullLogger(MetricLogger):
    def log(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, hparams, final_metrics) -> None:
        pass


# -- 1. digits KD ------------------------------------------------------------------------------------
DIGITS_OPTIONS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "channels_last": {"speed": {"channels_last": True}},
    "bf16+channels_last": {"precision": "bf16", "speed": {"channels_last": True}},
    "teacher no_grad": {"speed": {"teacher_mode": "no_grad"}},
    "AdamW foreach": {"optim": {"foreach": True}},
    "AdamW fused": {"optim": {"fused": True}},
    "compile student+teacher": {"speed": {"compile": {"student": True, "teacher": True}}, "compile": True},
    "replay views, no cache": {"replay": True},
    "replay + warm teacher cache": {"replay": True, "cache": True},
}


def digits_runner(option: dict[str, Any], splits, tmp: Path):
    torch.manual_seed(0)
    teacher = build_model({"name": "small_cnn", "in_channels": 1, "channels": [32, 64, 128]}, num_classes=10)
    student = build_model({"name": "mlp", "in_features": 64, "hidden": [32]}, num_classes=10)
    method = METHODS.build({"name": "kd"}, student=student, teacher=teacher.eval(), num_classes=10)
    apply_speed(method, option.get("speed"))
    dataset = BatchDataset(splits.train)
    cache = None
    if option.get("replay"):
        dataset = ReplayViews(dataset, seed=0, views=1)  # one view: the warm-up epoch fills it
    if option.get("cache"):
        cache = TeacherCache(tmp / "cache", "digits", len(dataset))
        method.teacher_cache = cache
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, batch_size=64, shuffle=True, drop_last=True, generator=gen)
    opt = adamw(method.param_groups(5e-4), lr=0.01, weight_decay=5e-4, **option.get("optim", {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = TrainerConfig(epochs=10**6, precision=option.get("precision", "fp32"), progress=False)
    loop = Trainer(method, opt, sched, loader, None, config=cfg, device=CPU, ckpt_dir=tmp, stage="bench",
                   logger=NullLogger(), shuffle_seed=0, shuffle_generator=gen)  # fmt: skip

    def epoch() -> int:
        for _ in range(EPOCHS_PER_CALL):
            loop.train_one_epoch(total_steps=10**6)
            loop.epoch += 1
        return EPOCHS_PER_CALL * len(loader) * 64

    return epoch, cache


# -- 2. GenDD CIFAR-shaped step ----------------------------------------------------------------------
GENDD_OPTIONS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "bf16+channels_last": {"precision": "bf16", "speed": {"channels_last": True}},
    "bf16 + warm teacher cache": {"precision": "bf16", "cache": True},
    "fp32 + head checkpointing": {"speed": {"head_checkpointing": True}},
}
GENDD_COMPILE = {
    "bf16 + compile head": {"precision": "bf16", "speed": {"compile": {"head": True}}, "compile": True},
    "bf16 + compile head+student+teacher": {
        "precision": "bf16",
        "speed": {"compile": {"head": True, "student": True, "teacher": True}},
        "compile": True,
    },
}


def gendd_runner(option: dict[str, Any], shape: dict[str, int], tmp: Path):
    torch.manual_seed(0)
    teacher = build_model({"name": "resnet32x4"}, num_classes=100)
    student = build_model({"name": "resnet8x4"}, num_classes=100)
    spec = {"name": "gendd", "tokenizer": {"name": "split", "token_dim": 64},
            "head": {"name": "mlp_adaln", "width": shape["width"], "depth": 3},
            "objective": {"name": "gaussian_diffusion", "num_timesteps": 1000, "schedule": "cosine"},
            "diffusion_batch_mul": shape["mul"]}  # fmt: skip
    method = METHODS.build(spec, student=student, teacher=teacher.eval(), num_classes=100).train()
    apply_speed(method, option.get("speed"))
    opt = adamw(method.param_groups(5e-4), lr=1e-3, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    b = shape["batch"]
    x, y = torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 100, (b,), generator=g)
    batch = {"input": x, "target": y, "index": torch.arange(b), "all_labelled": True}
    if option.get("cache"):
        method.teacher_cache = TeacherCache(tmp / "gendd_cache", "gendd", b)
    precision = option.get("precision", "fp32")

    def step() -> int:
        with autocast_context(CPU, precision):
            loss = method.training_step(batch, StepContext())["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return b

    return step, None


# -- measurement -------------------------------------------------------------------------------------
def interleave(
    runners: dict[str, Any], rounds: int, reps: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
    """Images/s per option and round from wall and from process-CPU time (median of `reps` calls per
    round); the warm-up calls run first. Each runner returns the number of images it processed."""
    names = list(runners)
    for name in names:
        started = time.perf_counter()
        for _ in range(warmup):
            runners[name]()
        print(f"  warm-up {name}: {time.perf_counter() - started:.1f} s", flush=True)
    out = {kind: {n: [] for n in names} for kind in ("wall", "cpu")}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = [], []
            for _ in range(reps):
                w, c = time.perf_counter(), time.process_time()
                images = runners[name]()
                wall.append(images / (time.perf_counter() - w))
                cpu.append(images / (time.process_time() - c))
            out["wall"][name].append(statistics.median(wall))
            out["cpu"][name].append(statistics.median(cpu))
        line = ", ".join(f"{n} {v[-1]:.0f}" for n, v in out["wall"].items())
        print(f"  round {r + 1}/{rounds} (wall img/s): {line}", flush=True)
    return out


def table(results: dict[str, dict[str, list[float]]]) -> tuple[str, dict[str, Any]]:
    summary: dict[str, Any] = {}
    rows = []
    for name in results["wall"]:
        summary[name] = {}
        for kind in ("wall", "cpu"):
            values, base = results[kind][name], results[kind]["fp32"]
            summary[name][kind] = {
                "median": statistics.median(values),
                "max": max(values),
                "speedup_median": statistics.median(v / b for v, b in zip(values, base)),
            }
        w, c = summary[name]["wall"], summary[name]["cpu"]
        rows.append([name, f"{w['median']:.1f}", f"{w['max']:.1f}", f"{w['speedup_median']:.2f}×",
                     f"{c['median']:.1f}", f"{c['speedup_median']:.2f}×"])  # fmt: skip
    header = ["option", "median img/s (wall)", "best img/s (wall)", "wall speed-up vs fp32",
              "img per CPU-s", "CPU speed-up vs fp32"]  # fmt: skip
    return md_table(header, rows), summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["digits", "gendd", "both"], default="both")
    parser.add_argument("--compile", action="store_true", help="also torch.compile options (GenDD: minutes)")
    parser.add_argument("--no-digits-compile", action="store_true", help="skip the digits compile option")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_plugins()
    out = results_dir(args.quick, args.results_dir)
    started, sections, data = time.perf_counter(), [], {"benchmark": "speed_options", "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.part in ("digits", "both"):
            splits = DATASETS.build({"name": "digits"})
            options = {
                k: v for k, v in DIGITS_OPTIONS.items() if not (v.get("compile") and args.no_digits_compile)
            }
            runners, caches = {}, {}
            for name, option in options.items():
                runners[name], caches[name] = digits_runner(option, splits, tmp / name.replace(" ", "_"))
            rounds = args.rounds or (2 if args.quick else 10)
            print("digits KD:", flush=True)
            results = interleave(runners, rounds, reps=1, warmup=2)
            text, summary = table(results)
            hits = {n: c.stats() for n, c in caches.items() if c is not None}
            sections.append(
                "## Digits KD (experiment=digits/kd models), images/s of a training epoch\n\n"
                f"Trainer + DataLoader (num_workers 0, batch 64, {len(splits.train)} training images, "
                f"{args.threads} threads), {rounds} interleaved rounds of {EPOCHS_PER_CALL} epochs per "
                "option after 2 warm-up calls. `replay + warm teacher cache`: the warm-up filled the "
                f"cache, every measured batch was read from it ({hits}).\n\n" + text
            )
            data["digits"] = {"summary": summary, "images_per_s": results, "cache": hits}
        if args.part in ("gendd", "both"):
            shape = (
                {"batch": 8, "mul": 4, "width": 256}
                if args.quick
                else {"batch": 64, "mul": 30, "width": 1024}
            )
            options = {**GENDD_OPTIONS, **(GENDD_COMPILE if args.compile else {})}
            runners = {name: gendd_runner(option, shape, tmp)[0] for name, option in options.items()}
            rounds = args.rounds or (2 if args.quick else 3)
            print("GenDD step:", flush=True)
            results = interleave(runners, rounds, reps=2, warmup=2 if args.compile else 1)
            text, summary = table(results)
            ratio = summary["bf16"]["wall"]["speedup_median"]
            ratio_cpu = summary["bf16"]["cpu"]["speedup_median"]
            sections.append(
                f"## GenDD training step, CIFAR shape (B={shape['batch']}, M={shape['mul']}, head "
                f"{shape['width']}×3, 4 tokens × 64), images/s\n\n"
                f"resnet32x4 → resnet8x4, forward + backward + AdamW, random inputs (no data loading), "
                f"{args.threads} threads; {rounds} interleaved rounds × median of 2 steps after warm-up "
                "(compile options: 2 warm-up steps, which include the compilation).\n\n"
                + text
                + f"\n\nbf16 / fp32 step speed (median of per-round ratios): **{ratio:.2f}×** wall-clock, "
                f"**{ratio_cpu:.2f}×** per CPU-second."
            )
            data["gendd"] = {"shape": shape, "summary": summary, "images_per_s": results}
    total = time.perf_counter() - started
    data.update(total_s=round(total, 1), machine=machine_info())
    text = "\n\n".join(sections) + f"\n\nTotal benchmark time: {total:.0f} s (load average at the end: "
    text += f"{data['machine']['loadavg_1_5_15min_at_end']})."
    write_outputs(out, f"speed_options{'_' + args.part if args.part != 'both' else ''}", text, data)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
