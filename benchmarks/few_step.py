"""Accuracy vs function evaluations for GenDD's generative prediction: diffusion (DDPM-100, DDIM 10/4/2)
against flow matching (Euler 8/4/2/1, Heun 4/2) and reflow (1 step), on digits and on the transfer-set
preset, 3 seeds each, with the time per image relative to the student's own forward pass.

Each (data, objective, seed) is one `gendd-train` run in a scratch folder (two at a time, one thread
each; runs whose summary exists are reused). Every sampler is then evaluated on the run's best-on-val
checkpoint with `RunEvaluator` (same test split, same evaluation seed). Results:
results/few_step.{md,json,png}.

    python benchmarks/few_step.py            # 12 training runs + evaluations, ~25 min on 2 CPU cores
    python benchmarks/few_step.py --quick    # 1 seed, 2 epochs: a smoke test
"""

from __future__ import annotations

import argparse
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from _common import (
    BIN,
    SCRATCH,
    fmt_ms,
    machine_info,
    md_table,
    mean_std,
    results_dir,
    train_env,
    write_outputs,
)

DATA = {"digits": [], "transfer": ["data.label_fraction=0.05"]}
FLOW = ["method/objective=flow", "method/sampler=euler", "method.sampler.steps=4"]
REFLOW_EPOCHS = 20


def runs(reflow_epochs: int) -> dict[str, list[str]]:
    """Overrides of the two trained variants (the flow run ends with its reflow stage)."""
    reflow = f"stages=[teacher,distill,{{name:reflow,epochs:{reflow_epochs}}}]"
    return {"diffusion": ["experiment=digits/gendd"], "flow": ["experiment=digits/gendd", *FLOW, reflow]}


# (label, run kind, stage, sampler node)
SETTINGS = [
    ("DDPM-100", "diffusion", "distill", {"name": "ddpm", "steps": 100, "temperature": 1.0}),
    ("DDIM-10", "diffusion", "distill", {"name": "ddim", "steps": 10, "eta": 0.0}),
    ("DDIM-4", "diffusion", "distill", {"name": "ddim", "steps": 4, "eta": 0.0}),
    ("DDIM-2", "diffusion", "distill", {"name": "ddim", "steps": 2, "eta": 0.0}),
    ("flow Euler-8", "flow", "distill", {"name": "euler", "steps": 8}),
    ("flow Euler-4", "flow", "distill", {"name": "euler", "steps": 4}),
    ("flow Euler-2", "flow", "distill", {"name": "euler", "steps": 2}),
    ("flow Euler-1", "flow", "distill", {"name": "euler", "steps": 1}),
    ("flow Heun-4", "flow", "distill", {"name": "heun", "steps": 4}),
    ("flow Heun-2", "flow", "distill", {"name": "heun", "steps": 2}),
    ("reflow Euler-1", "flow", "reflow", {"name": "euler", "steps": 1}),
    ("reflow Euler-2", "flow", "reflow", {"name": "euler", "steps": 2}),
]


