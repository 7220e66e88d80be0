"""Accuracy vs sampling cost of GenDD's generative prediction on one trained digits checkpoint.

Re-evaluates the seed-0 supervised GenDD run of `digits_methods.py` (no retraining) on the test split
for DDPM and DDIM (eta 0, plus eta 0.5) x steps x guidance scale x num_sampling, with the measured
seconds per image (`RunEvaluator.evaluate` wall time / test images; includes the student forward).
Writes results/sampling_cost.{md,json,png}.

    python benchmarks/sampling_cost.py            # 84 settings x 3 repeats, ~6 min on 2 CPU cores
    python benchmarks/sampling_cost.py --quick    # 18 settings on the --quick digits run
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import torch

from _common import SCRATCH, machine_info, md_table, results_dir, write_outputs
from gendd_framework.analysis.report import collect
from gendd_framework.cli.evaluate import RunEvaluator

REFERENCE = ("ddpm", 100, 2.0, 1)  # sampler, steps, guidance, num_sampling: the training-time eval setting
TOLERANCE = 0.5  # accuracy points
COLOURS = {
    ("ddpm", 1.0): "tab:blue",
    ("ddpm", 2.0): "tab:red",
    ("ddim", 1.0): "tab:cyan",
    ("ddim", 2.0): "tab:orange",
    ("ddim_eta0.5", 1.0): "tab:green",
    ("ddim_eta0.5", 2.0): "tab:purple",
}  # one colour per (sampler, guidance); NS=5 dashed


def find_run(runs_root: Path, seed: int = 0) -> Path:
    """The run directory of supervised GenDD with `seed` produced by digits_methods.py."""
    rows = [r for r in collect(runs_root / "digits_gendd") if r["seed"] == seed]
    if not rows:
        raise SystemExit(f"no digits_gendd seed-{seed} run under {runs_root}; run digits_methods.py first")
    return Path(rows[-1]["run_dir"])


def key_of(row: dict[str, Any]) -> tuple:
    return row["sampler"], row["steps"], row["guidance"], row["num_sampling"]


def group_of(row: dict[str, Any]) -> tuple:
    return row["sampler"], row["guidance"], row["num_sampling"]


SAMPLERS = ("ddpm", "ddim", "ddim_eta0.5")  # DDIM with eta 0 (deterministic) and eta 0.5


def sampler_spec(name: str, steps: int) -> dict[str, Any]:
    if name.startswith("ddim"):
        eta = float(name.split("_eta")[1]) if "_eta" in name else 0.0
        return {"name": "ddim", "steps": steps, "eta": eta}
    return {"name": "ddpm", "steps": steps}


def evaluate(evaluator: RunEvaluator, setting: tuple) -> dict[str, Any]:
    name, steps, guidance, ns = setting
    overrides = {"sampler": sampler_spec(name, steps), "guidance_scale": guidance, "num_sampling": ns}
    return evaluator.evaluate(overrides, split="test")


def summarise(setting: tuple, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (deterministic: fixed eval seed) and the fastest of the timed evaluations."""
    name, steps, guidance, ns = setting
    accs = {round(r["acc/generative"], 6) for r in results}
    assert len(accs) == 1, f"non-deterministic accuracy for {setting}: {accs}"
    images = results[0]["images"]
    return {
        "sampler": name,
        "steps": steps,
        "guidance": guidance,
        "num_sampling": ns,
        "acc_generative": results[0]["acc/generative"],
        "acc_student": results[0]["acc/student"],
        "seconds": [r["seconds"] for r in results],
        "ms_per_image": 1000 * min(r["seconds"] for r in results) / images,
        "images": images,
        "eval_settings": results[0]["eval_settings"],
    }


