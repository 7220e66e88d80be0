"""Digits accuracy of every distillation method over several seeds (CE, KD, GenDD and their variants).

Each method is one `gendd-train -m experiment=digits/<name> seed=...` multirun in a scratch folder
(checkpoints stay out of git); the summaries are aggregated into results/digits_methods.{md,json,png}.
Seeds whose summary already exists are not retrained, so an interrupted run can simply be restarted.

    python benchmarks/digits_methods.py            # 7 methods x 3 seeds, ~25 min on 2 CPU cores
    python benchmarks/digits_methods.py --quick    # 1 seed, 2 epochs: a smoke test (~2 min)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from _common import (
    BIN,
    ROOT,
    SCRATCH,
    fmt_ms,
    machine_info,
    md_table,
    mean_std,
    results_dir,
    train_env,
    write_outputs,
)
from gendd_framework.analysis.report import collect

# (experiment, label shown in the table); order = table/plot order.
METHODS = [
    ("digits/ce", "CE (student alone)"),
    ("digits/kd", "KD (Hinton)"),
    ("digits/gendd", "GenDD supervised"),
    ("digits/kd_unsup", "unsupervised KL (no labels)"),
    ("digits/kd_unsup_frozen_fc", "unsupervised KL, fc frozen at init (official)"),
    ("digits/gendd_unsup", "GenDD unsupervised (no labels)"),
    ("digits/gendd_naive", "naive GenDD (1 token)"),
]
# No labels and ce_weight 0: the student's own fc is never trained, its logits are chance level.
UNTRAINED_FC = {"digits/gendd_unsup"}
STUDENT, GENERATIVE = "distill/test/acc/student", "distill/test/acc/generative"
TEACHER = "teacher/test/acc/teacher"


def run_method(experiment: str, seeds: list[int], sweep_dir: Path, extra: list[str]) -> float:
    """Train the seeds of one experiment that have no summary yet; return the wall-clock seconds."""
    done = {row["seed"] for row in collect(sweep_dir)} if sweep_dir.exists() else set()
    todo = [s for s in seeds if s not in done]
    if not todo:
        print(f"[{experiment}] all seeds already done in {sweep_dir}")
        return 0.0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cmd = [
        "nice", "-n", "10", str(BIN / "gendd-train"), "-m",
        f"experiment={experiment}",
        "seed=" + ",".join(map(str, todo)),
        "trainer.progress=false",
        *extra,
        f"hydra.sweep.dir={sweep_dir / stamp}",
    ]  # fmt: skip
    print(f"[{experiment}] seeds {todo}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    log, meta = sweep_dir / f"{stamp}.log", sweep_dir / f"{stamp}.meta.json"
    log.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"git_head": git_head(), "cmd": cmd}))
    with log.open("w") as fh:
        proc = subprocess.run(cmd, env=train_env(), stdout=fh, stderr=subprocess.STDOUT, check=False)
    elapsed = time.perf_counter() - start
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "wall_s": round(elapsed, 1)}))
    if proc.returncode:
        sys.exit(f"[{experiment}] gendd-train failed (rc={proc.returncode}); see {log}")
    print(f"[{experiment}] done in {elapsed:.0f} s", flush=True)
    return elapsed


def summarise(runs_root: Path, seeds: list[int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-method records (per-seed accuracies) plus the teacher's accuracy."""
    records, teacher = [], {}
    for experiment, label in METHODS:
        rows = [r for r in collect(runs_root / experiment.replace("/", "_")) if r["seed"] in seeds]
        rows.sort(key=lambda r: r["seed"])
        rec: dict[str, Any] = {"experiment": experiment, "label": label, "seeds": [r["seed"] for r in rows]}
        rec["student"] = [r[STUDENT] for r in rows if STUDENT in r]
        rec["generative"] = [r[GENERATIVE] for r in rows if GENERATIVE in r]
        rec["generative_ns5"] = [generative_ns5(Path(r["run_dir"])) for r in rows if GENERATIVE in r]
        summaries = [json.loads((Path(r["run_dir"]) / "summary.json").read_text()) for r in rows]
        rec["elapsed_s"] = [sm.get("elapsed_s") for sm in summaries]
        # which cached teacher (file name = config hash) and which code (git HEAD at launch) each run used
        rec["teacher"] = [Path(sm["teacher"]["source"].split(":", 1)[-1]).stem for sm in summaries]
        metas = {str(Path(r["run_dir"]).parent): sweep_meta(Path(r["run_dir"])) for r in rows}
        rec["git_head"] = [metas[str(Path(r["run_dir"]).parent)].get("git_head") for r in rows]
        rec["sweep_wall_s"] = sum(m.get("wall_s") or 0 for m in metas.values()) or None
        records.append(rec)
        for r, key in zip(rows, rec["teacher"], strict=True):
            teacher[key] = round(r[TEACHER], 2)
    return records, teacher


