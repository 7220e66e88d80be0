"""The discriminating digits benchmark: every method (logit, feature, GenDD) on the transfer-set presets.

`experiment=digits/transfer` shows the student the labels of 5% of the training images while the
distillation terms see every image; the teacher is the cached digits CNN trained on all labels. Each
(method, seed) is one `gendd-train` run in a scratch folder (two at a time, one thread each); runs whose
summary exists are not retrained. Results: results/digits_transfer.{md,json,png}.

After training, `--probes` (default on, off with --quick) runs `gendd-probe` on every run folder
without a probe.json (docs/probes.md; the CNN and ViT runs with `control=` the CE run of the same
seed and student) and adds the "Knowledge probes" table, results/digits_transfer_probes.png and the
per-seed probe metrics of each method to the JSON.

Every method runs with its config as shipped: published defaults, plus the `per_recipe.digits` entries
that scale epoch-based settings of 240-epoch CIFAR recipes to the 60 digits epochs (DKD warm-up 20 -> 5,
WKD-L decay from epoch 150 -> 37.5).

    python benchmarks/digits_transfer.py             # 35 configurations x 3 seeds + probes: ~60 min on
                                                     # 2 shared CPU cores (probes ~3 min of it)
    python benchmarks/digits_transfer.py --quick     # 1 seed, 2 epochs: a smoke test
    python benchmarks/digits_transfer.py --quick --probes --methods ce kd cnn_ce cnn_kd   # + probes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
from _digits_probes import add_probes, probe_notes, probe_plot, probe_runs, probe_table

TRANSFER = ["experiment=digits/transfer"]
# (key, label, overrides, stage whose test metrics are reported)
METHODS: list[tuple[str, str, list[str], str]] = [
    ("ce", "CE (student alone)", [*TRANSFER, "method=ce"], "distill"),
    ("kd", "KD (Hinton)", [*TRANSFER, "method=kd"], "distill"),
    ("kd_ls", "KD + logit standardisation", [*TRANSFER, "method=kd_ls"], "distill"),
    ("dkd", "DKD", [*TRANSFER, "method=dkd"], "distill"),
    ("dist", "DIST", [*TRANSFER, "method=dist"], "distill"),
    ("wkd_l", "WKD-L", [*TRANSFER, "method=wkd_l"], "distill"),
    ("pld", "PLD", [*TRANSFER, "method=pld"], "distill"),
    ("meal_v2", "MEAL V2 (3-teacher ensemble)",
     [*TRANSFER, "method=meal_v2", "teacher=digits_ensemble", "method.discriminator=false"], "distill"),
    (
        "meal_v2_disc",
        "MEAL V2 + discriminator",
        [*TRANSFER, "method=meal_v2", "teacher=digits_ensemble", "method.discriminator=true"],
        "distill",
    ),
    ("born_again", "KD, born-again generation 2",
     [*TRANSFER, "method=kd", "stages=[teacher,distill,born_again]"], "born_again"),
    ("gendd", "GenDD", ["experiment=digits/gendd", "data.label_fraction=0.05"], "distill"),
    ("ctkd", "CTKD (KD, learned temperature)", [*TRANSFER, "method=ctkd"], "distill"),
    # teacher-free: the unlabelled images reach them only through consistency / mutual terms
    ("mean_teacher", "Mean teacher (EMA model, no teacher)", [*TRANSFER, "method=mean_teacher"], "distill"),
    ("dml", "DML (peer 1 of 2, no teacher)", [*TRANSFER, "method=dml"], "distill"),
]  # fmt: skip
CNN = ["experiment=digits/transfer_cnn"]
# the CNN-student preset (three stages of spatial maps): CE/KD references, then every feature method
FEATURE_METHODS: list[tuple[str, str, list[str], str]] = [
    ("cnn_ce", "CE (student alone)", [*CNN, "method=ce"], "distill"),
    ("cnn_kd", "KD (Hinton)", [*CNN, "method=kd"], "distill"),
    ("cnn_fitnet", "FitNet (hint + CE, one stage)", [*CNN, "method=fitnet"], "distill"),
    ("cnn_fitnet_stagewise", "FitNet, stage-wise (hint stage, then KD)",
     ["experiment=digits/fitnet_stagewise"], "distill"),
    ("cnn_at", "AT", [*CNN, "method=at"], "distill"),
    ("cnn_sp", "SP", [*CNN, "method=sp"], "distill"),
    ("cnn_pkt", "PKT", [*CNN, "method=pkt"], "distill"),
    ("cnn_rkd", "RKD", [*CNN, "method=rkd"], "distill"),
    ("cnn_vid", "VID", [*CNN, "method=vid"], "distill"),
    ("cnn_crd", "CRD", [*CNN, "method=crd"], "distill"),
    ("cnn_reviewkd", "ReviewKD", [*CNN, "method=reviewkd"], "distill"),
    ("cnn_wkd_f", "WKD-F", [*CNN, "method=wkd_f"], "distill"),
    ("cnn_nd", "ND (+ KD)", [*CNN, "method=nd"], "distill"),
    ("cnn_pe", "Projector ensemble", [*CNN, "method=projector_ensemble"], "distill"),
    ("cnn_ofa", "OFA (CNN student)", [*CNN, "method=ofa"], "distill"),
    ("cnn_nd_dkd", "ND + DKD", [*CNN, "method=nd_dkd"], "distill"),
    ("cnn_reviewkd_dkd", "ReviewKD + DKD", [*CNN, "method=reviewkd_dkd"], "distill"),
    ("cnn_simkd", "SimKD (teacher classifier reused)", [*CNN, "method=simkd"], "distill"),
    ("vit_ce", "ViT student: CE", [*CNN, "student=digits_vit", "method=ce"], "distill"),
    ("vit_kd", "ViT student: KD", [*CNN, "student=digits_vit", "method=kd"], "distill"),
    ("vit_ofa", "ViT student: OFA", [*CNN, "student=digits_vit", "method=ofa"], "distill"),
]  # fmt: skip
ALL_METHODS = METHODS + FEATURE_METHODS
OUTPUTS = ("student", "generative")
METRICS = ("acc", "agree", "kl", "ece")


def run_one(key: str, overrides: list[str], seed: int, run_dir: Path, extra: list[str]) -> float:
    """Train one (method, seed) unless its summary exists; return wall seconds (0 when skipped).
    A failed run raises SystemExit naming its command (`train_all` records it and goes on)."""
    if (run_dir / "summary.json").exists():
        return 0.0
    cmd = [str(BIN / "gendd-train"), *overrides, f"seed={seed}", "trainer.progress=false", *extra]
    cmd.append(f"hydra.run.dir={run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        proc = subprocess.run(cmd, env=train_env(), stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise SystemExit(f"[{key} seed {seed}] gendd-train failed (rc={proc.returncode}): {' '.join(cmd)}")
    print(f"[{key} seed {seed}] {time.perf_counter() - start:.0f} s", flush=True)
    return time.perf_counter() - start


def train_all(
    jobs: list[tuple[str, list[str], int]], runs_root: Path, extra: list[str], workers: int
) -> dict:
    """Every (key, overrides, seed) job, `workers` at a time; {"key seed N": error} of the failed ones,
    so one broken method leaves the others' results (its rows then show fewer runs)."""

    def one(job: tuple[str, list[str], int]) -> tuple[str, str | None]:
        key, overrides, seed = job
        try:
            run_one(key, overrides, seed, runs_root / key / f"seed{seed}", extra)
        except SystemExit as exc:
            print(exc, flush=True)
            return f"{key} seed {seed}", str(exc)
        return f"{key} seed {seed}", None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return {name: error for name, error in pool.map(one, jobs) if error is not None}


