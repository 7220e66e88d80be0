"""Shared helpers for the benchmark scripts: paths, environment, tables, JSON and timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Scratch space for run directories and checkpoints (git-ignored: never committed).
SCRATCH = ROOT / ".cache" / "gendd" / "benchmarks"
CACHE_DIR = ROOT / ".cache" / "gendd"
BIN = ROOT / ".venv" / "bin"


def results_dir(quick: bool, override: str | None = None) -> Path:
    """Where tables/plots/JSON go: benchmarks/results/, or a scratch folder in --quick mode."""
    path = Path(override) if override else (SCRATCH / "quick_results" if quick else RESULTS)
    path.mkdir(parents=True, exist_ok=True)
    return path


def train_env() -> dict[str, str]:
    """Environment for `gendd-train` subprocesses: cached teacher, one BLAS thread (shared machine)."""
    env = dict(os.environ)
    env.update(GENDD_CACHE_DIR=str(CACHE_DIR), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_ms(values: Sequence[float] | None, digits: int = 2) -> str:
    """'m ± s' or '–' when there are no values."""
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Enough context to interpret timings."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_outputs(out: Path, stem: str, markdown: str, data: dict[str, Any]) -> None:
    """Write <stem>.md and <stem>.json, and print the markdown."""
    (out / f"{stem}.md").write_text(markdown.rstrip() + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    print(markdown)
    print(f"\nwrote {out / (stem + '.md')} and {out / (stem + '.json')}")


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