def verdict(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Per DDIM variant: is it, with <= 10 steps, within TOLERANCE of DDPM-100 (guidance 2, NS 1)?"""
    key = {key_of(r): r for r in rows}
    ref = key.get(REFERENCE)
    if ref is None:
        return "DDIM-vs-DDPM check skipped: DDPM-100 (guidance 2, NS 1) was not in the grid.", {}
    texts, checks = [], {"reference_acc": ref["acc_generative"]}
    for sampler in (s for s in SAMPLERS if s.startswith("ddim")):
        ddim = sorted((key[k] for k in key if k[0] == sampler and k[1] <= 10 and k[2:] == (2.0, 1)),
                      key=lambda r: r["steps"])  # fmt: skip
        if not ddim:
            continue
        parts, within = [], []
        for r in ddim:
            gap = r["acc_generative"] - ref["acc_generative"]
            status = "within" if abs(gap) <= TOLERANCE else ("better" if gap > 0 else "worse")
            within.append({"steps": r["steps"], "acc": r["acc_generative"], "gap": gap, "status": status})
            parts.append(f"{r['steps']} steps {r['acc_generative']:.2f}% (Δ {gap:+.2f}, {status})")
        close = [w["steps"] for w in within if w["status"] == "within"]
        not_worse = [w["steps"] for w in within if w["status"] != "worse"]
        answer = "YES" if close else "NO"
        eta = sampler_spec(sampler, 1)["eta"]
        texts.append(
            f"**Is DDIM (eta {eta:g}) with ≤10 steps within {TOLERANCE} points (|Δ| ≤ {TOLERANCE}) of "
            f"DDPM-100 (guidance 2, NS 1) on this checkpoint? {answer}.** "
            f"DDPM-100: {ref['acc_generative']:.2f}%; "
            f"DDIM eta {eta:g}, guidance 2, NS 1: " + "; ".join(parts) + ". "
            f"Within ±{TOLERANCE}: {close or 'none'}; not more than {TOLERANCE} below: {not_worse or 'none'}."
        )
        checks[sampler] = {"eta": eta, "rows": within, "answer": answer, "within_steps": close,
                           "not_worse_steps": not_worse}  # fmt: skip
    return "\n\n".join(texts), checks


def plot(rows: list[dict[str, Any]], student_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = sorted({group_of(r) for r in rows})
    for sampler, g, ns in groups:
        sel = sorted((r for r in rows if group_of(r) == (sampler, g, ns)), key=lambda r: r["steps"])
        style = {"color": COLOURS[(sampler, g)], "ls": "-" if ns == 1 else "--",
                 "marker": "o" if sampler == "ddpm" else "^", "ms": 4}  # fmt: skip
        label = f"{sampler.upper().replace('_ETA', ' eta=')} g={g:g} NS={ns}"
        steps = [r["steps"] for r in sel]
        ax.plot(steps, [r["acc_generative"] for r in sel], label=label, **style)
        bx.plot(steps, [r["ms_per_image"] for r in sel], label=label, **style)
    ax.axhline(student_acc, color="k", lw=1, ls=":", label=f"student logits ({student_acc:.2f})")
    # Zoom on the useful range; report what falls below it instead of squashing the curves.
    floor = min(r["acc_generative"] for r in rows if r["steps"] >= 5) - 2
    low = [r for r in rows if r["acc_generative"] < floor]
    ax.set_ylim(floor, min(100.0, max(r["acc_generative"] for r in rows) + 1))
    if low:
        span = f"{min(r['acc_generative'] for r in low):.0f}–{max(r['acc_generative'] for r in low):.0f}%"
        steps_low = sorted({r["steps"] for r in low})
        ax.text(0.02, 0.6, f"off-scale:\n{len(low)} settings at\n{steps_low} steps\n({span})",
                transform=ax.transAxes, fontsize=7, va="top")  # fmt: skip
    for a, ylabel in ((ax, "generative test accuracy (%)"), (bx, "ms per image (measured)")):
        a.set_xscale("log")
        a.set_xlabel("sampling steps")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3, which="both")
    bx.set_yscale("log")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Accuracy vs steps (digits GenDD, seed 0)")
    bx.set_title("Cost vs steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small grid on the --quick digits run")
    parser.add_argument(
        "--run-dir", default=None, help="a GenDD run directory (default: seed 0 of digits_methods)"
    )
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluations per setting (min is kept)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs_root = SCRATCH / ("digits_methods_quick" if args.quick else "digits_methods")
    run_dir = Path(args.run_dir) if args.run_dir else find_run(runs_root)
    steps = [1, 10, 100] if args.quick else [1, 2, 5, 10, 25, 50, 100]
    grid = list(itertools.product(SAMPLERS, steps, [1.0, 2.0], [1] if args.quick else [1, 5]))
    out = results_dir(args.quick, args.results_dir)

    start = time.perf_counter()
    evaluator = RunEvaluator(run_dir, device="cpu")
    # Repeats sweep the whole grid in turn (not back to back), so a burst of load from other jobs on the
    # shared machine hits one repeat of many settings rather than every repeat of a few.
    results: dict[tuple, list[dict[str, Any]]] = {setting: [] for setting in grid}
    for rep in range(args.repeats):
        for i, setting in enumerate(grid):
            res = evaluate(evaluator, setting)
            results[setting].append(res)
            acc, ms = res["acc/generative"], 1000 * res["seconds"] / res["images"]
            print(f"[rep {rep + 1}, {i + 1}/{len(grid)}] {setting}: {acc:.2f}%  {ms:.3f} ms/img", flush=True)
    rows = [summarise(setting, results[setting]) for setting in grid]
    total = time.perf_counter() - start
    student_acc = rows[0]["acc_student"]

    header = ["sampler", "steps", "guidance", "NS", "generative acc (%)", "Δ vs DDPM-100 g2 NS1", "ms/image"]
    ref = next((r for r in rows if key_of(r) == REFERENCE), None)
    table = []
    for r in sorted(rows, key=lambda r: (SAMPLERS.index(r["sampler"]), *group_of(r)[1:], r["steps"])):
        delta = f"{r['acc_generative'] - ref['acc_generative']:+.2f}" if ref else "–"
        name = r["sampler"].upper().replace("_ETA", " eta=")
        table.append([name, r["steps"], f"{r['guidance']:g}", r["num_sampling"],
                      f"{r['acc_generative']:.2f}", delta, f"{r['ms_per_image']:.3f}"])  # fmt: skip
    text, check = verdict(rows)
    markdown = (
        "## Sampling cost: generative accuracy vs sampler, steps, guidance and NS\n\n"
        f"Checkpoint: supervised GenDD on digits, seed 0 (`{run_dir.name}`), best-on-val weights; test split "
        f"({rows[0]['images']} images), eval seed 0. Student-logit accuracy of the same checkpoint: "
        f"{student_acc:.2f}%. ms/image = fastest of {args.repeats} full test-set evaluations (the repeats "
        f"are interleaved passes over the grid; batch 512, {args.threads} threads, shared CPU; includes the "
        "student forward) / images.\n\n"
        + md_table(header, table)
        + "\n\n"
        + text
        + f"\n\nTotal benchmark time: {total:.0f} s."
    )
    data = {
        "benchmark": "sampling_cost",
        "quick": args.quick,
        "run_dir": str(run_dir),
        "student_acc": student_acc,
        "reference": dict(zip(["sampler", "steps", "guidance", "num_sampling"], REFERENCE, strict=True)),
        "ddim_vs_ddpm": check,
        "rows": rows,
        "total_s": round(total, 1),
        "threads": args.threads,
        "machine": machine_info(),
    }
    write_outputs(out, "sampling_cost", markdown, data)
    plot(rows, student_acc, out / "sampling_cost.png")
    print(f"wrote {out / 'sampling_cost.png'}")


if __name__ == "__main__":
    main()
