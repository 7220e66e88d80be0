"""Knowledge probes over the digits transfer benchmark: run `gendd-probe` on its run folders, read the
`probe.json` files back, and render the "Knowledge probes" table and the small-multiple plot.

A probe value means something only next to the CE student of the same student family and seed
(docs/probes.md, "The control"), so runs are probed per (seed, family, stage) batch, with
`control=<that CE run>` where the localization win rate can use it (conv and ViT students; an MLP has
no Grad-CAM map). The CE run itself is probed without a control (against itself the win rate is 50% by
construction). One `gendd-probe` per batch saves a torch start-up per run; when a batch fails, its
remaining runs are probed one by one so one bad run costs only itself.
"""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import BIN, fmt_ms, md_table, mean_std, train_env
from gendd_framework.analysis.report_probes import HEADLINE, PROBE_FILE, read_probe

FAMILIES = ("MLP", "CNN", "ViT")
# the family's CE control: the same preset, student and seed without the teacher
CONTROL = {"MLP": "ce", "CNN": "cnn_ce", "ViT": "vit_ce"}
WITH_MAPS = {"CNN", "ViT"}  # families whose students have a Grad-CAM map (the control's only use)
# per-method probe settings. SimKD deploys student -> projector -> the teacher's classifier: its map
# before the pooling is the projector's output (the default layer is not on the logits' path). The CE
# control has no `projector`, so these runs are probed without control (no win rate).
EXTRA: dict[str, list[str]] = {"cnn_simkd": ["localization.student_layer=projector"]}
# methods not probed, with the reason printed under the table (none at present)
SKIP: dict[str, str] = {}


def family(key: str) -> str:
    """The student family of a benchmark key: `vit_*` ViT, `cnn_*` the small CNN, else the MLP."""
    return "ViT" if key.startswith("vit_") else "CNN" if key.startswith("cnn_") else "MLP"


@dataclass
class Batch:
    """Run folders probed by one `gendd-probe` call: one seed, family and stage, one control."""

    seed: int
    family: str
    stage: str
    control: Path | None
    extra: tuple[str, ...]
    run_dirs: list[Path]

    @property
    def name(self) -> str:
        tail = ("_control" if self.control else "") + (
            f"_{self.run_dirs[0].parent.name}" if self.extra else ""
        )
        return f"seed{self.seed}_{self.family}_{self.stage}{tail}"


def batches(
    runs_root: Path, seeds: Sequence[int], methods: Sequence[tuple[str, str, list[str], str]]
) -> list[Batch]:
    """Every trained run without a probe.json (SKIP methods aside), grouped into batches; a run whose
    family's CE run is missing, or with EXTRA settings, is probed without a control."""
    grouped: dict[tuple[int, str, str, Path | None, tuple[str, ...]], list[Path]] = {}
    for seed in seeds:
        for key, _, _, stage in methods:
            run_dir = runs_root / key / f"seed{seed}"
            done = (run_dir / PROBE_FILE).is_file() or not (run_dir / "summary.json").is_file()
            if done or key in SKIP:
                continue
            fam, extra = family(key), tuple(EXTRA.get(key, ()))
            control = runs_root / CONTROL[fam] / f"seed{seed}"
            use = (
                fam in WITH_MAPS
                and key != CONTROL[fam]
                and not extra
                and (control / "summary.json").is_file()
            )
            grouped.setdefault((seed, fam, stage, control if use else None, extra), []).append(run_dir)
    return [Batch(s, f, st, c, e, dirs) for (s, f, st, c, e), dirs in grouped.items()]


def probe_command(batch: Batch, run_dirs: Sequence[Path]) -> list[str]:
    cmd = [str(BIN / "gendd-probe"), *map(str, run_dirs), f"stage={batch.stage}", "device=cpu", *batch.extra]
    return cmd + ([f"control={batch.control}"] if batch.control else [])


