"""Framework overhead per KD step (data loading excluded) against a bare PyTorch loop doing the same maths.

Same models (CIFAR resnet32x4 teacher -> resnet8x4 student, untrained weights), same batch (64 random
32x32 images, labels), same loss (0.1·CE + 0.9·τ²·KL, τ=4), same optimizer (SGD lr 0.05, momentum 0.9,
weight decay 5e-4 on weights, none on biases/BN) and the same frozen-teacher-first order. Variants:

- `bare`: a hand-written loop (teacher under `torch.no_grad()`, student, loss, backward, step).
- `bare_inference`: the same with the teacher under `torch.inference_mode()`.
- `method`: our `kd` method's `training_step` in a hand loop (backward, step, zero_grad).
- `trainer`: our `Trainer.train_one_epoch` over pre-collated batches (finite check, running sums,
  schedule, logging of one record per epoch included).

Rounds are interleaved (every round runs every variant, in a rotating order) so machine load hits all
variants alike; per variant we report the median ms/step over rounds and each variant's per-round
ratio to `bare` (median over rounds). Each round of a variant is `--steps` steps.

    python benchmarks/overhead.py                   # CIFAR and digits shapes, 2 threads, ~5 min
    python benchmarks/overhead.py --shapes digits   # digits/kd models: small_cnn teacher -> MLP student
    python benchmarks/overhead.py --quick           # small batch, 2 rounds (smoke)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: see the table note

import argparse  # noqa: E402
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from _common import machine_info, md_table, results_dir, write_outputs
from gendd_framework.context import StepContext, to_device
from gendd_framework.engine.loggers import MetricLogger
from gendd_framework.engine.optim import sgd
from gendd_framework.engine.trainer import Trainer, TrainerConfig
from gendd_framework.models import build_model
from gendd_framework.plugins import load_plugins
from gendd_framework.registry import METHODS

ALPHA, BETA, TAU, LR, MOMENTUM, WD = 0.1, 0.9, 4.0, 0.05, 0.9, 5e-4
CPU = torch.device("cpu")  # benchmarks/gpu_check.py passes a CUDA device to the builders below
SHAPES = {
    "cifar": {
        "teacher": {"name": "resnet32x4"},
        "student": {"name": "resnet8x4"},
        "input": (3, 32, 32),
        "classes": 100,
    },
    "digits": {
        "teacher": {"name": "small_cnn", "channels": [32, 64, 128]},
        "student": {"name": "mlp", "in_features": 64, "hidden": [32]},  # digits/kd models
        "input": (1, 8, 8),
        "classes": 10,
    },
}


class NullLogger(MetricLogger):
    def log(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, hparams, final_metrics) -> None:
        pass


def models(shape: dict, seed: int = 0, device: torch.device = CPU) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    teacher = build_model(shape["teacher"], num_classes=shape["classes"]).eval().to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_model(shape["student"], num_classes=shape["classes"]).train().to(device)
    return teacher, student


def bare_groups(model: torch.nn.Module) -> list[dict]:
    """Decay on weight matrices / kernels, none on biases and norm weights (what our methods do)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]


def make_bare(shape: dict, batches: list[dict], grad_mode, device: torch.device = CPU) -> callable:
    teacher, student = models(shape, device=device)
    opt = torch.optim.SGD(bare_groups(student), lr=LR, momentum=MOMENTUM)

    def run(steps: int) -> None:
        for i in range(steps):
            x, y = batches[i % len(batches)]["input"], batches[i % len(batches)]["target"]
            with grad_mode():
                t = teacher(x)
            s = student(x)
            log_p_s = F.log_softmax(s / TAU, dim=1)
            log_p_t = F.log_softmax(t / TAU, dim=1)
            kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean() * TAU**2
            loss = ALPHA * F.cross_entropy(s, y) + BETA * kl
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def build_method(shape: dict, device: torch.device = CPU):
    teacher, student = models(shape, device=device)
    method = METHODS.build(
        {"name": "kd", "alpha": ALPHA, "beta": BETA, "temperature": TAU}, student=student, teacher=teacher
    )
    return method.train()