def train(run_dir: Path, overrides: list[str], seed: int, extra: list[str]) -> None:
    if (run_dir / "summary.json").exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "gendd-train"), *overrides, f"seed={seed}", "trainer.progress=false", *extra]
    cmd.append(f"hydra.run.dir={run_dir}")
    start = time.perf_counter()
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        proc = subprocess.run(cmd, env=train_env(), stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise SystemExit(f"gendd-train failed (rc={proc.returncode}): {' '.join(cmd)}")
    print(f"[{run_dir.relative_to(run_dir.parents[2])}] {time.perf_counter() - start:.0f} s", flush=True)


def student_seconds_per_image(evaluator: Any) -> float:
    """The student's own forward pass over the test split (the cost GenDD's prediction is compared to)."""
    method = evaluator.build_method()
    method.eval()
    x = torch.stack([evaluator.data.test[i][0] for i in range(len(evaluator.data.test))])
    with torch.no_grad():
        method.student(x)  # warm-up
        start = time.perf_counter()
        for _ in range(5):
            method.student(x)
    return (time.perf_counter() - start) / 5 / len(x)


def evaluate(runs_root: Path, data: str, seed: int) -> dict[str, dict[str, float]]:
    from gendd_framework.cli.evaluate import RunEvaluator

    torch.set_num_threads(1)
    results: dict[str, dict[str, float]] = {}
    evaluators: dict[tuple[str, str], Any] = {}
    for label, kind, stage, sampler in SETTINGS:
        key = (kind, stage)
        if key not in evaluators:
            evaluators[key] = RunEvaluator(runs_root / data / kind / f"seed{seed}", stage=stage, device="cpu")
        evaluator = evaluators[key]
        evaluator.evaluate({"sampler": sampler}, "test")  # warm-up (allocations, caches)
        out = evaluator.evaluate({"sampler": sampler}, "test")
        results[label] = {
            "acc": out["acc/generative"],
            "agree": out["agree/generative"],
            "s_per_image": out["seconds"] / out["images"],
            "nfe": out["eval_settings"].get("nfe"),
        }
    student = student_seconds_per_image(evaluators[("diffusion", "distill")])
    for rec in results.values():
        rec["x_student"] = rec["s_per_image"] / student
    return results


def render(table: dict[str, dict[str, dict[str, list[float]]]], seeds: list[int]) -> str:
    lines = []
    for data, settings in table.items():
        header = [
            "setting",
            "NFE",
            "acc (%)",
            "Δ vs DDPM-100",
            "agreement (%)",
            "ms / image",
            "× student",
        ]
        ddpm = mean_std(settings["DDPM-100"]["acc"])[0]
        rows = []
        for label, rec in settings.items():
            m = mean_std(rec["acc"])[0]
            nfe = rec["nfe"][0] if rec["nfe"] and rec["nfe"][0] is not None else "–"
            ms_per_image = fmt_ms([v * 1e3 for v in rec["s_per_image"]], 3)
            cells = [fmt_ms(rec["acc"]), f"{m - ddpm:+.2f}", fmt_ms(rec["agree"]), ms_per_image]
            rows.append([label, nfe, *cells, fmt_ms(rec["x_student"], 1)])
        lines += [f"### {data}", "", md_table(header, rows), ""]
    notes = [
        f"Test accuracy of GenDD's generative prediction (teacher head on sampled features), seeds {seeds},",
        "best-on-val checkpoint, guidance 2, one sample per image. Diffusion rows evaluate the diffusion",
        "run, flow rows the flow-matching run (logit-normal t, MSE on the velocity), reflow rows the same",
        "flow run after its reflow stage (pairs from Heun-8, 20 epochs, head only). `× student` = time per",
        "image of the whole generative prediction (student forward + sampling) over the student forward",
        "alone, one CPU thread. NFE = head calls per sample (conditional and unconditional branches share",
        "one call).",
    ]
    return "## Few-step generative prediction\n\n" + "\n".join(lines) + "\n".join(notes)


def cifar_shape_cost(batch: int = 64, repeats: int = 3) -> dict[str, float]:
    """Time per image at the CIFAR shape (resnet32x4 -> resnet8x4, width-1024 head, 4 tokens, random
    weights, one thread): the student forward alone vs the whole generative prediction per sampler."""
    import gendd_framework.components  # noqa: F401
    from gendd_framework.models import build_model
    from gendd_framework.registry import METHODS

    torch.manual_seed(0)
    teacher = build_model({"name": "resnet32x4"}, num_classes=100)
    student = build_model({"name": "resnet8x4"}, num_classes=100)
    x = torch.randn(batch, 3, 32, 32)
    out: dict[str, float] = {}
    for label, objective, sampler in (
        ("student forward", "flow_matching", {"name": "euler", "steps": 1}),
        ("DDPM-100", "gaussian_diffusion", {"name": "ddpm", "steps": 100}),
        ("DDIM-10", "gaussian_diffusion", {"name": "ddim", "steps": 10}),
        ("flow Euler-4", "flow_matching", {"name": "euler", "steps": 4}),
        ("flow Euler-2", "flow_matching", {"name": "euler", "steps": 2}),
        ("flow Euler-1", "flow_matching", {"name": "euler", "steps": 1}),
    ):
        method = METHODS.build(
            {"name": "gendd", "objective": {"name": objective}, "sampler": sampler},
            student=student, teacher=teacher, num_classes=100,
        ).eval()  # fmt: skip
        call = method.student if label == "student forward" else method.predict
        with torch.no_grad():
            call(x)
            start = time.perf_counter()
            for _ in range(repeats):
                call(x)
        out[label] = (time.perf_counter() - start) / repeats / batch
    return out


def render_cost(cost: dict[str, float]) -> str:
    base = cost["student forward"]
    rows = [[label, f"{sec * 1e3:.3f}", f"{sec / base:.2f}"] for label, sec in cost.items()]
    return (
        "### Cost at the CIFAR shape\n\n"
        "resnet32x4 -> resnet8x4, width-1024 depth-3 head, 4 tokens of 64, batch 64, one CPU thread,\n"
        "random weights (cost only). The digits MLP student costs almost nothing, so the ratios above\n"
        "say little about cost.\n\n" + md_table(["setting", "ms / image", "× student forward"], rows)
    )


def plot(table: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4.2), squeeze=False)
    families = {"DDPM": "k", "DDIM": "tab:blue", "flow Euler": "tab:orange", "flow Heun": "tab:green",
                "reflow Euler": "tab:red"}  # fmt: skip
    for ax, (data, settings) in zip(axes[0], table.items()):
        for family, colour in families.items():
            pts = [
                (rec["nfe"][0], *mean_std(rec["acc"]))
                for label, rec in settings.items()
                if label.rsplit("-", 1)[0] == family and rec["nfe"] and rec["nfe"][0]
            ]
            if pts:
                pts.sort()
                xs, ms, ss = zip(*pts)
                ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, color=colour, label=family)
        ax.set_xscale("log")
        ax.set_xlabel("head evaluations per sample (NFE)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(data)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs (1 reflow epoch)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    runs_root = SCRATCH / ("few_step_quick" if args.quick else "few_step")
    extra = ["trainer.epochs=2"] if args.quick else []
    variants = runs(1 if args.quick else REFLOW_EPOCHS)
    data_seeds = {"digits": seeds, "transfer": seeds}
    jobs = [
        (runs_root / d / k / f"seed{s}", [*variants[k], *DATA[d]], s)
        for d in DATA
        for s in data_seeds[d]
        for k in variants
    ]
    start = time.perf_counter()
    train(*jobs[0], extra)  # trains and caches the teacher before the parallel runs
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda job: train(*job, extra), jobs))
    table: dict[str, dict[str, dict[str, list]]] = {}
    for data in DATA:
        for seed in data_seeds[data]:
            for label, rec in evaluate(runs_root, data, seed).items():
                slot = table.setdefault(data, {}).setdefault(label, {})
                for key, value in rec.items():
                    slot.setdefault(key, []).append(value)
    out = results_dir(args.quick, args.results_dir)
    record = {"benchmark": "few_step", "seeds": seeds, "table": table, "machine": machine_info()}
    record["wall_s"] = round(time.perf_counter() - start, 1)
    record["cifar_shape_cost"] = cifar_shape_cost()
    markdown = render(table, seeds) + "\n\n" + render_cost(record["cifar_shape_cost"])
    write_outputs(out, "few_step", markdown, record)
    plot(table, out / "few_step.png")


if __name__ == "__main__":
    main()
