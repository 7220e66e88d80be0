"""Probe pictures under the run's `plots/`: reliability diagrams, the teacher-vs-student class
agreement matrix and a few Grad-CAM maps side by side (a map or a gap shows at a glance what a mean hides)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gendd_framework.analysis.plots import _pyplot


def reliability_png(details: dict[str, Any], path: Path) -> Path:
    """Accuracy per confidence bin against the diagonal, teacher and student side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 4), sharey=True)
    for ax, who in zip(axes, ("teacher", "student")):
        rel = details[f"reliability_{who}"]
        n = len(rel["count"])
        edges = [i / n for i in range(n)]
        acc, conf = _bars(rel["accuracy"]), _bars(rel["confidence"])
        ax.bar(edges, acc, width=1 / n, align="edge", edgecolor="k", alpha=0.75, label="accuracy")
        low = [min(a, c) for a, c in zip(acc, conf)]
        gap = [abs(c - a) for a, c in zip(acc, conf)]
        ax.bar(edges, gap, bottom=low, width=1 / n, align="edge", color="tab:red", alpha=0.3,
               edgecolor="tab:red", hatch="//", label="gap to mean confidence")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{who}: ECE {rel['ece']:.2f}%")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="upper left")
    return _save(fig, plt, path)


def agreement_png(matrix: torch.Tensor, path: Path) -> Path:
    """Row-normalised (teacher class -> student class) shares; the diagonal is per-class agreement."""
    plt = _pyplot()
    counts = matrix.double()
    shares = counts / counts.sum(1, keepdim=True).clamp_min(1)
    k = len(matrix)
    size = min(12.0, 3.0 + 0.35 * k)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(shares.numpy(), vmin=0, vmax=1, cmap="viridis")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j] > 0:
                    colour = "k" if shares[i, j] > 0.5 else "w"
                    ax.text(
                        j, i, f"{100 * shares[i, j]:.0f}", ha="center", va="center", fontsize=7, color=colour
                    )
    ax.set(xlabel="student class", ylabel="teacher class", title="student class given teacher class (%)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, plt, path)


def cam_png(arrays: dict[str, torch.Tensor], path: Path, target: str = "teacher") -> Path:
    """Rows: input, teacher Grad-CAM, student Grad-CAM, for the first few probed images."""
    plt = _pyplot()
    inputs = arrays["inputs"]
    n = len(inputs)
    fig, axes = plt.subplots(3, n, figsize=(1.4 * n + 0.8, 4.6), squeeze=False)
    rows = [("input", inputs.mean(1)), ("teacher", arrays["cam_teacher"]), ("student", arrays["cam_student"])]
    for r, (label, maps) in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            ax.imshow(maps[i].numpy(), cmap="gray" if r == 0 else "inferno")
            ax.set_xticks([]), ax.set_yticks([])
        axes[r][0].set_ylabel(label)
    fig.suptitle("Grad-CAM for the " + ("teacher's predicted class" if target == "teacher" else "true class"))
    return _save(fig, plt, path)


def _bars(values: list) -> list[float]:
    """Empty bins (NaN, or null when read back from probe.json) draw nothing."""
    return [v if isinstance(v, float) and v == v else 0.0 for v in values]


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
