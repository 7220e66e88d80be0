"""Aggregate `summary.json` files (a multirun, a benchmark) into a mean ± std table per group of runs.

Runs are grouped by the command-line overrides that differ between them (seeds are the replicates),
so a sweep `method.temperature=2,4 seed=0,1` gives one row per temperature and never averages them
together; run directories without Hydra's `overrides.yaml` fall back to grouping by run name.

The default table answers "how good is the distilled student, and what did it inherit?": for the final
training stage, the test accuracy of each run's *primary* output (the one its model selection used,
`summary.json` -> `select`: `student` for most methods, `generative` for GenDD) at the selected and the
last epoch, then every output's accuracy, agreement with and KL to the teacher, and calibration, next to
the teacher's own accuracy. When a run's (recipe, method) has a published row (`published_recipes.yaml`),
the published top-1, the difference, which split selected the epoch on each side and whether the run
used the published settings follow. Failed jobs (`failed.json`) and jobs that never finished are listed
under the table, so none goes unnoticed. Runs probed by `gendd-probe` (`probe.json`) add one headline
column per probe (`report_probes.py`) and a small-multiple plot with the CE control marked.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gendd_framework.analysis import published
from gendd_framework.analysis.report_probes import (
    controls,
    headline_keys,
    is_probe,
    probed_counts,
    read_probe,
)
from gendd_framework.analysis.report_table import (
    PRIMARY,
    csv_text,
    label,
    markdown,
    plot_metrics_of,
    split_key,
)

__all__ = ["aggregate", "collect", "csv_text", "default_metrics", "final_stage", "main", "markdown", "render"]
SPLITS = ("val", "test", "test_last")
# the order of the per-output groups in the default table; acc comes with its last-epoch twin
DEFAULT_GROUPS = (("acc", "test_last"), ("agree", None), ("kl", None), ("ece", None))
# overrides that never define a group: replicates and cosmetics
IGNORED_KEYS = ("seed", "trainer.progress")
IGNORED_PREFIXES = ("hydra.", "hydra/")
JOB_MARKERS = ("summary.json", "failed.json", "config_resolved.yaml", ".hydra/overrides.yaml")


@dataclass
class Job:
    """One run directory: `finished` (summary.json), `failed` (failed.json) or `incomplete` (neither)."""

    run_dir: Path
    status: str
    overrides: list[str] | None
    error: dict[str, Any] | None = None


def natural_key(path: Path) -> list[Any]:
    """`sweep/10_x` after `sweep/2_x`: job numbers compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def read_overrides(run_dir: Path) -> list[str] | None:
    """The job's command-line overrides from Hydra's `.hydra/overrides.yaml`; None without one."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    values = yaml.safe_load(path.read_text()) or []
    return [str(v) for v in values]


def scan(root: str | Path) -> list[Job]:
    """Every job directory under `root` (a run, a sweep, a tree of sweeps), in natural path order."""
    dirs = {p.parents[marker.count("/")] for marker in JOB_MARKERS for p in Path(root).rglob(marker)}
    jobs = []
    for run_dir in sorted(dirs, key=natural_key):
        overrides = read_overrides(run_dir)
        summary, failed = run_dir / "summary.json", run_dir / "failed.json"
        if summary.is_file() and not (failed.is_file() and newer(failed, summary)):
            jobs.append(Job(run_dir, "finished", overrides))
        elif failed.is_file():
            jobs.append(Job(run_dir, "failed", overrides, read_failure(failed)))
        else:
            jobs.append(Job(run_dir, "incomplete", overrides))
    return jobs


def newer(a: Path, b: Path) -> bool:
    """A job re-run in its own dir (resume) leaves both files: the later outcome is the true one."""
    return a.stat().st_mtime > b.stat().st_mtime


def read_failure(path: Path) -> dict[str, Any]:
    """`failed.json`, or a stand-in when it is unreadable (a job killed while writing it)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"unreadable failed.json ({exc})", "stage": None, "step": None}
    return record if isinstance(record, dict) else {"error": str(record)}


def override_key(override: str) -> str:
    """`++method.temperature=2` -> `method.temperature`; `method/sampler=ddim` -> `method/sampler`."""
    return override.split("=", 1)[0].lstrip("+")


def ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def differing_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value is not the same in every job with overrides, first-seen order."""
    known = [dict((override_key(o), o) for o in job.overrides) for job in jobs if job.overrides is not None]
    order = dict.fromkeys(k for overrides in known for k in overrides if not ignored(k))
    return [k for k in order if len({o.get(k) for o in known}) > 1]


def override_label(overrides: list[str] | None, keys: list[str]) -> str:
    """The differing overrides of one job, e.g. `method.temperature=2`; empty when none differ."""
    if not overrides:
        return ""
    by_key = {override_key(o): o for o in overrides}
    return " ".join(by_key[k] for k in keys if k in by_key)


def primary_outputs(summary: dict[str, Any], row: dict[str, Any]) -> None:
    """Alias each trained stage's primary output as `<stage>/<split>/acc/primary` and record its name
    as `<stage>/primary`: the output of the stage's `select` metric (`acc/generative` -> generative),
    for runs from before `select` was recorded `student` when it was evaluated."""
    for stage, record in summary.items():
        if not isinstance(record, dict) or stage == "teacher" or not record.get("test"):
            continue
        select = record.get("select")
        output = select.split("/", 1)[1] if isinstance(select, str) and "/" in select else None
        if output is None and "acc/student" in record["test"]:
            output = "student"
        if output is None:
            continue
        row[f"{stage}/{PRIMARY}"] = output
        for split in ("test", "test_last"):
            value = (record.get(split) or {}).get(f"acc/{output}")
            if value is not None:
                row[f"{stage}/{split}/acc/{PRIMARY}"] = value


def collect(root: str | Path, jobs: list[Job] | None = None) -> list[dict[str, Any]]:
    """Every finished run under `root`, flattened to {name, seed, run_dir, group, overrides,
    <stage>/<split>/<metric>: value, <stage>/primary: output, match: published row or None}; `group`
    is the differing overrides, else the run name.

    Metric keys keep the summary's stage order, which `final_stage` relies on."""
    jobs = scan(root) if jobs is None else jobs
    keys = differing_keys(jobs)
    rows = []
    for job in jobs:
        if job.status != "finished":
            continue
        summary = json.loads((job.run_dir / "summary.json").read_text())
        name = summary.get("name") or summary.get("method")
        row: dict[str, Any] = {
            "name": name,
            "seed": summary.get("seed"),
            "run_dir": str(job.run_dir),
            "overrides": job.overrides,
            "group": override_label(job.overrides, keys) or name,
            "method": summary.get("method"),
        }
        for stage, record in summary.items():
            if isinstance(record, dict):
                for split in SPLITS:
                    for metric, value in (record.get(split) or {}).items():
                        row[f"{stage}/{split}/{metric}"] = value
        primary_outputs(summary, row)
        row.update(read_probe(job.run_dir))  # `probe:<probe>/<metric>`; none without probe.json
        row["match"] = published.for_run(job.run_dir, job.overrides, summary)
        rows.append(row)
    disambiguate(rows)
    return rows


def disambiguate(rows: list[dict[str, Any]]) -> None:
    """Two run names sharing a group label (same overrides, different configs) get the name in front."""
    names: dict[str, set[Any]] = defaultdict(set)
    for row in rows:
        names[row["group"]].add(row["name"])
    for row in rows:
        if len(names[row["group"]]) > 1:
            row["group"] = f"{row['name']} {row['group']}"


def problems(jobs: list[Job]) -> str:
    """Failed jobs with their error line and incomplete jobs, as lines under the table; empty if none."""
    keys = differing_keys(jobs)
    lines = []
    failed = [j for j in jobs if j.status == "failed"]
    if failed:
        lines.append(f"failed jobs ({len(failed)}):")
        for job in failed:
            error = job.error or {}
            where = ", ".join(f"{k} {error[k]}" for k in ("stage", "step") if error.get(k) is not None)
            label = override_label(job.overrides, keys)
            lines.append(
                f"- {job.run_dir}"
                + (f" ({label})" if label else "")
                + f": {error.get('error', '?')}"
                + (f" [{where}]" if where else "")
            )
    incomplete = [j for j in jobs if j.status == "incomplete"]
    if incomplete:
        lines.append(f"missing or incomplete jobs ({len(incomplete)}):")
        lines += [f"- {job.run_dir}" for job in incomplete]
    return "\n".join(lines)


