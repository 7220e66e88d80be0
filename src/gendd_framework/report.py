"""Aggregate `summary.json` files (a multirun, a benchmark) into a mean ± std table per method."""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def collect(root: str | Path) -> list[dict[str, Any]]:
    """Every summary under `root`, flattened to {name, seed, <stage>/<split>/<metric>: value}."""
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
                for split in ("val", "test"):
                    for metric, value in (record.get(split) or {}).items():
                        row[f"{stage}/{split}/{metric}"] = value
        rows.append(row)
    return rows


def aggregate(rows: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
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


def markdown(table: list[dict[str, Any]], metrics: list[str], labels: dict[str, str] | None = None) -> str:
    labels = labels or {}
    head = ["method", "runs"] + [labels.get(m, m) for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in table:
        cells = [entry["name"], str(entry["runs"])]
        for m in metrics:
            cells.append(f"{entry[m][0]:.2f} ± {entry[m][1]:.2f}" if m in entry else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_metrics(rows: list[dict[str, Any]]) -> list[str]:
    keys = {k for r in rows for k in r if "/test/acc/" in k}
    return sorted(keys, key=lambda k: (not k.startswith("teacher"), k))


def main(argv: list[str] | None = None) -> None:
    """`gendd-report DIR [--metric KEY ...]`: mean ± std test accuracy per run name under DIR."""
    parser = argparse.ArgumentParser(prog="gendd-report", description=main.__doc__)
    parser.add_argument("root", help="a run or multirun directory")
    parser.add_argument(
        "--metric", nargs="*", help="keys such as distill/test/acc/student (default: all test acc)"
    )
    args = parser.parse_args(argv)
    rows = collect(args.root)
    if not rows:
        raise SystemExit(f"gendd-report: no summary.json under {args.root}")
    metrics = args.metric or default_metrics(rows)
    print(markdown(aggregate(rows, metrics), metrics))
