"""`gendd-train`: the Hydra app that composes a config, runs its stages and records failures."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything can import timm
# Our launcher presets (conf/hydra/launcher/) share their names with the plugins' own configs, which
# Hydra 1.3 then uses as a schema (validating our values) with a deprecation notice the user cannot
# act on. Set at import, so it also holds in the processes a launcher (submitit, joblib) starts.
warnings.filterwarnings(
    "ignore",
    message=r"\s*'hydra/launcher/[^']+' is validated against ConfigStore schema",
    category=UserWarning,
)


def config_dir() -> Path:
    """The project's top-level `conf/` (editable install) or the packaged copy."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parents[1] / "conf", package / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError("gendd-framework configs not found (expected conf/train.yaml)")


EXIT_ERROR, EXIT_CONFIG, EXIT_NON_FINITE, EXIT_SWEEP_FAILURES = 1, 2, 3, 1
_job_started = False  # Hydra composed the config: every override on the command line was valid


def torchrun_argv(argv: list[str], env: dict[str, str]) -> list[str]:
    """Command line for this process under torchrun: ranks other than 0 get Hydra overrides so they
    write nothing (no `.hydra/`, no log file, no run dir of their own: their `${now:}` could differ by
    a second); rank 0's run dir and config reach them by broadcast (engine/distributed.py)."""
    if not ("RANK" in env and ("TORCHELASTIC_RUN_ID" in env or "LOCAL_RANK" in env)):
        return argv  # not started by torchrun
    if any(a in ("-m", "--multirun") for a in argv):
        print(
            "gendd-train: error: -m/--multirun under torchrun would run the whole sweep in every rank; "
            "launch one torchrun per job, or sweep with hydra/launcher=submitit_slurm (one job = N ranks)",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_CONFIG)
    if env["RANK"] == "0":
        return argv
    return [*argv, "hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def train_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
    def _train(cfg: DictConfig) -> float | None:
        global _job_started
        _job_started = True
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        overrides = list(hydra_cfg.overrides.task)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # a requeuing launcher's jobs resume themselves
            launcher = str(hydra_cfg.launcher.get("_target_", ""))
            cfg.trainer.resume = job_resume(launcher, overrides, cfg.trainer.get("resume", False))
        try:
            summary = run_job(cfg, run_dir, overrides)
        except Exception as exc:  # noqa: BLE001  (recorded, then reported by exit code or sweep summary)
            code = record_failure(run_dir, exc)
            if hydra_cfg.mode == RunMode.MULTIRUN:  # one failing job does not end the sweep
                return None
            if code is None:
                raise
            raise SystemExit(code) from None
        if is_main_process():
            print(format_summary(summary))
        return summary.get("objective")  # the validation metric: what a sweeper such as Optuna optimises

    sys.argv = [sys.argv[0], *torchrun_argv(sys.argv[1:], dict(os.environ))]
    from gendd_framework.errors import ConfigError
    from gendd_framework.launchers import job_resume, precheck
    from gendd_framework.sweep_callback import SWEEP_FAILURES

    try:  # a sweep whose launcher/sweeper cannot run stops here, before its first job
        precheck(sys.argv[1:], str(config_dir()), search_dirs(sys.argv[1:])[1:])
    except ConfigError as exc:
        print(f"gendd-train: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    try:
        _train()
    except SystemExit as exit_:
        # a hint only when Hydra stopped before the job: once it ran, every override was valid
        if not _job_started and exit_.code not in (0, None):
            from gendd_framework.launchers import plugin_hint

            hint = plugin_hint(sys.argv[1:]) or override_hint(sys.argv[1:])
            if hint:
                print(hint, file=sys.stderr)
        raise
    if SWEEP_FAILURES:
        raise SystemExit(EXIT_SWEEP_FAILURES)


def run_job(cfg, run_dir: Path, overrides: list[str]) -> dict:
    from gendd_framework.pipeline import run

    return run(cfg, run_dir, overrides)


def is_main_process() -> bool:
    from gendd_framework.engine.distributed import is_main_process as main

    return main()


def record_failure(run_dir: Path, exc: Exception) -> int | None:
    """Record a failed job and tell the user: the full text (and, for an unexpected error, the
    traceback) goes to `<run_dir>/failed.json` (rank 0) and the run's log file; the console gets the
    first line and where the rest is, or the plugin's own frames for an error raised in plugin code.
    Returns the exit code, or None for an unexpected error outside plugin code (the caller re-raises
    it, so its whole traceback is printed)."""
    import json
    import traceback

    from gendd_framework.errors import ConfigError, NonFiniteLossError
    from gendd_framework.plugins import plugin_traceback

    notes = [str(n) for n in getattr(exc, "__notes__", None) or []]
    text = "\n".join([f"{type(exc).__name__}: {exc}", *notes])
    first = text.splitlines()[0]
    expected = isinstance(exc, ConfigError | NonFiniteLossError)
    trace = None if expected else "".join(traceback.format_exception(exc)).rstrip("\n")
    plugin = None if expected else plugin_traceback(exc)
    record = {
        "error": first,
        "detail": text,
        "traceback": trace,
        "plugin": plugin[0] if plugin else None,
        "stage": getattr(exc, "stage", None),
        "step": getattr(exc, "step", None),
    }
    where = []
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "failed.json").write_text(json.dumps(record, indent=2))
        where.append(str(run_dir / "failed.json"))
    where += log_to_files(trace or text)
    if plugin:
        print(f"gendd-train: error in plugin code ({plugin[0]}):\n{plugin[1]}", file=sys.stderr)
    else:
        shown = (str(exc).splitlines() or [""])[0] if expected else first
        print(f"gendd-train: error: {shown}", file=sys.stderr)
    if (plugin or trace or text != first) and where:
        print(
            f"gendd-train: full {'traceback' if trace else 'text'} in {' and '.join(where)}", file=sys.stderr
        )
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, NonFiniteLossError):
        return EXIT_NON_FINITE
    return EXIT_ERROR if plugin else None


