"""One-shot GPU check: does this code train on CUDA, and how fast? (run it through gpu_check.sh)

Sections, in this order (later ones are skipped once `--budget-s` has elapsed; the outputs are rewritten
after every section, so a run stopped from outside still leaves the finished ones):

1. `cli_runs`: `gendd-train experiment=digits/kd trainer.epochs=1` and `experiment=digits/gendd`
   (real CLI, fresh teacher cache in the work folder): exit status, wall time, device, test accuracy.
2. `loader`: images/s of the CIFAR-100 training loader of the resnet32x4 -> resnet8x4 recipes (its
   `num_workers`, pinning, crop/flip/normalise, copy to the device) on a synthetic CIFAR-100 folder in
   torchvision's format (random uint8 images; nothing is downloaded).
3. `overhead`: benchmarks/overhead.py's bare PyTorch KD loop vs our `kd` method step vs our `Trainer`
   loop (resnet32x4 -> resnet8x4, batch 64) on the device, each round closed by a synchronisation.
4. `steps`: images/s and peak device memory of the KD step (recipe cifar100/resnet32x4_resnet8x4) and
   the GenDD step (cifar100/gendd_resnet32x4_resnet8x4: batch 64, M and head from the recipe) in fp32
   and bf16; 5. `steps_compile`: the same in bf16 + `trainer.speed.compile` (student, teacher, head).

Without CUDA it stops before any work with one line on stderr and exit status 2. For testing the code
path on a CPU, `GENDD_GPU_CHECK_DEVICE=cpu` with `--quick` (tiny shapes, torch.compile's `eager`
backend) writes to a scratch folder, never to benchmarks/results/gpu/. Exit status 1: a section failed.

    bash benchmarks/gpu_check.sh                         # on a GPU machine (estimated 4-6 min)
    GENDD_GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh --quick --results-dir /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import RESULTS, SCRATCH, machine_info, md_table, results_dir, write_outputs

REFUSAL = "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine"
DEVICE_ENV = "GENDD_GPU_CHECK_DEVICE"
GPU_RESULTS = RESULTS / "gpu"
RECIPES = {"kd": "cifar100/resnet32x4_resnet8x4", "gendd": "cifar100/gendd_resnet32x4_resnet8x4"}
SECTIONS = ["cli_runs", "loader", "overhead", "steps", "steps_compile"]
VARIANTS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+compile": ("bf16", True)}
FULL = {"train": 50000, "test": 10000, "warmup": 3, "rounds": 5, "steps": 20, "loader_batches": 300,
        "overhead_rounds": 10, "overhead_steps": 20, "overhead_batch": 64, "cli_timeout": 300}  # fmt: skip
QUICK = {"train": 1000, "test": 100, "warmup": 1, "rounds": 1, "steps": 2, "loader_batches": 3,
         "overhead_rounds": 2, "overhead_steps": 1, "overhead_batch": 4, "cli_timeout": 300}  # fmt: skip
# --quick: tiny shapes (GenDD's M and head shrunk, one loader worker); the digits runs train less
QUICK_RECIPE = {"kd": ["data.loader.batch_size=4", "data.loader.num_workers=1"],
                "gendd": ["data.loader.batch_size=4", "data.loader.num_workers=1",
                          "method.diffusion_batch_mul=2", "method.head.width=64"]}  # fmt: skip
QUICK_CLI = {
    "digits/kd": ["teacher.train.epochs=1", "data.train_fraction=0.25"],
    "digits/gendd": ["teacher.train.epochs=1", "data.train_fraction=0.25", "method.sampler.steps=2"],
}


def device_or_refuse() -> str:
    """'cuda', or 'cpu' when GENDD_GPU_CHECK_DEVICE=cpu; without CUDA: one line on stderr, exit 2."""
    forced = os.environ.get(DEVICE_ENV, "")
    if forced not in ("", "cpu", "cuda"):
        print(f"gpu_check: {DEVICE_ENV}={forced!r}: expected cpu or cuda", file=sys.stderr)
        raise SystemExit(2)
    try:
        import torch
    except ImportError:
        print(f"gpu_check: {sys.executable} cannot import torch; run `make install` first", file=sys.stderr)
        raise SystemExit(2) from None
    if forced == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        print(REFUSAL, file=sys.stderr)
        raise SystemExit(2)
    return "cuda"


class Check:
    """The measurements, sharing the synthetic data and the recipes' contexts."""

    def __init__(self, args: argparse.Namespace, device_name: str, work: Path) -> None:
        import torch

        import gpu_check_parts as parts
        from gendd_framework.plugins import load_plugins

        load_plugins()
        self.parts, self.args, self.work = parts, args, work
        self.device = torch.device(device_name)
        self.sizes = QUICK if args.quick else FULL
        self.backend = args.compile_backend or ("eager" if self.device.type == "cpu" else "inductor")
        self._contexts: dict[str, Any] = {}

    def context(self, key: str):
        """The RunContext of recipe `key` on the synthetic CIFAR-100 folder (built once)."""
        if key not in self._contexts:
            root = self.work / "data"
            if not (root / self.parts.CIFAR100_FOLDER).is_dir():
                self.parts.write_synthetic_cifar100(root, self.sizes["train"], self.sizes["test"])
            overrides = [f"data.root={root}", *(QUICK_RECIPE[key] if self.args.quick else [])]
            cfg = self.parts.compose_recipe(RECIPES[key], overrides)
            self._contexts[key] = self.parts.recipe_context(cfg, self.work / key, self.device)
        return self._contexts[key]

    def cli_runs(self) -> list[dict[str, Any]]:
        env = dict(os.environ, GENDD_CACHE_DIR=str(self.work / "cache"), HF_HUB_OFFLINE="1")
        env.setdefault("WANDB_MODE", "disabled")
        if self.device.type == "cpu":
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the CPU smoke run shares its machine
        runs = []
        for experiment in ("digits/kd", "digits/gendd"):  # kd trains the teacher, gendd reuses it
            overrides = ["trainer.epochs=1", "trainer.progress=false", f"trainer.device={self.device.type}"]
            overrides += QUICK_CLI[experiment] if self.args.quick else []
            run_dir = self.work / "runs" / experiment.replace("/", "_")
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            runs.append(self.parts.cli_run(experiment, overrides, run_dir, env, self.sizes["cli_timeout"]))
        return runs

    def loader(self) -> dict[str, Any]:
        return {
            "recipe": RECIPES["gendd"],
            **self.parts.loader_throughput(self.context("gendd"), self.sizes["loader_batches"]),
        }

    def overhead(self) -> dict[str, Any]:
        import torch

        import overhead

        sync = self.parts.synchronize
        shape, batch, device = overhead.SHAPES["cifar"], self.sizes["overhead_batch"], self.device
        batches = overhead.make_batches(shape, batch, device=device)
        ckpt = str(self.work / "overhead_ckpt")
        built = {
            "bare": overhead.make_bare(shape, batches, torch.no_grad, device),
            "bare_inference": overhead.make_bare(shape, batches, torch.inference_mode, device),
            "method": overhead.make_method(shape, batches, device),
            "trainer": overhead.make_trainer(shape, batches, ckpt, device),
        }
        variants = {name: (lambda steps, fn=fn: (fn(steps), sync(device))) for name, fn in built.items()}
        times = overhead.measure(variants, self.sizes["overhead_rounds"], self.sizes["overhead_steps"])
        return {"shape": "cifar", "batch": batch, "rounds": self.sizes["overhead_rounds"],
                "steps": self.sizes["overhead_steps"], "summary": overhead.summarise(times["wall"]),
                "times_ms": times["wall"]}  # fmt: skip

    def steps(self, compiled: bool) -> dict[str, Any]:
        out = {}
        for key in RECIPES:
            ctx = self.context(key)
            batch = self.parts.first_batch(ctx)
            for variant, (precision, use_compile) in VARIANTS.items():
                if use_compile != compiled:
                    continue
                speed = {}
                if use_compile:
                    speed = {
                        "compile": {"student": True, "teacher": True, "head": True, "backend": self.backend}
                    }
                step, applied = self.parts.training_step(ctx, batch, precision, speed)
                images = len(batch["target"])
                record = self.parts.measure_step(step, self.device, images, self.sizes["warmup"],
                                                 self.sizes["rounds"], self.sizes["steps"])  # fmt: skip
                out[f"{key}/{variant}"] = {
                    "recipe": RECIPES[key],
                    "precision": precision,
                    "applied": applied,
                    **record,
                }
                del step
                self.parts.release(self.device, compiled=use_compile)
        return out


