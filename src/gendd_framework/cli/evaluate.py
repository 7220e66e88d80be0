"""Re-evaluate a finished run under other evaluation settings, without retraining.

`gendd-eval run_dir=RUN method/sampler=ddim method.sampler.steps=10 split=test stage=distill` rebuilds
the run's method from its saved config, loads that stage's best-on-val checkpoint, applies the method
overrides (evaluation knobs only need the method to be rebuilt) and prints the metrics as JSON. The
overrides use gendd-train's dialect (parsed and typed by Hydra's compose API, so nothing is written
anywhere); the older `gendd-eval RUN_DIR method.x=y --split test` form still works.
`gendd-eval run_dir=RUN export=true` evaluates what the run deployed instead: `student.pt` loaded into
the predictor the run's method exports (the same module `teacher=from_run` uses), as output `export`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from gendd_framework.errors import ConfigError

# torch-backed modules are imported where used, so `--help` and argument errors answer at once


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


class RunEvaluator:
    """Holds a run's data and trained weights; builds the method anew for each evaluation setting."""

    def __init__(self, run_dir: str | Path, stage: str = "distill", device: str = "auto") -> None:
        self.run_dir = Path(run_dir).expanduser().resolve()
        if not self.run_dir.is_dir():
            raise ConfigError(f"run directory not found: {run_dir}")
        self.cfg = load_run_config(self.run_dir)
        checkpoint = self.run_dir / "checkpoints" / f"{stage}_best.pt"
        if not checkpoint.is_file():
            found = sorted(p.name[: -len("_best.pt")] for p in self.run_dir.glob("checkpoints/*_best.pt"))
            raise ConfigError(
                f"no checkpoint for stage '{stage}' in {self.run_dir}; stages: {', '.join(found) or 'none'}"
            )
        from gendd_framework.engine.checkpoint import load as load_checkpoint
        from gendd_framework.pipeline import build_data, resolve_device
        from gendd_framework.plugins import load_plugins
        from gendd_framework.stages import referenced_plugins

        load_plugins([*(self.cfg.get("plugins") or []), *referenced_plugins(self.cfg)])
        self.device = resolve_device(device)
        self.data, self.loader_cfg = build_data(self.cfg.data)
        self.state = load_checkpoint(checkpoint)["method"]
        self.stage = stage

    def build_method(self, method_overrides: dict[str, Any] | None = None):
        """The stage's method with its best-on-val weights, rebuilt as the stage declares
        (`stage_hooks(rebuild=...)`: same data facts, the teacher it had) with the overrides merged."""
        from gendd_framework.data.base import data_facts
        from gendd_framework.stages import rebuild_stage_method

        cfg = self.cfg.copy()
        with open_dict(cfg):
            cfg.method = merge_method(self.cfg.method, method_overrides or {})  # replaced, not merged
        method = rebuild_stage_method(cfg, self.stage, data_facts(self.data))
        method.load_state_dict(self.state)
        # the evaluation reference is the teacher the stage gave the method; a teacher-free method's
        # own `teacher` (mean teacher's EMA model) is not one, and its checkpoint holds no other
        own = getattr(method, "teacher", None) is not None and getattr(method, "needs_teacher", True)
        self.teacher = method.teacher.model if own else None
        return method.to(self.device)

    def build_export(self):
        """The run's deployed predictor (`student.pt` in the module its method exports), wrapped so
        that `predict` names its output `export`."""
        from gendd_framework.models import load_state_dict_file
        from gendd_framework.stages import run_predictor

        weights = self.run_dir / "student.pt"
        if not weights.is_file():
            raise ConfigError(f"no student.pt in {self.run_dir}: the run did not finish")
        predictor = run_predictor(self.run_dir, self.data.num_classes)
        predictor.load_state_dict(load_state_dict_file(weights))
        self.teacher = None
        return ExportedPredictor(predictor).to(self.device)

    def evaluate(
        self, method_overrides: dict[str, Any] | None = None, split: str = "test", export: bool = False
    ) -> dict[str, Any]:
        from torch.utils.data import DataLoader

        from gendd_framework.data.base import BatchDataset
        from gendd_framework.engine.checkpoint import seed_everything
        from gendd_framework.engine.trainer import evaluate

        seed_everything(int(self.cfg.seed))
        if export and method_overrides:
            raise ConfigError("export=true evaluates student.pt as deployed: drop the method.* overrides")
        method = self.build_export() if export else self.build_method(method_overrides)
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


