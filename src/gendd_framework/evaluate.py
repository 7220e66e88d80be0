"""Re-evaluate a finished run under other evaluation settings, without retraining.

`gendd-eval RUN_DIR method.sampler.name=ddim method.sampler.steps=10 --split test` rebuilds the run's
method from `RUN_DIR/.hydra/config.yaml`, loads its best-on-val checkpoint, applies the overrides
(evaluation knobs only need the method to be rebuilt) and prints the accuracies as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gendd_framework.data.base import BatchDataset
from gendd_framework.engine.checkpoint import load as load_checkpoint
from gendd_framework.engine.checkpoint import seed_everything
from gendd_framework.engine.trainer import evaluate
from gendd_framework.errors import ConfigError
from gendd_framework.models import build_model
from gendd_framework.pipeline import build_data, resolve_device
from gendd_framework.plugins import load_plugins
from gendd_framework.registry import METHODS, split_spec


def load_run_config(run_dir: str | Path, overrides: list[str] = ()) -> DictConfig:
    from gendd_framework.config import apply_recipe, run_config_path

    path = run_config_path(Path(run_dir))
    if path is None:
        raise ConfigError(f"no run config in {run_dir} (is it a gendd-train run directory?)")
    cfg = apply_recipe(OmegaConf.load(path))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def merge_method(base: DictConfig, overrides: dict[str, Any]) -> DictConfig:
    """Merge overrides into the method node; a component whose `name` changes is replaced, not merged
    (`sampler.name=ddim` must not inherit the DDPM sampler's `temperature`)."""
    node = OmegaConf.create(OmegaConf.to_container(base, resolve=True))
    for key, value in overrides.items():
        old = node.get(key)
        renamed = isinstance(value, dict) and "name" in value and isinstance(old, DictConfig)
        if renamed and value["name"] != old.get("name"):
            node[key] = value
        else:
            node = OmegaConf.merge(node, {key: value})
    return node


def stage_kind(cfg: DictConfig, stage: str) -> str:
    """The registered stage behind a stage name (`gen2` -> `born_again`); the name itself if unlisted."""
    for spec in cfg.get("stages") or []:
        name, kwargs = split_spec(spec, "stage")
        if kwargs.get("stage_name", name) == stage:
            return name
    return stage


class RunEvaluator:
    """Holds a run's data and trained weights; builds the method anew for each evaluation setting."""

    def __init__(self, run_dir: str | Path, stage: str = "distill", device: str = "auto") -> None:
        self.run_dir = Path(run_dir)
        self.cfg = load_run_config(run_dir)
        load_plugins(self.cfg.get("plugins") or [])
        self.device = resolve_device(device)
        self.data, self.loader_cfg = build_data(self.cfg.data)
        self.state = load_checkpoint(self.run_dir / "checkpoints" / f"{stage}_best.pt")["method"]
        self.stage_kind = stage_kind(self.cfg, stage)

    def build_method(self, method_overrides: dict[str, Any] | None = None):
        node = merge_method(self.cfg.method, method_overrides or {})
        name, kwargs = split_spec(node, "method")
        from gendd_framework.stages import teacher_architecture

        student = build_model(self.cfg.student, num_classes=self.data.num_classes)
        if self.stage_kind == "born_again":  # that stage's teacher is the previous student
            teacher = build_model(self.cfg.student, num_classes=self.data.num_classes)
        elif self.cfg.get("teacher"):
            teacher = teacher_architecture(self.cfg.teacher, self.data.num_classes)
        else:
            teacher = None
        method = METHODS.build(
            {"name": name, **kwargs},
            student=student,
            teacher=teacher,
            num_classes=self.data.num_classes,
            input_shape=self.data.input_shape,
        )
        method.load_state_dict(self.state)
        self.teacher = method.teacher.model if getattr(method, "teacher", None) is not None else None
        return method.to(self.device)

    def evaluate(self, method_overrides: dict[str, Any] | None = None, split: str = "test") -> dict[str, Any]:
        from torch.utils.data import DataLoader

        seed_everything(int(self.cfg.seed))
        method = self.build_method(method_overrides)
        dataset = BatchDataset(getattr(self.data, split))
        loader = DataLoader(dataset, batch_size=self.loader_cfg["eval_batch_size"])
        started = time.perf_counter()
        metrics = evaluate(method, loader, self.device, teacher=self.teacher)
        elapsed = time.perf_counter() - started
        return {
            **metrics,
            "eval_settings": method.eval_settings(),
            "seconds": round(elapsed, 3),
            "images": len(loader.dataset),
        }


def main(argv: list[str] | None = None) -> None:
    """`gendd-eval RUN_DIR [method.key=value ...] [--split test|val]`."""
    parser = argparse.ArgumentParser(prog="gendd-eval", description=main.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", help="method.* keys, e.g. method.sampler.steps=10")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--stage", default="distill")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if not o.startswith("method.")]
    if bad:
        raise SystemExit(f"gendd-eval: only method.* overrides change evaluation, got {bad}")
    dotlist = OmegaConf.from_dotlist([o[len("method.") :] for o in args.overrides])
    try:
        result = RunEvaluator(args.run_dir, args.stage).evaluate(OmegaConf.to_container(dotlist), args.split)
    except ConfigError as exc:
        raise SystemExit(f"gendd-eval: error: {exc}") from None
    print(json.dumps(result, indent=2))
