"""Run the configured probes on one teacher/student pair and write `probe.json` and the pictures.

Every probe is timed; one that cannot run on these models records a one-line reason under `skipped`
and the others still run (the `probe` stage follows training: a probe must never cost the run).
`probe.json` holds `metrics` (flat `<probe>/<metric>` scalars, NaN written as null), `settings`
(every setting with its default, step size resolved), `skipped`, `seconds` (wall) and `cpu_seconds`
(this process's CPU time, all threads) per probe, `details` and `plots`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from gendd_framework.analysis.probes import pictures
from gendd_framework.analysis.probes.adversarial import probe_adversarial, resolved_step
from gendd_framework.analysis.probes.calibration import probe_calibration
from gendd_framework.analysis.probes.common import ProbeData, ProbeResult, probe_data
from gendd_framework.analysis.probes.corruption import probe_corruption
from gendd_framework.analysis.probes.invariance import probe_invariance
from gendd_framework.analysis.probes.localization import probe_localization
from gendd_framework.analysis.probes.settings import ProbeSettings, as_dict

LOG = logging.getLogger("gendd_framework")
PROBE_FILE = "probe.json"


def probe_images(
    dataset: Dataset, images: int, seed: int, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a split's (input, target) pairs, or a seeded random subset of `images` in split order."""
    from gendd_framework.data.base import BatchDataset

    wrapped: Dataset = BatchDataset(dataset)
    if len(wrapped) > images:
        chosen = torch.randperm(len(wrapped), generator=torch.Generator().manual_seed(seed))[:images]
        wrapped = Subset(wrapped, chosen.sort().values.tolist())
    xs, ys = [], []
    for batch in DataLoader(wrapped, batch_size=batch_size, shuffle=False):
        xs.append(batch["input"]), ys.append(batch["target"])
    return torch.cat(xs), torch.cat(ys)


def _probe_calls(
    teacher: nn.Module, student: nn.Module, data: ProbeData, s: ProbeSettings, control: nn.Module | None
) -> dict[str, Callable[[], ProbeResult]]:
    return {
        "localization": lambda: probe_localization(teacher, student, data, s.localization, control),
        "adversarial": lambda: probe_adversarial(teacher, student, data, s.adversarial),
        "invariance": lambda: probe_invariance(teacher, student, data, s.invariance),
        "corruption": lambda: probe_corruption(teacher, student, data, s.corruption, s.seed),
        "calibration": lambda: probe_calibration(data, s.calibration),
    }


def _draw(name: str, result: ProbeResult, plots_dir: Path, s: ProbeSettings) -> list[str]:
    if name == "localization":
        return [str(pictures.cam_png(result.arrays, plots_dir / "probe_cam.png", s.localization.target))]
    if name == "calibration":
        return [
            str(pictures.reliability_png(result.details, plots_dir / "probe_reliability.png")),
            str(pictures.agreement_png(result.arrays["agreement_matrix"], plots_dir / "probe_agreement.png")),
        ]
    return []


def one_line(exc: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


def run_probes(
    teacher: nn.Module,
    student: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    settings: ProbeSettings,
    *,
    control: nn.Module | None = None,
    plots_dir: Path | None = None,
) -> dict[str, Any]:
    """Every configured probe on (teacher, student); the dict written as probe.json."""
    started, cpu_started = time.perf_counter(), time.process_time()
    data = probe_data(teacher, student, inputs, targets, settings.batch_size)
    seconds: dict[str, float] = {"clean_predictions": round(time.perf_counter() - started, 3)}
    cpu_seconds: dict[str, float] = {"clean_predictions": round(time.process_time() - cpu_started, 3)}
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    plots: list[str] = []
    calls = _probe_calls(teacher, student, data, settings, control)
    for name in settings.probes:
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            result = calls[name]()
            if plots_dir is not None:
                plots += _draw(name, result, plots_dir, settings)
        except Exception as exc:  # noqa: BLE001 - recorded as the probe's one-line reason
            skipped[name] = one_line(exc)
            LOG.warning("probe %s skipped: %s", name, skipped[name], exc_info=not isinstance(exc, ValueError))
        else:
            metrics.update(result.metrics)
            details[name] = result.details
        seconds[name] = round(time.perf_counter() - start, 3)
        cpu_seconds[name] = round(time.process_time() - cpu_start, 3)
    seconds["total"] = round(time.perf_counter() - started, 3)
    cpu_seconds["total"] = round(time.process_time() - cpu_started, 3)
    recorded = dataclasses.replace(
        settings,
        adversarial=dataclasses.replace(settings.adversarial, step_size=resolved_step(settings.adversarial)),
    )
    return {
        "images": len(inputs),
        "metrics": metrics,
        "skipped": skipped,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # this process's CPU time: comparable on a shared machine
        "settings": as_dict(recorded),
        "details": details,
        "plots": plots,
    }


def jsonable(value: Any) -> Any:
    """NaN/inf -> null (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_report(run_dir: Path, report: dict[str, Any]) -> Path:
    path = Path(run_dir) / PROBE_FILE
    path.write_text(json.dumps(jsonable(report), indent=2, allow_nan=False))
    return path