class ExportedPredictor:
    """`predict(x) -> {"export": logits}` around a plain module, so `evaluate` scores it like a method."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def to(self, device: Any) -> ExportedPredictor:
        self.model.to(device)
        return self

    def eval(self) -> ExportedPredictor:
        self.model.eval()
        return self

    def on_evaluate_start(self) -> None:
        pass

    def eval_settings(self) -> dict[str, Any]:
        return {}

    def predict(self, x: Any) -> dict[str, Any]:
        return {"export": self.model(x)}


EVAL_DEFAULTS: dict[str, Any] = {
    "split": "test",
    "stage": "distill",
    "device": "auto",
    "export": False,
    "method": {},
}
OPTION_FLAGS = {"--split": "split", "--stage": "stage", "--device": "device"}
SPLITS = ("val", "test")
USAGE = """usage: gendd-eval run_dir=RUN [split=test|val] [stage=distill] [device=auto|cpu|cuda:N]
                  [export=true] [method.KEY=VALUE ...] [method/GROUP=OPTION ...]
       gendd-eval RUN_DIR [method.KEY=VALUE ...] [--split test|val] [--stage NAME] [--device DEV]

Re-evaluates RUN's best-on-val weights of one stage with changed evaluation settings and prints JSON.
A method component whose name changes is replaced, not merged: method/sampler=ddim drops the DDPM
sampler's temperature. export=true scores student.pt in the predictor the run's method exports (what
teacher=from_run uses). RUN is absolute or relative to the working directory; nothing is written."""


def to_hydra(arg: str) -> str:
    """One command-line override in Hydra's compose form: method keys are added onto an empty `method`
    node (`++`), method groups appended to the defaults (`+`); other keys pass as they are."""
    key, _, value = arg.partition("=")
    bare = key.lstrip("+")
    if bare.startswith("method."):
        return f"++{bare}={value}"
    if bare.startswith("method/"):
        return f"+{bare}={value}"
    if bare == "method":
        raise ConfigError(
            "gendd-eval re-evaluates the run's own method; change it with method.KEY=VALUE or "
            "method/GROUP=OPTION (e.g. method/sampler=ddim)"
        )
    if bare not in ("split", "stage", "device", "export"):
        raise ConfigError(
            f"unknown override '{arg}'; expected run_dir=, split=, stage=, device=, export=, method.*"
        )
    return arg


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """The run dir, taken literally (sweep job dirs hold `=` and `,`), and the Hydra overrides."""
    run_dir: str | None = None
    overrides: list[str] = []
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if flag in OPTION_FLAGS:
            value = value if eq else next(args, "")
            if not value:
                raise ConfigError(f"{flag} needs a value")
            overrides.append(f"{OPTION_FLAGS[flag]}={value}")
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option '{arg}' (see gendd-eval --help)")
        elif flag.lstrip("+") == "run_dir":
            run_dir = value
        elif run_dir is None and (not eq or Path(arg).is_dir()):  # the older positional form
            run_dir = arg
        elif flag.lstrip("+").startswith("hydra"):
            continue  # where Hydra would write: nothing is written, so nothing to configure
        else:
            overrides.append(to_hydra(arg))
    return run_dir, overrides


def compose_eval(overrides: list[str]) -> DictConfig:
    """`{split, stage, device, method}` from the overrides, with the project's `conf/` for the method's
    component groups; the compose API changes no directory and writes no files."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from gendd_framework.cli import config_dir

    ConfigStore.instance().store(name="gendd_eval", node=EVAL_DEFAULTS)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="gendd_eval"):
        cfg = compose(config_name="gendd_eval", overrides=overrides)
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split}: expected one of {', '.join(SPLITS)}")
    return cfg


def run_eval(argv: list[str]) -> dict[str, Any]:
    """Parse, compose, evaluate: the CLI without its error handling."""
    run_dir, overrides = parse_args(argv)
    if not run_dir:
        raise ConfigError("no run directory; pass run_dir=RUN (see gendd-eval --help)")
    cfg = compose_eval(overrides)
    method = OmegaConf.to_container(cfg.method, resolve=True)
    evaluator = RunEvaluator(run_dir, str(cfg.stage), str(cfg.device))
    if not isinstance(cfg.export, bool):
        raise ConfigError(f"export={cfg.export}: expected true or false")
    result = evaluator.evaluate(method, str(cfg.split), export=cfg.export)
    return {"run_dir": str(evaluator.run_dir), "stage": cfg.stage, "split": cfg.split, **result}


def main(argv: list[str] | None = None) -> None:
    """`gendd-eval run_dir=RUN [split=..] [stage=..] [device=..] [method.KEY=VALUE ...]`."""
    from gendd_framework.cli.json_command import json_command

    json_command("gendd-eval", run_eval, argv)
