"""The `probe` stage: knowledge probes on the run being trained, after its training stage.

    stages: [teacher, distill, probe]
    stages: [teacher, distill, {name: probe, adversarial: {eps: 0.5}, images: 500}]

It probes the last trained method's deployed predictor (best-on-val weights, as the test numbers)
against the run's teacher, writes `probe.json` and `plots/probe_*.png` into the run directory and
returns the metrics (they also land in summary.json under the stage's name).
"""

from __future__ import annotations

import logging
from typing import Any

from gendd_framework.analysis.probes.loading import predictor
from gendd_framework.analysis.probes.runner import (
    PROBE_FILE,
    jsonable,
    probe_images,
    run_probes,
    write_report,
)
from gendd_framework.analysis.probes.settings import parse_settings
from gendd_framework.engine import distributed
from gendd_framework.errors import ConfigError
from gendd_framework.registry import STAGES
from gendd_framework.runtime import RunContext
from gendd_framework.stages.hooks import stage_hooks

LOG = logging.getLogger("gendd_framework")


SETTING_KEYS = (
    "probes", "images", "batch_size", "seed", "localization", "adversarial", "invariance", "corruption",
    "calibration",
)  # fmt: skip
NEEDS = (
    "probes a trained student against its teacher: list it after `teacher` and a training stage, "
    "e.g. stages=[teacher,distill,probe]"
)


def stage_settings(stage_name: str, split: str, given: dict[str, Any]) -> Any:
    """The probe settings (unset ones keep their defaults), checked: one-line errors naming the key."""
    settings = parse_settings(
        {k: v for k, v in given.items() if k in SETTING_KEYS and v is not None}, where=f"stage '{stage_name}'"
    )
    if split not in ("val", "test"):
        raise ConfigError(f"stage '{stage_name}': split={split!r}, expected 'val' or 'test'")
    return settings


def check_probe(check: Any, split: str = "test", stage_name: str = "probe", **given: Any) -> None:
    """Preflight: the settings parse, and a teacher and a trained method come before the stage."""
    stage_settings(stage_name, split, given)
    if "teacher" not in check.models or "method" not in check.models:
        raise ConfigError(f"stage '{stage_name}' {NEEDS}")


@STAGES.register("probe")
@stage_hooks(preflight=check_probe)
def probe_stage(
    ctx: RunContext,
    probes: list[str] | None = None,
    images: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    localization: dict | None = None,
    adversarial: dict | None = None,
    invariance: dict | None = None,
    corruption: dict | None = None,
    calibration: dict | None = None,
    split: str = "test",
    stage_name: str = "probe",
) -> dict[str, Any]:
    """What got distilled, probed on `split` (settings as in `gendd-probe`; unset ones keep defaults)."""
    given = dict(
        probes=probes, images=images, batch_size=batch_size, seed=seed, localization=localization,
        adversarial=adversarial, invariance=invariance, corruption=corruption, calibration=calibration,
    )  # fmt: skip
    settings = stage_settings(stage_name, split, given)
    teacher, method = ctx.models.get("teacher"), ctx.models.get("method")
    if teacher is None or method is None:
        raise ConfigError(f"stage '{stage_name}' {NEEDS}")
    if not distributed.is_main_process():
        return {}  # one rank probes and writes; the others have nothing to add
    student, how = predictor(method)
    inputs, targets = probe_images(
        getattr(ctx.data, split), settings.images, settings.seed, settings.batch_size
    )
    report = run_probes(teacher, student, inputs, targets, settings, plots_dir=ctx.run_dir / "plots")
    trained = [k for k, r in ctx.results.items() if isinstance(r, dict) and "test" in r and k != "teacher"]
    report = {
        "run_dir": str(ctx.run_dir),
        "stage": trained[-1] if trained else None,  # the stage whose method is probed
        "split": split,
        "predictor": how,
        "teacher": "teacher stage",
        **report,
    }
    path = write_report(ctx.run_dir, report)
    skipped = "; ".join(f"{k} skipped: {v}" for k, v in report["skipped"].items())
    LOG.info("%s: %d images, %.1f s -> %s%s", stage_name, report["images"], report["seconds"]["total"], path,
             f" ({skipped})" if skipped else "")  # fmt: skip
    return jsonable(
        {key: report[key] for key in ("metrics", "skipped", "seconds", "cpu_seconds")} | {"file": PROBE_FILE}
    )