def generative_ns5(run_dir: Path) -> float:
    """Test accuracy of the generative logits averaged over 5 samples per image (the official eval
    scripts' --num_sampling 5), re-evaluated once from the best checkpoint and cached in the run dir."""
    cache = run_dir / "bench_generative_ns5.json"
    if not cache.exists():
        from gendd_framework.cli.evaluate import RunEvaluator

        result = RunEvaluator(run_dir, device="cpu").evaluate({"num_sampling": 5}, "test")
        cache.write_text(json.dumps(result, indent=2))
    return json.loads(cache.read_text())["acc/generative"]


def git_head() -> str:
    cmd = ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def same_code(heads: list[str]) -> str:
    """Whether the commits differ in anything that shapes a digits run (src/ and the configs it uses)."""
    if len(heads) < 2 or "unknown" in heads:
        return ""
    paths = ["src", "conf/experiment/digits", "conf/method", "conf/data", "conf/teacher", "conf/student",
             "conf/trainer", "conf/optim", "conf/sched", "conf/train.yaml"]  # fmt: skip
    cmd = ["git", "-C", str(ROOT), "diff", "--quiet", heads[0], heads[-1], "--", *paths]
    rc = subprocess.run(cmd, check=False).returncode
    return " (no difference in src/ or the digits configs between them)" if rc == 0 else " (code DIFFERS)"


def sweep_meta(run_dir: Path) -> dict[str, Any]:
    path = run_dir.parent.parent / f"{run_dir.parent.name}.meta.json"
    return json.loads(path.read_text()) if path.exists() else {}


def render(records: list[dict[str, Any]], teacher: dict[str, Any]) -> str:
    header = ["method", "runs", "student acc (%)", "generative acc (%)", "generative NS=5 (%)",
              "student per seed", "generative per seed", "s/run"]  # fmt: skip
    rows = []
    dag = lambda rec: " †" if rec["experiment"] in UNTRAINED_FC else ""  # noqa: E731
    for rec in records:
        per = lambda vals: ", ".join(f"{v:.2f}" for v in vals) or "–"  # noqa: E731
        secs = [s for s in rec["elapsed_s"] if s is not None]
        rows.append([
            rec["label"], len(rec["seeds"]), fmt_ms(rec["student"]) + dag(rec), fmt_ms(rec["generative"]),
            fmt_ms(rec["generative_ns5"]), per(rec["student"]) + dag(rec), per(rec["generative"]),
            f"{sum(secs) / len(secs):.0f}" if secs else "–",
        ])  # fmt: skip
    teacher_txt = ", ".join(f"`{k}` → {a:.2f}" for k, a in teacher.items()) or "–"
    if len(teacher) > 1:
        teacher_txt += " — WARNING: runs used different teachers, rows are not comparable"
    heads = sorted({h or "unknown" for rec in records for h in rec["git_head"]})
    notes = [
        "Test accuracy (%) on sklearn digits (25% test split, 449 images), best-on-val checkpoint,",
        "mean ± sample std over seeds. `student` = the student's own classifier logits; `generative` =",
        "teacher head on GenDD-sampled features (DDPM 100 steps, guidance 2, 1 sample; the NS=5 column",
        "averages the teacher logits of 5 samples per image, as the official evaluation scripts do).",
        "Unsupervised rows use no labels for the student (the teacher was trained with labels).",
        "s/run = mean wall-clock `elapsed_s` per run (shared 2-core machine, so only indicative).",
        "",
        "† unsupervised GenDD trains no student classifier (no labels, ce_weight 0): its `student`",
        "logits come from the randomly initialised fc and are chance level by construction;",
        "judge that row by `generative`.",
        "",
        f"- Teacher (small_cnn, cache key → test acc): {teacher_txt}.",
        f"- Code (git HEAD at launch): {', '.join(heads)}{same_code(heads)}.",
    ]
    return "## Digits: accuracy per method\n\n" + md_table(header, rows) + "\n\n" + "\n".join(notes)