def environment(device_name: str, backend: str) -> dict[str, Any]:
    """What the timings depend on: GPU, CUDA/cuDNN versions, TF32 and cuDNN autotuning flags."""
    import torch
    import torchvision

    info: dict[str, Any] = {
        "device": device_name,
        "torchvision": torchvision.__version__,
        "compile_backend": backend,
        "python_executable": sys.executable,
    }
    if device_name == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return info


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def cli_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for r in runs:
        accuracy = ", ".join(f"{k} {v:.2f}" for k, v in (r.get("test_accuracy") or {}).items())
        rows.append([r["experiment"], r["exit_status"], fmt(r["wall_s"]), r.get("device", "–"), accuracy])
    return md_table(["experiment", "exit", "wall s", "device", "test accuracy (%)"], rows)


def steps_table(steps: dict[str, dict[str, Any]]) -> str:
    header = ["method/variant", "median img/s", "best img/s", "ms/step", "warm-up s", "peak alloc MiB",
              "peak reserved MiB", "finite loss"]  # fmt: skip
    rows = [
        [key, fmt(r["median_images_per_s"]), fmt(r["best_images_per_s"]), fmt(r["ms_per_step"], 2),
         fmt(r["warmup_s"]), fmt(r["peak_allocated_mib"], 0), fmt(r["peak_reserved_mib"], 0), r["finite"]]
        for key, r in steps.items()
    ]  # fmt: skip
    text = md_table(header, rows)
    for key in RECIPES:
        base = steps.get(f"{key}/fp32", {}).get("median_images_per_s")
        ratios = [
            f"{v} / fp32 = {steps[f'{key}/{v}']['median_images_per_s'] / base:.2f}×"
            for v in ("bf16", "bf16+compile")
            if base and f"{key}/{v}" in steps
        ]
        if ratios:
            text += f"\n\n{key}: " + ", ".join(ratios) + " (median images/s)."
    return text


