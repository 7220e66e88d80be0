"""Config -> stages -> run directory.

`run(cfg, run_dir)` validates the config, imports plugins, builds data, then runs the configured stages
in order (each a registered function such as `teacher` or `distill`). Every stage returns a record that
goes into `summary.json`; metrics stream to `metrics.jsonl` and checkpoints to `checkpoints/`.
`summary.json` is written last (atomically): a run folder holding one without `failed.json` is finished,
which is how `trainer.resume=auto` skips a finished run and resumes an unfinished one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gendd_framework import config as config_lib
from gendd_framework.engine import distributed
from gendd_framework.engine.checkpoint import atomic_save, kill_point, seed_everything
from gendd_framework.engine.loggers import atomic_write_text, flatten
from gendd_framework.errors import ConfigError, NonFiniteLossError
from gendd_framework.plugins import load_plugins
from gendd_framework.runtime import (  # noqa: F401  (re-exported: the pipeline's public helpers)
    RunContext,
    build_data,
    build_logger,
    fit_method,
    resolve_device,
)
from gendd_framework.stages.hooks import stage_entries

LOG = logging.getLogger("gendd_framework")
# keys that may change between a run and its resumption without changing what is computed
RESUME_NEUTRAL = (
    "trainer.resume", "trainer.progress", "trainer.device", "data.loader.num_workers",
    "data.loader.pin_memory", "data.loader.eval_batch_size", "logger", "paths", "plugins",
    "trainer.find_unused_parameters",
)  # fmt: skip


def check_resume(cfg: DictConfig, run_dir: Path) -> str:
    """What this launch does in `run_dir`: "fresh", "resume" or "finished" (the last with resume=auto).

    `trainer.resume=true` continues the run in `run_dir` (each stage from its `<stage>_last.pt`) only
    with the config it was started with. `auto` does the same when the folder holds a checkpoint or a
    summary, skips a finished run (`finished_summary`), and starts fresh when the folder holds nothing
    or only what a start-up leaves (.hydra/, a log, config_resolved.yaml, temp files, metric rows of an
    attempt that saved no checkpoint: `_run` drops them)."""
    mode = cfg.trainer.get("resume") or False
    if not mode:
        return "fresh"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*_last.pt"))
    if mode == "auto" and not checkpoints and not (run_dir / "summary.json").is_file():
        LOG.info("resume=auto: no checkpoint in %s, starting fresh", run_dir)
        return "fresh"
    previous = run_dir / "config_resolved.yaml"
    if not previous.is_file():
        raise ConfigError(
            f"trainer.resume={str(mode).lower()} but {run_dir} holds no earlier run (no "
            "config_resolved.yaml); point hydra.run.dir at the run to resume, or drop trainer.resume"
        )
    old = flatten(OmegaConf.to_container(OmegaConf.load(previous)), sep=".")
    new = flatten(OmegaConf.to_container(cfg, resolve=True), sep=".")
    changed = sorted(
        k
        for k in set(old) | set(new)
        if old.get(k, "<unset>") != new.get(k, "<unset>") and not k.startswith(RESUME_NEUTRAL)
    )
    if changed:
        detail = ", ".join(
            f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed[:8]
        )
        raise ConfigError(
            f"trainer.resume={str(mode).lower()} with a changed config ({detail}); resume with the config "
            f"of {run_dir} or start a new run directory"
        )
    if mode == "auto" and finished_summary(run_dir) is not None:
        LOG.info("resume=auto: %s already finished (summary.json, no failed.json); nothing to do", run_dir)
        return "finished"
    if mode == "auto":
        LOG.info(
            "resume=auto: continuing the run in %s (%s)", run_dir, ", ".join(checkpoints) or "summary.json"
        )
    return "resume"


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished run: `summary.json` readable and without a failure, and no
    `failed.json` (a later failed launch in the folder); None otherwise."""
    if (run_dir / "failed.json").exists():
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "failed" not in summary else None