def plot(records: list[dict[str, Any]], teacher: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.38
    for offset, key, colour in ((-width / 2, "student", "tab:blue"), (width / 2, "generative", "tab:orange")):
        xs, ms, ss = [], [], []
        for i, rec in enumerate(records):
            if key == "student" and rec["experiment"] in UNTRAINED_FC:
                note = "student fc untrained †"
                ax.text(i + offset, 0.03, note, ha="center", va="bottom", fontsize=7, rotation=90,
                        transform=ax.get_xaxis_transform())  # fmt: skip
            elif rec[key]:
                m, s = mean_std(rec[key])
                xs.append(i + offset), ms.append(m), ss.append(s)
        ax.bar(xs, ms, width, yerr=ss, capsize=4, label=f"{key} logits", color=colour)
        for x, m, sd in zip(xs, ms, ss, strict=True):
            ax.text(x, m + sd + 0.1, f"{m:.2f}", ha="center", va="bottom", fontsize=7)
    if teacher:
        ax.axhline(
            max(teacher.values()), color="k", ls="--", lw=1, label=f"teacher ({max(teacher.values()):.2f})"
        )
    lows = [
        v
        for rec in records
        for v in rec["generative"] + ([] if rec["experiment"] in UNTRAINED_FC else rec["student"])
    ]
    ax.set_ylim(max(0.0, min(lows, default=5) - 5), 100.5)
    ax.set_xticks(range(len(records)), [textwrap.fill(r["label"], 18) for r in records], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Digits: student vs generative accuracy (mean ± std over seeds)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, scratch results folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    parser.add_argument(
        "--runs-dir", default=None, help="run directories (default: .cache/gendd/benchmarks/...)"
    )
    parser.add_argument("--results-dir", default=None, help="tables/plots (default: benchmarks/results)")
    parser.add_argument("--methods", nargs="+", default=None, help="train only these, e.g. ce gendd")
    parser.add_argument("--fresh", action="store_true", help="delete the runs folder first")
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    runs_root = (
        Path(args.runs_dir)
        if args.runs_dir
        else SCRATCH / ("digits_methods_quick" if args.quick else "digits_methods")
    )
    if args.fresh and runs_root.exists():
        shutil.rmtree(runs_root)
    extra = ["trainer.epochs=2"] if args.quick else []
    out = results_dir(args.quick, args.results_dir)

    start = time.perf_counter()
    chosen = [e for e, _ in METHODS if args.methods is None or e.split("/")[1] in args.methods]
    walls = {exp: run_method(exp, seeds, runs_root / exp.replace("/", "_"), extra) for exp in chosen}
    total = time.perf_counter() - start
    records, teacher = summarise(runs_root, seeds)
    markdown = render(records, teacher)
    sum_runs = sum(s for rec in records for s in rec["elapsed_s"] if s is not None)
    sweeps = sum(rec["sweep_wall_s"] or 0 for rec in records)
    markdown += (
        f"\n- Training time: {sum_runs / 60:.1f} min summed over runs (`elapsed_s`); "
        f"{sweeps / 60:.1f} min of `gendd-train -m` wall clock summed over the method sweeps."
    )
    data = {
        "benchmark": "digits_methods",
        "quick": args.quick,
        "seeds": seeds,
        "overrides": extra,
        "runs_dir": str(runs_root),
        "teacher_test_acc": teacher,
        "methods": records,
        "wall_s_this_invocation": {"total": round(total, 1), **{k: round(v, 1) for k, v in walls.items()}},
        "sum_run_elapsed_s": round(sum_runs, 1),
        "machine": machine_info(),
    }
    write_outputs(out, "digits_methods", markdown, data)
    plot(records, teacher, out / "digits_methods.png")
    print(f"wrote {out / 'digits_methods.png'}")


if __name__ == "__main__":
    main()