def loader_table(r: dict[str, Any]) -> str:
    header = ["workers", "pin memory", "batch", "batches", "images/s", "first batch s"]
    row = [r["num_workers"], r["pin_memory"], r["batch_size"], r["batches"], fmt(r["images_per_s"], 0),
           fmt(r["first_batch_s"], 2)]  # fmt: skip
    return md_table(header, [row])


def overhead_table(r: dict[str, Any]) -> str:
    rows = [[k, fmt(v["median_ms"], 2), f"{v['ratio_median']:.3f}×"] for k, v in r["summary"].items()]
    return md_table(["variant", "median ms/step", "ratio to bare (median over rounds)"], rows)


def report(data: dict[str, Any]) -> str:
    """The markdown summary of `data` (the JSON written beside it)."""
    env, machine = data["environment"], data["machine"]
    sizes = "--quick (tiny shapes)" if data["quick"] else "full sizes"
    status = [
        [k, v["status"], fmt(v.get("seconds")), v.get("error", "")] for k, v in data["sections"].items()
    ]
    parts = [
        f"# GPU check: {env.get('gpu', 'CPU (smoke mode)')}",
        f"torch {machine['torch']} (CUDA {env.get('cuda', '–')}, cuDNN {env.get('cudnn', '–')}), torchvision "
        f"{env['torchvision']}, {machine['cpu_count']} CPU cores; {sizes}; compile backend "
        f"{env['compile_backend']}; total {data['total_s']:.0f} s (sections start within "
        f"{data['budget_s']:.0f} s).",
        md_table(["section", "status", "seconds", "note"], status),
    ]
    if data.get("cli_runs"):
        parts += [
            "## Digits presets through `gendd-train` (1 epoch, fresh teacher cache)",
            cli_table(data["cli_runs"]),
        ]
    if data.get("steps"):
        title = "## Training step, resnet32x4 → resnet8x4 (recipe shapes, one batch reused, no data loading)"
        parts += [title, steps_table(data["steps"])]
    if data.get("loader"):
        title = (
            "## CIFAR-100 training loader of the recipe (synthetic files, real transforms, copy to device)"
        )
        parts += [title, loader_table(data["loader"])]
    if data.get("overhead"):
        title = f"## Framework overhead per KD step on the device (batch {data['overhead']['batch']})"
        parts += [title, overhead_table(data["overhead"])]
    return "\n\n".join(parts)