def run(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Validate and build everything (preflight), then run every configured stage; returns (and
    writes) the summary. A non-finite loss stops the run with the failure recorded in summary.json.

    Under torchrun or a multi-task submitit job this runs on every rank (engine/distributed.py): rank 0's
    config and run directory are used by all, and only rank 0 writes files."""
    from gendd_framework.config_checks import RULES, check_rules

    check_rules(cfg, tuple(r for r in RULES if r.key == "trainer.device"))  # the rest after agreement
    try:
        _, device = distributed.setup(str(cfg.trainer.get("device", "auto")))
        run_dir, (cfg, overrides) = distributed.agree(str(run_dir), (cfg, list(overrides)))
        return _run(cfg, Path(run_dir), overrides, device)
    finally:
        distributed.shutdown()


def _run(cfg: DictConfig, run_dir: Path, overrides: list[str], device) -> dict[str, Any]:
    from gendd_framework.preflight import preflight
    from gendd_framework.registry import STAGES

    cfg = prepared_config(cfg, overrides)
    started = time.perf_counter()
    main = distributed.is_main_process()
    plan = check_resume(cfg, run_dir)
    if plan == "finished":  # resume=auto on a finished run: nothing to redo
        return finished_summary(run_dir)
    data, loader_cfg = build_data(cfg.data)
    preflight(cfg, data, loader_cfg)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # the config as run: per-recipe method values merged in (the .hydra/ copy is the composed one)
        (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        kill_point("preflight")  # test hook (engine/checkpoint.py): inert unless its env var is set
    seed_everything(int(cfg.seed))
    ctx = RunContext(cfg, run_dir, device, data, loader_cfg, build_logger(cfg, run_dir))
    if main and plan == "fresh" and cfg.trainer.get("resume") == "auto":
        atomic_write_text(ctx.logger.jsonl_path, "")  # rows of attempts that left no checkpoint
    summary = summary_header(cfg, run_dir, device)
    try:
        for key, name, kwargs in stage_entries(cfg):
            seed_everything(int(cfg.seed))  # each stage starts from the same RNG state, cached teacher or not
            ctx.results[key] = STAGES.build({"name": name, **kwargs}, ctx=ctx)
        finals = {k: r["test"] for k, r in ctx.results.items() if isinstance(r, dict) and "test" in r}
        ctx.logger.finish(OmegaConf.to_container(cfg, resolve=True), finals)  # TensorBoard hparams, wandb
    except NonFiniteLossError as exc:
        failed = {"error": str(exc), "stage": exc.stage, "step": exc.step, "key": exc.key}
        if main:
            write_summary(
                run_dir, {**summary, "elapsed_s": elapsed(started), **ctx.results, "failed": failed}
            )
        raise
    finally:
        ctx.logger.close()
    summary.update(elapsed_s=elapsed(started), **ctx.results)
    summary.update(objective(ctx.results))
    return finish_run(ctx, summary, main)


def prepared_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The config as run: per-recipe values merged (the job's command line wins), validated, plugins
    imported (the run's own and those of the earlier runs its teacher comes from) and recorded absolute,
    so gendd-eval and `teacher=from_run` work from any directory."""
    from gendd_framework.stages import referenced_plugins

    cfg = config_lib.apply_recipe(cfg, overrides)
    config_lib.validate(cfg)
    plugins = load_plugins(cfg.get("plugins") or [])
    load_plugins(referenced_plugins(cfg), scan_default_dirs=False)  # `teacher=from_run` runs' methods
    if plugins:
        cfg = cfg.copy()
        cfg.plugins = plugins
    stage_entries(cfg)  # a repeated stage without its own stage_name fails before any work
    return cfg


def summary_header(cfg: DictConfig, run_dir: Path, device) -> dict[str, Any]:
    from gendd_framework.provenance import provenance

    return {
        "name": cfg.get("name"),
        "seed": int(cfg.seed),
        "method": cfg.method.name,
        "device": str(device),
        "world_size": distributed.info().world_size,
        "run_dir": str(run_dir),
        "provenance": provenance(device),
    }


def finish_run(ctx: RunContext, summary: dict[str, Any], main: bool) -> dict[str, Any]:
    """student.pt (the deployable predictor), summary.json last (it marks the run finished: resume=auto
    skips it), the curves; only rank 0 writes."""
    predictor = None
    if "student" in ctx.models:
        predictor, summary["export"] = final_predictor(ctx)
    if not main:
        return summary
    kill_point("finish")
    run_dir = ctx.run_dir
    if predictor is not None:
        atomic_save(predictor.state_dict(), run_dir / "student.pt")
    (run_dir / "failed.json").unlink(missing_ok=True)  # an earlier failure of this run dir is resolved
    write_summary(run_dir, summary)
    from gendd_framework.analysis.plots import plot_metrics

    plot_metrics(run_dir / "metrics.jsonl", run_dir / "plots")
    return summary


def final_predictor(ctx: RunContext) -> tuple[Any, dict[str, Any]]:
    """What `student.pt` holds and how to rebuild it (summary.json's `export`): the `export()` of the
    method that trained the run's final student, or that student itself when the method exports its
    student (the default) or a later stage replaced it. `teacher=from_run` and `gendd-eval
    export=true` rebuild a method's predictor from the run's config with the recorded data facts."""
    student, method = ctx.models["student"], ctx.models.get("method")
    if method is None or ctx.method_stage is None or getattr(method, "student_model", None) is not student:
        return student, {"predictor": "student"}
    predictor = method.export() if hasattr(method, "export") else student
    if predictor is student:
        return student, {"predictor": "student"}
    record = {"predictor": "method", "stage": ctx.method_stage, "module": type(predictor).__name__}
    return predictor, {**record, "facts": ctx.facts.as_dict()}


def objective(results: dict[str, Any]) -> dict[str, Any]:
    """The run's validation objective (what `gendd-train` returns to a Hydra sweeper such as Optuna):
    the selection metric's best validation value of the last stage that selected on validation."""
    for key, record in reversed(list(results.items())):
        if isinstance(record, dict) and record.get("select") and record.get("val"):
            metric = record["select"]
            if metric in record["val"]:
                return {"objective": float(record["val"][metric]), "objective_metric": f"{key}/val/{metric}"}
    return {}


def elapsed(started: float) -> float:
    return round(time.perf_counter() - started, 2)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Atomic: a kill leaves no half summary that would read as a finished run."""
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