def make_method(shape: dict, batches: list[dict], device: torch.device = CPU) -> callable:
    method = build_method(shape, device)
    opt = sgd(method.param_groups(WD), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    ctx = StepContext()

    def run(steps: int) -> None:
        for i in range(steps):
            method.training_step(batches[i % len(batches)], ctx)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def make_trainer(shape: dict, batches: list[dict], tmp: str, device: torch.device = CPU) -> callable:
    method = build_method(shape, device)
    opt = sgd(method.param_groups(WD), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = TrainerConfig(epochs=1, progress=False)
    holder: dict[str, Trainer] = {}

    def run(steps: int) -> None:
        loader = [batches[i % len(batches)] for i in range(steps)]  # pre-collated: no data loading
        loop = holder.get("loop")
        if loop is None:
            loop = Trainer(
                method,
                opt,
                sched,
                loader,
                None,
                config=cfg,
                device=device,
                ckpt_dir=tmp,
                stage="bench",
                logger=NullLogger(),
            )
            holder["loop"] = loop
        loop.train_loader = loader
        loop.train_one_epoch(total_steps=10**6)

    return run


def make_batches(shape: dict, batch: int, count: int = 2, device: torch.device = CPU) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        x = torch.randn(batch, *shape["input"], generator=gen)
        y = torch.randint(0, shape["classes"], (batch,), generator=gen)
        out.append(to_device({"input": x, "target": y, "index": torch.arange(batch)}, device))
    return out


def measure(variants: dict[str, callable], rounds: int, steps: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU ms/step per variant per round, variants rotated each round; one warm-up."""
    names = list(variants)
    for name in names:
        variants[name](2)
    times = {kind: {n: [] for n in names} for kind in ("wall", "cpu")}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            variants[name](steps)
            times["cpu"][name].append(1000 * (time.process_time() - cpu) / steps)
            times["wall"][name].append(1000 * (time.perf_counter() - wall) / steps)
    return times


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    base = times["bare"]
    return {
        name: {
            "median_ms": statistics.median(values),
            "min_ms": min(values),
            "ratio_median": statistics.median(v / b for v, b in zip(values, base)),
            "ratio_of_mins": min(values) / min(base),
        }
        for name, values in times.items()
    }


def run_shape(key: str, args: argparse.Namespace, out) -> tuple[str, dict[str, Any]]:
    shape = SHAPES[key]
    quick, digits = args.quick, key == "digits"
    rounds = args.rounds or (2 if quick else (30 if digits else 16))
    steps = args.steps or (2 if quick else (50 if digits else 2))
    batch = 8 if quick and not digits else args.batch
    batches = make_batches(shape, batch)
    variants = {
        "bare": make_bare(shape, batches, torch.no_grad),
        "bare_inference": make_bare(shape, batches, torch.inference_mode),
        "method": make_method(shape, batches),
        "trainer": make_trainer(shape, batches, str(out / ".overhead_ckpt")),
    }
    started = time.perf_counter()
    times = measure(variants, rounds, steps)
    summary = {kind: summarise(values) for kind, values in times.items()}
    rows = []
    for name in variants:
        w, c = summary["wall"][name], summary["cpu"][name]
        rows.append(
            [
                name,
                f"{w['median_ms']:.1f}",
                f"{w['min_ms']:.1f}",
                f"{w['ratio_median']:.3f}×",
                f"{w['ratio_of_mins']:.3f}×",
                f"{c['median_ms']:.1f}",
                f"{c['ratio_median']:.3f}×",
            ]
        )
    pair = f"{shape['teacher']['name']} → {shape['student']['name']}"
    text = (
        f"## Framework overhead per KD step ({key}: {pair}, batch {batch}, {args.threads} threads)\n\n"
        f"{rounds} interleaved rounds × {steps} steps per variant (rotating order); data loading excluded "
        "(pre-collated batches). Ratios are variant / `bare` per round, median over rounds; "
        "`ratio of mins` compares the fastest round of each. CPU = process CPU time "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}: idle threads sleep instead of "
        "spinning, so CPU time counts work, not waiting for a core).\n\n"
        + md_table(
            [
                "variant",
                "median wall ms",
                "min wall ms",
                "wall ratio (median)",
                "wall ratio of mins",
                "median CPU ms",
                "CPU ratio (median)",
            ],
            rows,
        )  # fmt: skip
        + f"\n\nTime: {time.perf_counter() - started:.0f} s."
    )
    data = {
        "shape": key,
        "batch": batch,
        "rounds": rounds,
        "steps": steps,
        "summary": summary,
        "times_ms": times,
    }
    return text, data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_plugins()
    out = results_dir(args.quick, args.results_dir)
    texts, data = [], {"benchmark": "overhead", "threads": args.threads}
    for key in args.shapes:
        text, data[key] = run_shape(key, args, out)
        print(text, flush=True)
        texts.append(text)
    data["machine"] = machine_info()
    load = data["machine"]["loadavg_1_5_15min_at_end"]
    write_outputs(out, "overhead", "\n\n".join(texts) + f"\n\nLoad average at the end: {load}.", data)


if __name__ == "__main__":
    main()
