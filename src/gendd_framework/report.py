"""Aggregate `summary.json` files (a multirun, a benchmark) into a mean ± std table per run name.

The default table answers "how good is the distilled student, and what did it inherit?": for the final
training stage, the test accuracy of every output (best-on-val weights, then the last epoch's), its
agreement with and KL to the teacher, and its calibration, next to the teacher's own accuracy.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

SPLITS = ("val", "test", "test_last")
# the order of the per-output groups in the default table; acc comes with its last-epoch twin
DEFAULT_GROUPS = (("acc", "test_last"), ("agree", None), ("kl", None), ("ece", None))
METRIC_LABELS = {"acc": "acc", "agree": "agree", "kl": "KL", "ece": "ECE", "ce": "CE"}
SPLIT_LABELS = {"test": "", "test_last": "last", "val": "val"}


def collect(root: str | Path) -> list[dict[str, Any]]:
    """Every summary under `root`, flattened to {name, seed, run_dir, <stage>/<split>/<metric>: value}.

    Keys keep the summary's stage order, which `final_stage` relies on."""
    rows = []
    for path in sorted(Path(root).rglob("summary.json")):
        summary = json.loads(path.read_text())
        row: dict[str, Any] = {
            "name": summary.get("name") or summary.get("method"),
            "seed": summary.get("seed"),
            "run_dir": str(path.parent),
        }
        for stage, record in summary.items():
            if isinstance(record, dict):
                for split in SPLITS:
                    for metric, value in (record.get(split) or {}).items():
                        row[f"{stage}/{split}/{metric}"] = value
        rows.append(row)
    return rows


def aggregate(rows: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """One entry per run name: {name, runs, <metric>: (mean, sample std)}; seeds are the replicates."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row["name"]].append(row)
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


def split_key(key: str) -> tuple[str, str, str, str] | None:
    """`distill/test/acc/student` -> (stage, split, metric, output); None for keys of another shape."""
    parts = key.split("/", 3)
    return (parts[0], parts[1], parts[2], parts[3]) if len(parts) == 4 else None


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
    """The named outputs (`student`, `generative`, ...) with test accuracy in `stage`, first seen first."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            parsed = split_key(key)
            if parsed and parsed[0] == stage and parsed[1] == "test" and parsed[2] == "acc":
                seen.setdefault(parsed[3], None)
    return list(seen)


def stage_metrics(rows: list[dict[str, Any]], stage: str) -> list[str]:
    """acc (+ last-epoch acc) of every output, then agree, KL and ECE of every output, when present."""
    present = {k for r in rows for k in r}
    keys = []
    for metric, twin in DEFAULT_GROUPS:
        for output in outputs_of(rows, stage):
            for split in ("test", twin) if twin else ("test",):
                key = f"{stage}/{split}/{metric}/{output}"
                if key in present:
                    keys.append(key)
    return keys


def default_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The teacher's test accuracy, then `stage_metrics` of each run's final stage (usually one)."""
    teacher = outputs_of(rows, "teacher")
    keys = [f"teacher/test/acc/{output}" for output in teacher]
    finals = dict.fromkeys(s for s in (final_stage(r) for r in rows) if s is not None)
    for stage in finals:
        keys += stage_metrics(rows, stage)
    return keys


def label(key: str, final_stages: set[str]) -> str:
    """`distill/test_last/acc/student` -> `last acc student`; the stage is named only when needed."""
    parsed = split_key(key)
    if parsed is None:
        return key
    stage, split, metric, output = parsed
    words = []
    if stage == "teacher" or len(final_stages) != 1 or stage not in final_stages:
        words.append(stage)
    words += [SPLIT_LABELS.get(split, split), METRIC_LABELS.get(metric, metric)]
    if not (stage == "teacher" and output == "student"):  # a CE teacher has one output
        words.append(output)
    return " ".join(w for w in words if w)


def labels_for(rows: list[dict[str, Any]], metrics: list[str]) -> dict[str, str]:
    """Human-readable labels for `metrics`, given which stages the rows finish with."""
    finals = {s for s in (final_stage(r) for r in rows) if s is not None}
    return {key: label(key, finals) for key in metrics}


def decimals(key: str) -> int:
    """KL and CE are small numbers in nats (3 decimals); percentages get 2."""
    parsed = split_key(key)
    return 3 if parsed and parsed[2] in ("kl", "ce") else 2


def markdown(table: list[dict[str, Any]], metrics: list[str], labels: dict[str, str] | None = None) -> str:
    """A GitHub table of mean ± std per run name; `–` where a name lacks a metric."""
    labels = labels or {}
    head = ["method", "runs"] + [labels.get(m, m) for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in table:
        cells = [str(entry["name"]), str(entry["runs"])]
        for m in metrics:
            d = decimals(m)
            cells.append(f"{entry[m][0]:.{d}f} ± {entry[m][1]:.{d}f}" if m in entry else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(table: list[dict[str, Any]], metrics: list[str], labels: dict[str, str] | None = None) -> str:
    """Mean and std in separate full-precision columns (for spreadsheets and plots); empty if absent."""
    labels = labels or {}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    head = ["method", "runs"]
    for m in metrics:
        head += [labels.get(m, m), f"{labels.get(m, m)} std"]
    writer.writerow(head)
    for entry in table:
        cells: list[Any] = [entry["name"], entry["runs"]]
        for m in metrics:
            cells += list(entry[m]) if m in entry else ["", ""]
        writer.writerow(cells)
    return buffer.getvalue()


def render(rows: list[dict[str, Any]], metrics: list[str], fmt: str = "markdown") -> str:
    """The aggregated table of `rows` over `metrics` as markdown or CSV, with readable labels."""
    table, labels = aggregate(rows, metrics), labels_for(rows, metrics)
    if fmt == "csv":
        return csv_text(table, metrics, labels)
    return markdown(table, metrics, labels) + "\n"


def main(argv: list[str] | None = None) -> None:
    """`gendd-report DIR [--metric KEY ...] [--format markdown|csv] [--out FILE]`: mean ± std per run
    name under DIR; by default the teacher's accuracy and the final stage's acc/agree/KL/ECE."""
    parser = argparse.ArgumentParser(prog="gendd-report", description=main.__doc__)
    parser.add_argument("root", help="a run or multirun directory")
    parser.add_argument(
        "--metric",
        nargs="*",
        help="keys <stage>/<split>/<metric>/<output>, e.g. distill/test/acc/student or "
        "distill/test_last/ece/student (default: teacher acc + final stage acc, agree, KL, ECE)",
    )
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    rows = collect(args.root)
    if not rows:
        raise SystemExit(f"gendd-report: no summary.json under {args.root}")
    metrics = args.metric or default_metrics(rows)
    missing = [m for m in metrics if not any(m in r for r in rows)]
    if missing:  # most likely a typo: say so rather than print a column of dashes silently
        print(f"gendd-report: no run has {missing}", file=sys.stderr)
    text = render(rows, metrics, args.format)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
