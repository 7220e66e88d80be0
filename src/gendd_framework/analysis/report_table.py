"""How `gendd-report` writes its table: column labels, markdown and CSV, the plotted columns.

Metric columns hold a (mean, std) per group; text columns (the primary output's name, the published
figure and its difference, the selection protocol, whether the recipe ran as published) are entry
fields rendered as they are, except the published figure and the difference, which are formatted here.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from gendd_framework.analysis.report_probes import is_probe, probe_decimals, probe_label

METRIC_LABELS = {"acc": "acc", "agree": "agree", "kl": "KL", "ece": "ECE", "ce": "CE"}
SPLIT_LABELS = {"test": "", "test_last": "last", "val": "val"}
PRIMARY = "primary"  # the pseudo-output that aliases each run's selected output
# text columns: entry field -> header
TEXT_HEADERS = {
    "primary": "primary output",
    "published": "published",
    "delta": "Δ vs published",
    "selection": "selection (ours / published)",
    "recipe_status": "recipe",
    "probed": "probed runs",  # the n behind the probe columns (runs with a probe.json)
}


def split_key(key: str) -> tuple[str, str, str, str] | None:
    """`distill/test/acc/student` -> (stage, split, metric, output); None for keys of another shape."""
    parts = key.split("/", 3)
    return (parts[0], parts[1], parts[2], parts[3]) if len(parts) == 4 else None


def label(key: str, final_stages: set[str]) -> str:
    """`distill/test_last/acc/student` -> `last acc student`, `distill/test/acc/primary` ->
    `acc (primary)`; the stage is named only when needed. Probe columns get their short label."""
    if is_probe(key):
        return probe_label(key)
    parsed = split_key(key)
    if parsed is None:
        return key
    stage, split, metric, output = parsed
    words = []
    if stage == "teacher" or len(final_stages) != 1 or stage not in final_stages:
        words.append(stage)
    words += [SPLIT_LABELS.get(split, split), METRIC_LABELS.get(metric, metric)]
    if output == PRIMARY:
        words.append("(primary)")
    elif not (stage == "teacher" and output in ("teacher", "student")):  # one output; older runs: `student`
        words.append(output)
    return " ".join(w for w in words if w)


def decimals(key: str) -> int:
    """KL and CE are small numbers in nats (3 decimals); percentages get 2; probes say their own."""
    if is_probe(key):
        return probe_decimals(key)
    parsed = split_key(key)
    return 3 if parsed and parsed[2] in ("kl", "ce") else 2


def text_cell(entry: dict[str, Any], field: str, fmt: str) -> Any:
    """A text column's cell: raw for CSV; the published figure `76.32 (DKD CVPR'22)` and a signed
    difference for markdown; `–` when the group has none."""
    value = entry.get(field)
    if fmt == "csv":
        return "" if value is None else value
    if value is None or value == "":
        return "–"
    if field == "delta":
        return f"{value:+.2f}"
    if field == "published":
        std = entry.get("published_std")
        figure = f"{value:.2f}" + (f" ± {std:.2f}" if std is not None else "")
        return f"{figure} ({entry['paper']})" if entry.get("paper") else figure
    return str(value).replace("|", "\\|")


def markdown(
    table: list[dict[str, Any]],
    metrics: list[str],
    labels: dict[str, str] | None = None,
    first: str = "method",
    before: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
) -> str:
    """A GitHub table of mean ± std per group; `before`/`after` name text columns placed around the
    metrics; `–` where a group lacks a value."""
    labels = labels or {}
    head = [first, "runs", *(TEXT_HEADERS[f] for f in before)]
    head += [labels.get(m, m) for m in metrics] + [TEXT_HEADERS[f] for f in after]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in table:
        cells = [str(entry["name"]).replace("|", "\\|"), str(entry["runs"])]
        cells += [text_cell(entry, f, "markdown") for f in before]
        for m in metrics:
            d = decimals(m)
            cells.append(f"{entry[m][0]:.{d}f} ± {entry[m][1]:.{d}f}" if m in entry else "–")
        cells += [text_cell(entry, f, "markdown") for f in after]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(
    table: list[dict[str, Any]],
    metrics: list[str],
    labels: dict[str, str] | None = None,
    first: str = "method",
    before: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
) -> str:
    """Mean and std in separate full-precision columns (for spreadsheets and plots); empty if absent."""
    labels = labels or {}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    head = [first, "runs", *(TEXT_HEADERS[f] for f in before)]
    for m in metrics:
        head += [labels.get(m, m), f"{labels.get(m, m)} std"]
    head += [TEXT_HEADERS[f] for f in after]
    writer.writerow(head)
    for entry in table:
        cells: list[Any] = [entry["name"], entry["runs"], *(text_cell(entry, f, "csv") for f in before)]
        for m in metrics:
            cells += list(entry[m]) if m in entry else ["", ""]
        cells += [text_cell(entry, f, "csv") for f in after]
        writer.writerow(cells)
    return buffer.getvalue()


def plot_metrics_of(metrics: list[str]) -> list[str]:
    """What the plot shows: the primary output's selected test accuracy when known, else the selected
    test accuracy of each trained output, else the first column."""
    keys = []
    for key in metrics:
        parsed = split_key(key)
        if parsed and parsed[0] != "teacher" and parsed[1] == "test" and parsed[2] == "acc":
            keys.append(key)
    primary = [k for k in keys if k.endswith(f"/{PRIMARY}")]
    return primary or keys or metrics[:1]