def output_dir(args: argparse.Namespace, device_name: str) -> Path:
    """benchmarks/results/gpu/ for a full CUDA run only; a quick or CPU run writes to a scratch folder."""
    official = device_name == "cuda" and not args.quick
    path = Path(args.results_dir).resolve() if args.results_dir else None
    if not official and path is not None and path == GPU_RESULTS.resolve():
        kind = "--quick" if args.quick else "CPU"
        print(f"gpu_check: a {kind} run never writes to {GPU_RESULTS}", file=sys.stderr)
        raise SystemExit(2)
    if path is None:
        path = GPU_RESULTS if official else SCRATCH / "quick_results" / "gpu"
    return results_dir(args.quick, str(path))


def verdict(name: str, result: Any, device_name: str) -> dict[str, str]:
    """A section that returned can still have failed: a CLI run that exited non-zero or trained on
    another device, a training step whose loss is not finite."""
    if name == "cli_runs":
        on = lambda r: str(r.get("device", "")).split(":")[0]  # noqa: E731  ("cuda:0" trained on cuda)
        bad = [r["experiment"] for r in result if r["exit_status"] != 0 or on(r) != device_name]
        if bad:
            return {"status": "error", "error": f"not trained on {device_name} with exit 0: {', '.join(bad)}"}
    if name.startswith("steps"):
        bad = [key for key, r in result.items() if not r["finite"]]
        if bad:
            return {"status": "error", "error": f"non-finite loss: {', '.join(bad)}"}
    return {"status": "ok"}


def run_sections(sections: dict[str, Callable[[], Any]], data: dict[str, Any], args, out: Path) -> None:
    """Run each section in order (a failure is recorded, the next still runs) until the budget is spent;
    the JSON is rewritten after each one."""
    started = time.perf_counter()
    for name, run in sections.items():
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            data["sections"][name] = {
                "status": "skipped",
                "error": f"budget: {elapsed:.0f} s > {args.budget_s:.0f} s",
            }
            continue
        print(f"gpu_check: {name} ...", flush=True)
        begun = time.perf_counter()
        try:
            result = run()
            status = verdict(name, result, data["environment"]["device"])
        except Exception as exc:  # noqa: BLE001  (a failing section is a result; the others still run)
            traceback.print_exc()
            result = None
            status = {"status": "error", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        if name.startswith("steps"):
            data["steps"].update(result or {})
        elif result is not None:
            data[name] = result
        data["sections"][name] = {**status, "seconds": round(time.perf_counter() - begun, 1)}
        data.update(total_s=round(time.perf_counter() - started, 1), machine=machine_info())
        (out / "gpu_check.json").write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1-2 steps (smoke)")
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--work-dir", default=None, help="run folders and synthetic data (wiped first)")
    parser.add_argument("--budget-s", type=float, default=420, help="start no section after this many s")
    parser.add_argument("--compile-backend", default=None, help="default: inductor (CUDA), eager (CPU)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    parser.add_argument("--preflight", action="store_true", help="only the CUDA check (gpu_check.sh)")
    args = parser.parse_args()
    device_name = device_or_refuse()  # before any work
    if args.preflight:
        return
    out = output_dir(args, device_name)
    work = Path(args.work_dir or SCRATCH / ("gpu_check_quick" if args.quick else "gpu_check"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    check = Check(args, device_name, work)
    every = {
        "cli_runs": check.cli_runs,
        "loader": check.loader,
        "overhead": check.overhead,
        "steps": lambda: check.steps(compiled=False),
        "steps_compile": lambda: check.steps(compiled=True),
    }
    data: dict[str, Any] = {"benchmark": "gpu_check", "quick": args.quick, "budget_s": args.budget_s}
    data.update(environment=environment(device_name, check.backend), sections={}, steps={})
    run_sections({k: v for k, v in every.items() if k in args.sections}, data, args, out)
    write_outputs(out, "gpu_check", report(data), data)
    failed = [k for k, v in data["sections"].items() if v["status"] != "ok"]
    if failed:
        print(f"gpu_check: sections not ok: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