def aggregate(rows: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """One entry per group (`collect`'s label, else the run name): {name, runs, <metric>: (mean, sample
    std)}; seeds are the replicates."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row.get("group") or row["name"]].append(row)
    table = []
    for name, members in groups.items():
        entry: dict[str, Any] = {"name": name, "runs": len(members)}
        for metric in metrics:
            values = [m[metric] for m in members if metric in m]
            if values:
                entry[metric] = (
                    statistics.mean(values),
                    statistics.stdev(values) if len(values) > 1 else 0.0,
                )
        table.append(entry)
    return table


def stages_of(row: dict[str, Any]) -> list[str]:
    """The stages with a test record, in summary order."""
    seen: dict[str, None] = {}
    for key in row:
        parsed = split_key(key)
        if parsed and parsed[1] == "test":
            seen.setdefault(parsed[0], None)
    return list(seen)


def final_stage(row: dict[str, Any]) -> str | None:
    """The last trained stage that reports test numbers: what the run produced (teacher excluded)."""
    stages = [s for s in stages_of(row) if s != "teacher"]
    return stages[-1] if stages else None


def outputs_of(rows: list[dict[str, Any]], stage: str) -> list[str]:
    """The named outputs (`student`, `generative`, ...) with test accuracy in `stage`, first seen first
    (the `primary` alias is not an output)."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            parsed = split_key(key)
            if parsed and parsed[0] == stage and parsed[1] == "test" and parsed[2] == "acc":
                seen.setdefault(parsed[3], None)
    seen.pop(PRIMARY, None)
    return list(seen)


def stage_metrics(rows: list[dict[str, Any]], stage: str) -> list[str]:
    """The primary output's acc (+ last-epoch acc), then acc of every other output (an output that is
    every run's primary is not repeated), then agree, KL and ECE of every output, when present."""
    present = {k for r in rows for k in r}
    finishing = [r for r in rows if final_stage(r) == stage] or rows
    always_primary = {
        o for o in outputs_of(rows, stage) if all(r.get(f"{stage}/{PRIMARY}") == o for r in finishing)
    }
    keys = [f"{stage}/{split}/acc/{PRIMARY}" for split in ("test", "test_last")]
    keys = [k for k in keys if k in present]
    for metric, twin in DEFAULT_GROUPS:
        for output in outputs_of(rows, stage):
            if metric == "acc" and keys and output in always_primary:
                continue
            for split in ("test", twin) if twin else ("test",):
                key = f"{stage}/{split}/{metric}/{output}"
                if key in present:
                    keys.append(key)
    return keys


def default_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The teacher's test accuracy, `stage_metrics` of each run's final stage (usually one), then the
    headline probe metrics when some run has a probe.json."""
    teacher = outputs_of(rows, "teacher")
    keys = [f"teacher/test/acc/{output}" for output in teacher]
    finals = dict.fromkeys(s for s in (final_stage(r) for r in rows) if s is not None)
    for stage in finals:
        keys += stage_metrics(rows, stage)
    return keys + headline_keys(rows)


def labels_for(rows: list[dict[str, Any]], metrics: list[str]) -> dict[str, str]:
    """Human-readable labels for `metrics`, given which stages the rows finish with."""
    finals = {s for s in (final_stage(r) for r in rows) if s is not None}
    return {key: label(key, finals) for key in metrics}


def first_column(rows: list[dict[str, Any]]) -> str:
    """`group` when rows are grouped by their overrides, `method` when by run name (older run dirs)."""
    return "group" if any(r.get("overrides") is not None for r in rows) else "method"


def annotate(table: list[dict[str, Any]], rows: list[dict[str, Any]], metrics: list[str]) -> None:
    """Text fields per group: the primary output's name and, when every run of the group matches the
    same published row, the published figure, our primary accuracy minus it, and the protocols."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row.get("group") or row["name"]].append(row)
    primary_acc = next((m for m in metrics if m.endswith(f"/test/acc/{PRIMARY}")), None)
    probed = probed_counts(rows)
    for entry in table:
        entry["probed"] = probed.get(entry["name"], 0)
        members = groups[entry["name"]]
        names = {r.get(f"{final_stage(r)}/{PRIMARY}") for r in members} - {None}
        entry["primary"] = "/".join(sorted(names)) or None
        matches = [r.get("match") for r in members]
        if matches and all(m is not None and m == matches[0] for m in matches):
            entry.update(matches[0])
            if primary_acc in entry:
                entry["delta"] = entry[primary_acc][0] - matches[0]["published"]


def text_columns(rows: list[dict[str, Any]], metrics: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(before, after) text columns: the primary output's name when a primary column is shown, the
    published comparison when some run has a published row, the probed-run count with probe columns."""
    before = ("primary",) if any(m.endswith(f"/{PRIMARY}") for m in metrics) else ()
    after = ("published", "delta", "selection", "recipe_status") if any(r.get("match") for r in rows) else ()
    return before, after + (("probed",) if any(is_probe(m) for m in metrics) else ())


def render(rows: list[dict[str, Any]], metrics: list[str], fmt: str = "markdown") -> str:
    """The aggregated table of `rows` over `metrics` as markdown or CSV, with readable labels."""
    table, labels, first = aggregate(rows, metrics), labels_for(rows, metrics), first_column(rows)
    annotate(table, rows, metrics)
    before, after = text_columns(rows, metrics)
    if fmt == "csv":
        return csv_text(table, metrics, labels, first, before, after)
    return markdown(table, metrics, labels, first, before, after) + "\n"


def main(argv: list[str] | None = None) -> None:
    """`gendd-report DIR [--metric KEY ...] [--format markdown|csv] [--out FILE] [--plot FILE]`: mean ±
    std per group of runs under DIR (grouped by the overrides that differ, seeds averaged); by default
    the teacher's accuracy, the primary output's accuracy (selected and last epoch), then every
    output's acc/agree/KL/ECE, and the published top-1 with the difference when the recipe has one
    (docs/recipes.md). Failed and unfinished jobs are listed under the table (on stderr with --format
    csv, to keep the CSV clean)."""
    parser = argparse.ArgumentParser(prog="gendd-report", description=main.__doc__)
    parser.add_argument("root", help="a run or multirun directory")
    parser.add_argument(
        "--metric",
        nargs="*",
        help="keys <stage>/<split>/<metric>/<output>, e.g. distill/test/acc/student or "
        "distill/test_last/ece/student (default: teacher acc + final stage acc, agree, KL, ECE)",
    )
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    parser.add_argument("--out", help="also write the table to this file (and the plot next to it)")
    parser.add_argument(
        "--plot",
        help="bar chart of the selected accuracy per group (default: <out>.png); with probe.json files "
        "also <plot>_probes.png, one panel per probe",
    )
    args = parser.parse_args(argv)
    jobs = scan(args.root)
    rows, notes = collect(args.root, jobs), problems(jobs)
    if not rows:
        if notes:
            print(notes, file=sys.stderr)
        raise SystemExit(f"gendd-report: no summary.json under {args.root}")
    metrics = args.metric or default_metrics(rows)
    missing = [m for m in metrics if not any(m in r for r in rows)]
    if missing:  # most likely a typo: say so rather than print a column of dashes silently
        print(f"gendd-report: no run has {missing}", file=sys.stderr)
    text = render(rows, metrics, args.format)
    if notes and args.format == "csv":
        print(notes, file=sys.stderr)
    elif notes:
        text += "\n" + notes + "\n"
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    plot = args.plot or (Path(args.out).with_suffix(".png") if args.out else None)
    if plot and args.out and Path(plot) == Path(args.out):  # `--out table.png`: keep the table
        plot = Path(args.out).with_name(Path(args.out).stem + "_plot.png")
    if plot:
        from gendd_framework.analysis.plots import plot_groups

        keys = plot_metrics_of(metrics)
        plot_groups(aggregate(rows, keys), keys, labels_for(rows, keys), Path(plot), first_column(rows))
        probes = headline_keys(rows)
        if probes:  # `<plot>_probes.png`: one panel per probe headline, the CE control hatched
            from gendd_framework.analysis.plots import plot_probes

            where = Path(plot).with_name(Path(plot).stem + "_probes.png")
            plot_probes(aggregate(rows, probes), probes, labels_for(rows, probes), where, controls(rows))