def last_error(log: Path) -> str:
    """The last `gendd-probe: error` or exception line of a log: the one-line reason in the report."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or line.split(":")[0].endswith("Error")]
    return (errors or lines or ["no output"])[-1][:300]


def run_batch(batch: Batch, log_dir: Path) -> dict[str, str]:
    """Probe one batch (one thread, like the training runs); on failure, each run still lacking a
    probe.json alone. Returns {run_dir: reason} for the runs that could not be probed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{batch.name}.log"
    with log.open("w") as out:
        cmd = probe_command(batch, batch.run_dirs)
        proc = subprocess.run(cmd, env=train_env(), stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode == 0:
        print(f"[probe {batch.name}] {len(batch.run_dirs)} runs", flush=True)
        return {}
    failures = {}
    for run_dir in (d for d in batch.run_dirs if not (d / PROBE_FILE).is_file()):
        one = log_dir / f"{batch.name}_{run_dir.parent.name}.log"
        with one.open("w") as out:
            cmd = probe_command(batch, [run_dir])
            proc = subprocess.run(cmd, env=train_env(), stdout=out, stderr=subprocess.STDOUT, check=False)
        if proc.returncode:
            failures[str(run_dir)] = last_error(one)
            print(f"[probe {run_dir}] FAILED: {failures[str(run_dir)]}", flush=True)
    return failures


def probe_runs(runs_root: Path, seeds: Sequence[int], methods: Sequence[Any], jobs: int) -> dict[str, str]:
    """Probe every trained run lacking a probe.json, `jobs` batches at a time; the failures."""
    todo = sorted(batches(runs_root, seeds, methods), key=lambda b: -len(b.run_dirs))  # longest first
    failures: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for result in pool.map(lambda b: run_batch(b, runs_root / "probe_logs"), todo):
            failures.update(result)
    return failures


def summary_metric(metric: str) -> bool:
    """`<probe>/<metric>` scalars and the per-kind corruption means go into the results JSON; the
    per-level corruption and per-family invariance values stay in each run's probe.json."""
    head, _, tail = metric.partition("/")
    return "/" not in tail or (head == "corruption" and not any(c.isdigit() for c in tail))


def add_probes(rec: dict[str, Any], runs_root: Path) -> None:
    """Per-seed probe metrics of one method record: `probe_seeds` and `probes` {metric: [values]}
    (`summary_metric`s only; none for SKIP methods, even when an older probe.json is there)."""
    rec["probe_seeds"], rec["probes"] = [], {}
    if rec["key"] in SKIP:
        return
    for seed in rec["seeds"]:
        metrics = read_probe(runs_root / rec["key"] / f"seed{seed}")
        if metrics:
            rec["probe_seeds"].append(seed)
        for name, value in metrics.items():
            if summary_metric(name.removeprefix("probe:")):
                rec["probes"].setdefault(name.removeprefix("probe:"), []).append(value)


def ordered(records: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(family, record) of the probed methods, family by family, each family's CE control first."""
    out = []
    for fam in FAMILIES:
        members = [r for r in records if family(r["key"]) == fam and r.get("probe_seeds")]
        members.sort(key=lambda r: r["key"] != CONTROL[fam])  # stable: benchmark order after CE
        out += [(fam, r) for r in members]
    return out


def probe_table(records: list[dict[str, Any]]) -> str:
    """Mean ± std over the probed seeds, one row per method; beside them the accuracy (summary) and the
    agreement with the teacher the probes used (probe.json: the original CNN teacher for born-again)."""
    header = ["student", "method", "probed runs", "acc (%)", "agreement (%)"]
    header += [label for label, _ in HEADLINE.values()]
    rows = []
    for fam, rec in ordered(records):
        cells = [fam, rec["label"], len(rec["probe_seeds"]), fmt_ms(rec.get("acc/student")),
                 fmt_ms(rec["probes"].get("calibration/agree"))]  # fmt: skip
        cells += [fmt_ms(rec["probes"].get(metric), digits) for metric, (_, digits) in HEADLINE.items()]
        rows.append(cells)
    return md_table(header, rows)


def probe_notes(failures: dict[str, str], records: list[dict[str, Any]]) -> list[str]:
    """How to read the probe table; the methods left out and the runs that could not be probed."""
    keys = {r["key"] for r in records if r["seeds"]}
    notes = [
        "`gendd-probe` with its defaults on each run's best-on-val checkpoint (449 test images): Grad-CAM",
        "IoU of the top-20% pixels with the teacher's map (chance 0.111) and the % of images where the",
        "student's map is closer (cosine) to the teacher's than the CE student's is (win rate, 50% = no",
        "closer; the CE row itself has none); the % of the teacher's I-FGSM images (ε = 0.25 input std,",
        "5 steps) that also flip the student; the student's consistency under ±1-pixel shifts, contrast",
        "and brightness on the images where the teacher is consistent; agreement with the teacher under",
        "Gaussian noise (0.25, 0.5, 1 input std, mean); the worst teacher class's agreement. Read each",
        "row against the CE row of its student family: a method transferred something where it moves",
        "away from CE toward the teacher. acc is the summary's; agreement is the probe's (same",
        "checkpoint) with the teacher the probes used: the CNN teacher, the ensemble for MEAL V2, and for",
        "born-again the original CNN teacher (the probe reads the teacher from the summary), not the",
        "generation-1 student of the tables above. The probed predictor is `method.export()`: the",
        "student network (GenDD: its student network, not the generative sampler). The MLP has no",
        "spatial map, so its localization cells are empty.",
    ]
    if "cnn_simkd" in keys and "cnn_simkd" in EXTRA:
        notes += [
            "SimKD deploys student → projector → the teacher's classifier: its CAM is read at the",
            "projector's output, the map that feeds the reused classifier (`"
            + " ".join(EXTRA["cnn_simkd"])
            + "`);",
            "the CE control has no projector, so SimKD has no win rate.",
        ]
    skipped = [f"- {key}: {reason}." for key, reason in SKIP.items() if key in keys]
    if skipped:
        notes += ["", "Not probed:", *skipped]
    if failures:
        notes += ["", f"Runs that could not be probed ({len(failures)}), left out of the table:"]
        notes += [
            f"- `{Path(run).parent.name}/{Path(run).name}`: {reason}" for run, reason in failures.items()
        ]
    return notes


def probe_plot(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Small multiples (gendd_framework.analysis.plots.plot_probes): a panel per headline, a bar per method,
    each family's CE hatched with a dashed line at its mean across its family."""
    from gendd_framework.analysis.plots import plot_probes

    entries, controls = [], {}
    for fam, rec in ordered(records):
        label = rec["label"].removeprefix("ViT student: ")  # the family already says it
        name = f"{fam}: " + textwrap.shorten(label, 34, placeholder="…")
        entry: dict[str, Any] = {"name": name}
        for metric in HEADLINE:
            if rec["probes"].get(metric):
                entry[metric] = mean_std(rec["probes"][metric])
        entries.append(entry)
        if rec["key"] == CONTROL[fam]:
            controls[name] = []
        for control in controls:
            if control.startswith(f"{fam}: "):
                controls[control].append(name)
    keys = [m for m in HEADLINE if any(m in e for e in entries)]
    if not keys:
        return None
    labels = {m: label for m, (label, _) in HEADLINE.items()}
    title = "Digits transfer set: knowledge probes, mean ± std over seeds"
    return plot_probes(entries, keys, labels, path, controls, title)