def summarise(runs_root: Path, seeds: list[int]) -> tuple[list[dict[str, Any]], float]:
    """Per-method lists of per-seed metrics for each output, plus the teacher's test accuracy."""
    records, teacher_acc = [], float("nan")
    for key, label, overrides, stage in ALL_METHODS:
        rec: dict[str, Any] = {
            "key": key,
            "label": label,
            "overrides": overrides,
            "stage": stage,
            "seeds": [],
        }
        for seed in seeds:
            path = runs_root / key / f"seed{seed}" / "summary.json"
            if not path.exists():
                continue
            summary = json.loads(path.read_text())
            rec["seeds"].append(seed)
            rec.setdefault("elapsed_s", []).append(summary["elapsed_s"])
            # a primary output outside OUTPUTS fills the `student` columns (mean teacher: its EMA model)
            primary = (summary[stage].get("select") or "acc/student").split("/", 1)[1]
            names = {} if primary in OUTPUTS else {"student": primary}
            for out in OUTPUTS:
                for metric in METRICS:
                    value = summary[stage]["test"].get(f"{metric}/{names.get(out, out)}")
                    if value is not None:
                        rec.setdefault(f"{metric}/{out}", []).append(value)
            if key == "kd":
                teacher = summary["teacher"]["test"]  # runs before the rename keyed it acc/student
                teacher_acc = teacher.get("acc/teacher", teacher.get("acc/student"))
        add_probes(rec, runs_root)
        records.append(rec)
    return records, teacher_acc


