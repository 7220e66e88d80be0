"""Training curves from `metrics.jsonl` (one PNG per run) and the per-group bar chart of gendd-report:
a picture shows a trend or an overlap of error bars faster than a column of numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    """matplotlib with the file-only Agg backend: reports and runs must work without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(jsonl: Path, out_dir: Path) -> Path | None:
    """Train loss and validation accuracy per epoch, one colour per stage; returns the PNG path."""
    if not jsonl.exists():
        return None
    plt = _pyplot()
    from gendd_framework.engine.loggers import read_jsonl

    rows = read_jsonl(jsonl)  # tolerates a half-written last line (a killed run)
    stages = list(dict.fromkeys(r["stage"] for r in rows if "stage" in r))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for stage in stages:
        train = [r for r in rows if r.get("stage") == stage and "train/loss" in r]
        if train:
            ax_loss.plot([r["epoch"] for r in train], [r["train/loss"] for r in train], label=stage)
        val = [r for r in rows if r.get("stage") == stage and any(k.startswith("val/acc/") for k in r)]
        for key in sorted({k for r in val for k in r if k.startswith("val/acc/")}):
            pts = [(r["epoch"], r[key]) for r in val if key in r]
            ax_acc.plot(*zip(*pts), marker=".", label=f"{stage} {key[8:]}")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="val accuracy (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_groups(
    table: list[dict[str, Any]], keys: list[str], labels: dict[str, str], path: Path, xlabel: str = "group"
) -> Path:
    """Bars of mean `keys` per group (`report.aggregate` entries) with ± std error bars; returns `path`.

    The y axis starts a little below the lowest bar: accuracy differences of a point matter here."""
    plt = _pyplot()
    names = [str(entry["name"]) for entry in table]
    width = 0.8 / max(len(keys), 1)
    bars_inches = 1.2 * max(len(keys), 1)
    needed = len(names) * max(bars_inches, 0.085 * max(map(len, names), default=0)) + 1.5
    rotate = needed > 16  # long override labels: widen up to a point, then slant them
    fig_width = min(16.0, max(4.0, len(names) * bars_inches + 1.5 if rotate else needed))
    fig, ax = plt.subplots(figsize=(fig_width, 4.2 + (1.5 if rotate else 0.0)))
    lows = []
    for i, key in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(names))]
        means = [entry[key][0] if key in entry else float("nan") for entry in table]
        stds = [entry[key][1] if key in entry else 0.0 for entry in table]
        bars = ax.bar(xs, means, width, yerr=stds, capsize=4, label=labels.get(key, key))
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        lows += [m - s for m, s in zip(means, stds) if m == m]
    if lows:
        ax.set_ylim(bottom=max(0.0, min(lows) - 5.0))
    ax.set_xticks(range(len(names)), names, rotation=25 if rotate else 0, ha="right" if rotate else "center")
    accuracy = all("/acc/" in key for key in keys)
    ax.set(xlabel=xlabel, ylabel="test accuracy (%)" if accuracy else labels.get(keys[0], keys[0]))
    what = labels.get(keys[0], keys[0]) if len(keys) == 1 else "per group"
    ax.set_title(f"{what}: mean ± std over runs")
    ax.grid(axis="y", alpha=0.3)
    if len(keys) > 1:
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_probes(
    table: list[dict[str, Any]],
    keys: list[str],
    labels: dict[str, str],
    path: Path,
    controls: dict[str, list[str]] | None = None,
    title: str = "Knowledge probes: mean ± std over runs",
) -> Path:
    """Small multiples: one panel per probe metric, a horizontal bar per group (mean ± std, `aggregate`
    entries, top to bottom in table order). A probe value means something only next to the CE student's
    (docs/probes.md), so each CE control group in `controls` (control -> the groups it controls) is
    hatched, with a dashed line at its mean across the groups it controls. Returns `path`."""
    plt = _pyplot()
    controls = controls or {}
    names = [str(entry["name"]) for entry in table]
    index = {name: i for i, name in enumerate(names)}
    height = 1.4 + 0.24 * len(names)
    size = (2.2 + 2.6 * len(keys), height)
    fig, axes = plt.subplots(1, len(keys), figsize=size, sharey=True, squeeze=False)
    for ax, key in zip(axes[0], keys):
        means = [entry[key][0] if key in entry else float("nan") for entry in table]
        stds = [entry[key][1] if key in entry else 0.0 for entry in table]
        colours = ["0.75" if name in controls else "tab:blue" for name in names]
        bars = ax.barh(range(len(names)), means, 0.7, xerr=stds, capsize=2, color=colours, edgecolor="0.2")
        for name, bar in zip(names, bars):
            if name in controls:
                bar.set_hatch("//")
        ax.bar_label(bars, labels=[f"{m:.3g}" if m == m else "" for m in means], fontsize=6, padding=3)
        for control, members in controls.items():
            entry = table[index[control]]
            rows = [index[m] for m in members if m in index]
            if key in entry and rows:
                low, high = min(rows) - 0.45, max(rows) + 0.45
                ax.vlines(entry[key][0], low, high, colors="k", linestyles="--", lw=1)
        finite = [m + s for m, s in zip(means, stds) if m == m]
        ax.set_xlim(0, 1.18 * max(finite) if finite and max(finite) > 0 else 1)
        ax.set_title(labels.get(key, key), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(names)), names)
    axes[0][0].invert_yaxis()
    note = "hatched: CE control (student without teacher), dashed: its mean" if controls else ""
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
