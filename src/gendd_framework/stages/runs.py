"""Earlier runs as inputs: the predictor a finished run exported, the plugins it needs, its architecture.

Used by `teacher=from_run` (an earlier run's student teaches), `gendd-eval export=true` and
`gendd-probe`: each rebuilds modules from the run's saved config and loads its weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from gendd_framework import config as config_lib
from gendd_framework.config import plain
from gendd_framework.context import DataFacts
from gendd_framework.errors import ConfigError
from gendd_framework.methods.base import release_taps
from gendd_framework.models import build_model
from gendd_framework.stages.hooks import rebuild_stage_method


def architecture(spec: Any) -> dict[str, Any]:
    """A model spec without its initial weights file or frozen paths: the architecture alone."""
    return {k: v for k, v in plain(spec).items() if k not in ("checkpoint", "freeze")}


def run_predictor(run_dir: Path, num_classes: int) -> nn.Module:
    """The predictor a finished run exported, as modules without trained weights (`student.pt` holds
    them). A run whose method exports more than its student (summary.json's `export` record) gets
    that method rebuilt from its config, with the data facts it was built with, and its `export()`
    (its plugins are loaded by whoever reads the run: `referenced_plugins`); otherwise the run's
    student architecture (`num_classes` is used when the run recorded none)."""
    config_path = config_lib.run_config_path(run_dir)
    if config_path is None:
        raise ConfigError(
            f"teacher.run_dir={run_dir} is not a finished gendd-train run "
            "(no config_resolved.yaml or .hydra/config.yaml)"
        )
    cfg = config_lib.apply_recipe(OmegaConf.load(config_path))
    summary = run_dir / "summary.json"
    export = (json.loads(summary.read_text()).get("export") if summary.is_file() else None) or {}
    if export.get("predictor") != "method":
        return build_model(architecture(cfg.student), num_classes=num_classes)
    try:
        method = rebuild_stage_method(cfg, export["stage"], DataFacts.from_dict(export["facts"]))
    except ConfigError as exc:
        raise ConfigError(f"rebuilding the predictor of {run_dir}: {exc}") from None
    predictor = method.export()
    release_taps(method, keep=predictor)  # the method is discarded: its hooks must not outlive it
    return predictor


def referenced_plugins(cfg: Any) -> list[str]:
    """The `plugins` of the earlier runs a config's teacher comes from (`teacher.run_dir`, followed
    back through their own teachers): what rebuilding their exported predictors needs. The pipeline
    and gendd-eval load them with the run's own plugins."""
    found: list[str] = []
    seen: set[str] = set()
    run_dir = OmegaConf.select(cfg, "teacher.run_dir", default=None, throw_on_missing=False)
    while run_dir and str(run_dir) not in seen:
        seen.add(str(run_dir))
        path = config_lib.run_config_path(Path(str(run_dir)).expanduser())
        if path is None:
            break
        earlier = OmegaConf.load(path)
        found += [str(p) for p in earlier.get("plugins") or []]
        run_dir = OmegaConf.select(earlier, "teacher.run_dir", default=None, throw_on_missing=False)
    return list(dict.fromkeys(found))
