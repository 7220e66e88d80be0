"""`gendd-probe RUN_DIR [RUN_DIR ...] [KEY=VALUE ...]`: knowledge probes on finished runs.

Each run's teacher and deployed predictor are rebuilt from its config and best-on-val checkpoint; the
probes run on the test split and write `probe.json` beside `summary.json` and `plots/probe_*.png`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gendd_framework.errors import ConfigError

RUN_KEYS = ("control", "stage", "split", "device", "plots")
USAGE = """usage: gendd-probe RUN_DIR [RUN_DIR ...] [control=RUN_DIR] [stage=distill] [split=test|val]
                   [device=auto|cpu|cuda:N] [plots=true|false] [SETTING=VALUE ...]

Probes what each run's student took from its teacher (localization, adversarial, invariance,
corruption, calibration) and writes probe.json (+ plots/probe_*.png) into each run directory.
control=RUN adds the localization win rate against RUN's student (e.g. the CE run of the same preset).
Settings (defaults recorded in probe.json), e.g. adversarial.eps=0.5 adversarial.steps=10
localization.topk=0.1 'invariance.shift=[1,2]' 'corruption.noise=[0.5]' images=500 seed=1
'probes=[adversarial,calibration]'. See docs/probes.md."""


def parse_args(argv: list[str]) -> tuple[list[str], dict[str, str], list[str]]:
    """(run dirs, run options, settings overrides); an existing directory is a run dir even if its
    name holds `=` (sweep job folders)."""
    runs: list[str] = []
    options = {"stage": "distill", "split": "test", "device": "auto", "plots": "true"}
    settings: list[str] = []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        key, eq, value = arg.partition("=")
        if Path(arg).is_dir() or not eq:
            if arg.startswith("-"):
                raise ConfigError(f"unknown option '{arg}' (see gendd-probe --help)")
            runs.append(arg)
        elif key in RUN_KEYS:
            options[key] = value
        else:
            settings.append(arg)
    if not runs:
        raise ConfigError("no run directory given (see gendd-probe --help)")
    if options["plots"].lower() not in ("true", "false"):
        raise ConfigError(f"plots={options['plots']}: expected true or false")
    return runs, options, settings


def probe_run(run_dir: str, options: dict[str, str], settings, control=None) -> dict[str, Any]:
    from gendd_framework.analysis.probes.loading import load_subject, same_teacher
    from gendd_framework.analysis.probes.runner import probe_images, run_probes, write_report

    subject = load_subject(run_dir, options["stage"], options["split"], options["device"])
    inputs, targets = probe_images(subject.dataset, settings.images, settings.seed, settings.batch_size)
    control_model = None
    if control is not None:
        if not same_teacher(subject.teacher, control.teacher):
            raise ConfigError(f"control run {control.run_dir} has another teacher than {subject.run_dir}")
        c_inputs, _ = probe_images(control.dataset, settings.images, settings.seed, settings.batch_size)
        if c_inputs.shape != inputs.shape or not bool((c_inputs == inputs).all()):
            raise ConfigError(f"control run {control.run_dir} probes other images than {subject.run_dir}")
        control_model = control.student.to(subject.device)
    plots_dir = subject.run_dir / "plots" if options["plots"].lower() == "true" else None
    report = run_probes(
        subject.teacher,
        subject.student,
        inputs,
        targets,
        settings,
        control=control_model,
        plots_dir=plots_dir,
    )
    extra = {"control": str(control.run_dir)} if control is not None else {}
    report = {"run_dir": str(subject.run_dir), **subject.describe, **extra, **report}
    path = write_report(subject.run_dir, report)
    return {
        "run_dir": str(subject.run_dir),
        "file": str(path),
        **{k: report[k] for k in ("images", "seconds", "cpu_seconds", "skipped", "metrics")},
    }


def run_cli(argv: list[str]) -> list[dict[str, Any]]:
    """Parse, then probe every run: the CLI without its error handling."""
    runs, options, overrides = parse_args(argv)  # torch-backed modules load after `--help` answered
    from gendd_framework.analysis.probes.loading import load_subject
    from gendd_framework.analysis.probes.runner import jsonable
    from gendd_framework.analysis.probes.settings import parse_settings

    settings = parse_settings(overrides)
    control = None
    if options.get("control"):
        control = load_subject(options["control"], options["stage"], options["split"], options["device"])
    return [jsonable(probe_run(run, options, settings, control)) for run in runs]


def main(argv: list[str] | None = None) -> None:
    from gendd_framework.cli.json_command import json_command

    json_command("gendd-probe", run_cli, argv)


if __name__ == "__main__":
    main()
