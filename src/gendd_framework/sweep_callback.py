"""The Hydra callback of every `gendd-train -m` sweep (`hydra.callbacks.sweep_report` in conf/train.yaml).

A module of its own so that composing the configs, which names this class, does not import the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

# the failed jobs of this process's sweeps: `gendd-train -m` exits non-zero when any job failed
SWEEP_FAILURES: list[str] = []


def sweep_report(sweep_dir: Path) -> dict[str, Any]:
    """Finished, failed and missing jobs of the sweep folder: every job folder (`.hydra/` inside) counts
    once, so a sweep re-launched into the same folder (skipping finished jobs, resuming the others)
    reports each job once with its latest outcome. A job is finished when it has a `summary.json`
    and no `failed.json`; missing when it has neither (killed, or still running elsewhere)."""
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()) if sweep_dir.is_dir() else []
    failed = {p.name: read_error(p / "failed.json") for p in jobs if (p / "failed.json").exists()}
    finished = [p.name for p in jobs if (p / "summary.json").exists() and p.name not in failed]
    missing = [p.name for p in jobs if p.name not in failed and p.name not in finished]
    return {"jobs": len(jobs), "finished": finished, "failed": failed, "missing": missing}


def read_error(path: Path) -> str:
    """The first line of a `failed.json`, or what made it unreadable (a job killed while writing it)."""
    try:
        return str(json.loads(path.read_text())["error"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable failed.json ({exc})"


class SweepReport(Callback):
    """Before a multirun, check its launcher/sweeper (Hydra reports a failed check as a warning:
    `launchers.precheck` already stopped command lines it could compose); after it, write
    `<sweep dir>/sweep_summary.json` and record failed jobs for the exit code."""

    def on_multirun_start(self, config, **kwargs) -> None:  # noqa: ANN001, ANN003
        from gendd_framework.launchers import check_multirun

        check_multirun(config)

    def on_multirun_end(self, config, **kwargs) -> None:  # noqa: ANN001, ANN003
        sweep_dir = Path(config.hydra.sweep.dir)
        report = sweep_report(sweep_dir)
        if sweep_dir.is_dir():
            (sweep_dir / "sweep_summary.json").write_text(json.dumps(report, indent=2))
        finished, failed, missing = report["finished"], report["failed"], report["missing"]
        print(f"sweep {sweep_dir}: {len(finished)} finished, {len(failed)} failed, {len(missing)} missing")
        for name, error in failed.items():
            print(f"  failed {name}: {error}")
        SWEEP_FAILURES.extend(failed)
