"""Few-step samplers across seeds: is DDIM at <= 10 steps as accurate as DDPM-100 on every checkpoint?

`sampling_cost.py` maps the whole grid on one checkpoint; a single 449-image test split moves in steps
of 0.22 points, so this script re-evaluates every supervised GenDD checkpoint it finds (one per seed)
at the few settings that matter, and separates the two reasons a deterministic sampler can fall short:
discretisation (DDIM eta 0 at 10 vs 100 vs 1000 steps: the probability-flow ODE limit) and the ODE
itself under an imperfect eps-model (DDIM-1000 eta 0 vs DDPM-1000, both converged chains).
Writes results/fast_samplers.{md,json}. Guidance 2, one sample per image, eval seed 0, test split.

    python benchmarks/fast_samplers.py                       # the digits_methods.py seeds
    python benchmarks/fast_samplers.py --runs outputs/demo    # the `make demo` seeds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from _common import SCRATCH, fmt_ms, machine_info, md_table, mean_std, results_dir, write_outputs
from gendd_framework.analysis.report import collect
from gendd_framework.cli.evaluate import RunEvaluator

REFERENCE = "DDPM 100"
TOLERANCE = 0.5  # accuracy points
# label -> sampler spec; guidance 2 and num_sampling 1 throughout (the training-time eval setting)
SETTINGS: dict[str, dict[str, Any]] = {
    "DDPM 100": {"name": "ddpm", "steps": 100},
    "DDPM 10": {"name": "ddpm", "steps": 10},
    "DDIM 10 eta=0": {"name": "ddim", "steps": 10, "eta": 0.0},
    "DDIM 10 eta=0.5": {"name": "ddim", "steps": 10, "eta": 0.5},
    "DDIM 10 eta=1": {"name": "ddim", "steps": 10, "eta": 1.0},
    "DDIM 100 eta=0": {"name": "ddim", "steps": 100, "eta": 0.0},
    "DDIM 1000 eta=0": {"name": "ddim", "steps": 1000, "eta": 0.0},
    "DDPM 1000": {"name": "ddpm", "steps": 1000},
}


def gendd_runs(root: Path, name: str) -> list[dict[str, Any]]:
    rows = sorted((r for r in collect(root) if r["name"] == name), key=lambda r: r["seed"])
    if not rows:
        raise SystemExit(f"no '{name}' runs under {root}; run digits_methods.py or `make demo` first")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default=str(SCRATCH / "digits_methods"), help="folder searched for runs")
    parser.add_argument("--name", default="digits_gendd", help="experiment name of the runs to evaluate")
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = results_dir(False, args.results_dir)

    start = time.perf_counter()
    per_seed: list[dict[str, Any]] = []
    for row in gendd_runs(Path(args.runs), args.name):
        evaluator = RunEvaluator(Path(row["run_dir"]), device="cpu")
        accs: dict[str, float] = {}
        for label, sampler in SETTINGS.items():
            res = evaluator.evaluate({"sampler": sampler, "guidance_scale": 2.0, "num_sampling": 1}, "test")
            accs[label] = res["acc/generative"]
            print(f"seed {row['seed']} {label}: {accs[label]:.2f}%", flush=True)
        student = res["acc/student"]
        per_seed.append({"seed": row["seed"], "run_dir": row["run_dir"], "student": student, **accs})
    total = time.perf_counter() - start

    seeds = [r["seed"] for r in per_seed]
    table = []
    for label in SETTINGS:
        values = [r[label] for r in per_seed]
        deltas = [r[label] - r[REFERENCE] for r in per_seed]
        within = sum(abs(d) <= TOLERANCE for d in deltas)
        table.append([label, fmt_ms(values), ", ".join(f"{v:.2f}" for v in values),
                      f"{mean_std(deltas)[0]:+.2f}", f"{within}/{len(deltas)}"])  # fmt: skip
    student_accs = ", ".join(f"{r['student']:.2f}" for r in per_seed)
    markdown = (
        "## Few-step samplers across seeds (supervised GenDD on digits)\n\n"
        f"Runs `{args.name}` under `{args.runs}` (seeds {seeds}), best-on-val weights, test split, "
        "guidance 2, one sample per image, eval seed 0. Δ = accuracy − DDPM-100 on the same checkpoint; "
        f"'within' counts checkpoints with |Δ| ≤ {TOLERANCE}.\n\n"
        + md_table(["sampler", "acc (%) mean ± std", "per seed", "mean Δ", "within ±0.5"], table)
        + f"\n\nStudent-logit accuracy per seed: {student_accs}. Total time {total:.0f} s."
    )
    data = {"benchmark": "fast_samplers", "settings": SETTINGS, "per_seed": per_seed,
            "total_s": round(total, 1), "machine": machine_info()}  # fmt: skip
    write_outputs(out, "fast_samplers", markdown, data)


if __name__ == "__main__":
    main()
