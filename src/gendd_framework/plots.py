"""Training curves from `metrics.jsonl`: one PNG per run, because a curve beats a column of numbers."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(jsonl: Path, out_dir: Path) -> Path | None:
    """Train loss and validation accuracy per epoch, one colour per stage; returns the PNG path."""
    if not jsonl.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
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