def log_to_files(text: str) -> list[str]:
    """Write `text` as an error record to the root logger's file handlers only (Hydra's
    `<run_dir>/<job name>.log`), not the console; returns the files written."""
    import logging

    record = logging.LogRecord("gendd_framework", logging.ERROR, __file__, 0, text, None, None)
    files = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            handler.flush()
            files.append(handler.baseFilename)
    return files


def search_dirs(argv: list[str]) -> list[Path]:
    """Every config folder the command line composes from: the package's `conf/`, `--config-dir`
    (`-cd`) and the `file://` / `pkg://` entries of a `hydra.searchpath=[...]` override."""
    import importlib.util

    dirs, entries = [config_dir()], []
    for i, arg in enumerate(argv):
        for flag in ("--config-dir", "-cd"):
            if arg == flag and i + 1 < len(argv):
                dirs.append(Path(argv[i + 1]))
            elif arg.startswith(flag + "="):
                dirs.append(Path(arg.split("=", 1)[1]))
        if arg.lstrip("+").startswith("hydra.searchpath="):
            entries += [e.strip(" '\"") for e in arg.split("=", 1)[1].strip("[]").split(",")]
    for entry in entries:
        if entry.startswith("pkg://"):
            try:
                spec = importlib.util.find_spec(entry[len("pkg://") :].replace("/", "."))
            except (ImportError, ValueError):
                spec = None
            dirs += [Path(d) for d in (spec.submodule_search_locations or [])] if spec is not None else []
        elif entry:
            dirs.append(Path(entry.removeprefix("file://")))
    return [d.expanduser().absolute() for d in dirs if d.expanduser().is_dir()]


def override_hint(argv: list[str]) -> str | None:
    """A did-you-mean line for a mistyped `key=value` override or config group option, searched in
    every config folder of the command line (called only when Hydra rejected the command line)."""
    import difflib

    from omegaconf import OmegaConf

    dirs = search_dirs(argv)
    overrides = [a for a in argv if "=" in a and not a.startswith(("-", "+", "~", "hydra"))]
    for override in overrides:
        key, value = override.split("=", 1)
        if "." in key or not any((d / key).is_dir() for d in dirs):
            continue
        options = {
            p.relative_to(d / key).with_suffix("").as_posix() for d in dirs for p in (d / key).rglob("*.yaml")
        }
        for choice in value.split(","):  # a sweep lists several
            if choice and choice not in options:
                close = difflib.get_close_matches(choice, sorted(options), n=3, cutoff=0.5)
                if close:
                    return f"gendd-train: hint: {key}={choice}: did you mean {', '.join(close)}?"
    base = [o for o in overrides if "." not in o.split("=", 1)[0] and "," not in o]
    extra = [f"file://{d}" for d in dirs[1:]]
    searchpath = [f"hydra.searchpath=[{','.join(extra)}]"] if extra else []
    try:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = OmegaConf.to_container(compose(config_name="train", overrides=base + searchpath))
    except Exception:  # noqa: BLE001  (the hint is best effort; Hydra already printed its error)
        return None
    from gendd_framework.engine.loggers import flatten

    known = list(flatten(cfg, sep="."))
    for override in overrides:
        key = override.split("=", 1)[0]
        if "." in key and key not in known and not any(k.startswith(key + ".") for k in known):
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            if close:
                return f"gendd-train: hint: unknown key '{key}': did you mean {', '.join(close)}?"
    return None


def format_summary(summary: dict) -> str:
    lines = [f"run dir: {summary['run_dir']}  ({summary['elapsed_s']} s, {summary['device']})"]
    for stage, record in summary.items():
        if isinstance(record, dict) and "test" in record:
            accs = ", ".join(f"{k[4:]} {v:.2f}%" for k, v in record["test"].items() if k.startswith("acc/"))
            lines.append(f"  {stage:>10} test accuracy: {accs}")
    return "\n".join(lines)


if __name__ == "__main__":
    train_main()