def criterion(records: list[dict[str, Any]], kd: str = "kd", ce: str = "ce") -> dict[str, Any]:
    """KD beats CE by more than twice the larger of their standard deviations."""
    by_key = {r["key"]: r for r in records}
    if not by_key.get(kd, {}).get("acc/student") or not by_key.get(ce, {}).get("acc/student"):
        return {"kd_minus_ce": float("nan"), "two_max_std": float("nan"), "passes": False}
    (kd_m, kd_s), (ce_m, ce_s) = mean_std(by_key[kd]["acc/student"]), mean_std(by_key[ce]["acc/student"])
    margin, needed = kd_m - ce_m, 2 * max(kd_s, ce_s)
    return {"kd_minus_ce": round(margin, 2), "two_max_std": round(needed, 2), "passes": margin > needed}


def table(records: list[dict[str, Any]], generative: bool) -> str:
    header = ["method", "runs", "acc (%)", "agreement (%)", "KL(t‖s)", "ECE (%)", "generative acc (%)",
              "generative agreement (%)", "s/run"]  # fmt: skip
    if not generative:
        header = header[:6] + header[8:]
    rows = []
    for rec in records:
        secs = rec.get("elapsed_s", [])
        rows.append([
            rec["label"], len(rec["seeds"]), fmt_ms(rec.get("acc/student")), fmt_ms(rec.get("agree/student")),
            fmt_ms(rec.get("kl/student"), 3), fmt_ms(rec.get("ece/student")),
            fmt_ms(rec.get("acc/generative")), fmt_ms(rec.get("agree/generative")),
            f"{sum(secs) / len(secs):.0f}" if secs else "–",
        ])  # fmt: skip
        if not generative:
            rows[-1] = rows[-1][:6] + rows[-1][8:]
    return md_table(header, rows)


def render(
    records: list[dict[str, Any]],
    teacher_acc: float,
    check: dict[str, Any],
    cnn_check: dict[str, Any],
    failures: dict[str, dict[str, str]] | None = None,
) -> str:
    """The markdown: logit methods (MLP), feature methods (CNN/ViT), knowledge probes when any run has
    a probe.json; `failures` ({"train": ..., "probe": ...}) are listed under the tables."""
    failures = failures or {}
    logit_keys = {m[0] for m in METHODS}
    logit = [r for r in records if r["key"] in logit_keys]
    feature = [r for r in records if r["key"] not in logit_keys and r["seeds"]]
    verdict = "passes" if check["passes"] else "FAILS"
    notes = [
        "Digits transfer set: the student sees the labels of 5% of the training images (stratified), the",
        "distillation terms see all of them. Test split: 449 images (one image = 0.22 points). Best-on-val",
        "checkpoint, mean ± sample std over seeds. Agreement = % of test images where the student's top-1",
        "equals the teacher's; KL = mean KL(teacher ‖ student) at τ=1 (nats); ECE = 15-bin expected",
        "calibration error. GenDD's `generative` logits: DDPM 100 steps, guidance 2, one sample. The",
        "born-again row reports generation 2 (the KD student of generation 1 teaches a fresh student).",
        "MEAL V2 rows use a 3-member ensemble teacher (its members' accuracies are in each summary.json).",
        "Agreement and KL are measured against the run's own teacher: the ensemble for MEAL V2, the",
        "generation-1 student for born-again, the CNN teacher for every other row.",
        "Mean teacher and DML use no teacher (it is only the agreement reference); the mean-teacher row",
        "reports its EMA model (the method's primary output), the DML row peer 1 of 2.",
        "",
        f"- Teacher (small_cnn on all labels) test accuracy: {teacher_acc:.2f}%.",
        f"- Criterion (KD − CE > 2 × max std): KD − CE = {check['kd_minus_ce']:.2f} vs "
        f"{check['two_max_std']:.2f}: {verdict}.",
        "- s/run = mean `elapsed_s` per run (two runs at a time on a shared 2-core machine).",
    ]
    cnn_verdict = "passes" if cnn_check["passes"] else "FAILS"
    feature_notes = [
        "Same protocol and teacher; the student is `small_cnn` [16, 32, 64]",
        "(`experiment=digits/transfer_cnn`), whose three stages (8x8, 4x4, 2x2 maps) give the feature",
        "methods intermediate maps to match. Each method runs with its shipped config (published CIFAR-100",
        "defaults plus its `per_recipe.digits` entry). The ViT rows swap in a tiny timm ViT student",
        "(`student=digits_vit`): the heterogeneous case OFA targets.",
        "",
        f"- Criterion for this student (KD − CE > 2 × max std): KD − CE = {cnn_check['kd_minus_ce']:.2f} vs "
        f"{cnn_check['two_max_std']:.2f}: {cnn_verdict}.",
    ]
    out = "## Digits transfer set: every logit method and GenDD (MLP student)\n\n" + table(logit, True)
    out += "\n\n" + "\n".join(notes)
    if feature:
        out += "\n\n## Digits transfer set: feature methods (CNN student)\n\n" + table(feature, False)
        out += "\n\n" + "\n".join(feature_notes)
    if any(r.get("probe_seeds") for r in records):
        out += "\n\n## Digits transfer set: knowledge probes (every method, CE control first)\n\n"
        out += probe_table(records) + "\n\n" + "\n".join(probe_notes(failures.get("probe", {}), records))
    if failures.get("train"):
        out += f"\n\nTraining runs that failed ({len(failures['train'])}), missing from the tables:\n"
        out += "\n".join(f"- {name}: {error}" for name, error in failures["train"].items())
    return out


def plot(records: list[dict[str, Any]], teacher_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logit_keys = {m[0] for m in METHODS}
    groups = [
        ("MLP student: logit methods and GenDD", [r for r in records if r["key"] in logit_keys]),
        (
            "CNN / ViT student: feature methods",
            [r for r in records if r["key"] not in logit_keys and r["seeds"]],
        ),
    ]
    groups = [(title, [r for r in g if r["seeds"]]) for title, g in groups]
    groups = [g for g in groups if g[1]]
    fig, axes = plt.subplots(len(groups), 2, figsize=(14, 4.8 * len(groups)), squeeze=False)
    for (group_title, group), row in zip(groups, axes):
        labels = [textwrap.shorten(r["label"], 28, placeholder="…") for r in group]
        for ax, metric, title in ((row[0], "acc", "test accuracy (%)"), (row[1], "agree", "agreement (%)")):
            for offset, out, colour in ((-0.2, "student", "tab:blue"), (0.2, "generative", "tab:orange")):
                xs, ms, ss = [], [], []
                for i, rec in enumerate(group):
                    if rec.get(f"{metric}/{out}"):
                        m, s = mean_std(rec[f"{metric}/{out}"])
                        xs.append(i + offset), ms.append(m), ss.append(s)
                if xs:
                    ax.bar(xs, ms, 0.4, yerr=ss, capsize=3, color=colour, label=f"{out} logits")
            if metric == "acc":
                ax.axhline(teacher_acc, color="k", ls="--", lw=1, label=f"teacher ({teacher_acc:.2f})")
            ax.set_ylim(20 if "ViT" in group_title else 60, 100.5)
            ax.set_xticks(range(len(group)), labels, fontsize=7, rotation=35, ha="right")
            ax.set_title(f"{group_title}: {title}", fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Digits transfer set (5% labels): mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, scratch results folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--runs-dir", default=None, help="default: .cache/gendd/benchmarks/digits_transfer")
    parser.add_argument("--results-dir", default=None, help="tables/plots (default: benchmarks/results)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these keys, e.g. ce kd dkd")
    parser.add_argument(
        "--probes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run gendd-probe on every run without a probe.json (default: on; off with --quick)",
    )
    args = parser.parse_args()
    probes = (not args.quick) if args.probes is None else args.probes
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    runs_root = (
        Path(args.runs_dir) if args.runs_dir else SCRATCH / ("digits_transfer" + ("_quick" * args.quick))
    )
    extra = ["trainer.epochs=2"] if args.quick else []
    chosen = [m for m in ALL_METHODS if args.methods is None or m[0] in args.methods]
    # every method's first seed before any second seed: partial results stay comparable
    jobs = [(key, overrides, seed) for seed in seeds for key, _, overrides, _ in chosen]
    start = time.perf_counter()
    run_one("kd", METHODS[1][2], seeds[0], runs_root / "kd" / f"seed{seeds[0]}", extra)  # caches the teacher
    failures = {"train": train_all(jobs, runs_root, extra, args.jobs)}
    if probes:
        failures["probe"] = probe_runs(runs_root, seeds, chosen, args.jobs)
    records, teacher_acc = summarise(runs_root, seeds)
    check = criterion(records)
    cnn_check = criterion(records, "cnn_kd", "cnn_ce")
    markdown = render(records, teacher_acc, check, cnn_check, failures)
    out = results_dir(args.quick, args.results_dir)
    data = {
        "benchmark": "digits_transfer",
        "seeds": seeds,
        "extra_overrides": extra,
        "runs_dir": str(runs_root),
        "teacher_test_acc": teacher_acc,
        "criterion": check,
        "criterion_cnn_student": cnn_check,
        "methods": records,  # `probes`: {metric: per-seed values} of the `probe_seeds`
        "failures": failures,
        "wall_s_this_invocation": round(time.perf_counter() - start, 1),
        "machine": machine_info(),
    }
    write_outputs(out, "digits_transfer", markdown, data)
    plot(records, teacher_acc, out / "digits_transfer.png")
    print(f"wrote {out / 'digits_transfer.png'}")
    if probe_plot(records, out / "digits_transfer_probes.png"):
        print(f"wrote {out / 'digits_transfer_probes.png'}")


if __name__ == "__main__":
    main()
