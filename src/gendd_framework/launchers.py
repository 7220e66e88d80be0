"""Hydra launcher and sweeper presets (`conf/hydra/launcher/`, `conf/hydra/sweeper/`) and their plugins.

The launcher presets compose without their plugin packages (so configs can be checked anywhere);
launching one whose plugin is missing stops before any job starts, naming the extra to install,
instead of Hydra's "Unknown plugin class". An Optuna sweep is also checked to optimise the objective
`gendd-train` returns in the right direction. Jobs of launchers that re-run a job after a preemption
or time-out (submitit, Ray) default to `trainer.resume=auto`, so the re-run continues the job.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gendd_framework.errors import ConfigError


@dataclass(frozen=True)
class Plugin:
    module: str  # the plugin's package under hydra_plugins
    package: str  # its PyPI name
    extra: str  # the gendd-framework extra that installs it
    options: tuple[str, ...]  # the `hydra/<group>=<option>` selections that need it


PLUGINS = (
    Plugin(
        "hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", "joblib", ("hydra/launcher=joblib",)
    ),
    Plugin(
        "hydra_plugins.hydra_submitit_launcher",
        "hydra-submitit-launcher",
        "slurm",
        ("hydra/launcher=submitit_slurm", "hydra/launcher=submitit_local"),
    ),
    Plugin("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher", "ray", ("hydra/launcher=ray",)),
    Plugin(
        "hydra_plugins.hydra_optuna_sweeper",
        "hydra-optuna-sweeper",
        "optuna",
        ("hydra/sweeper=optuna", "hydra/sweeper=optuna_maximize"),
    ),
)
HIGHER_IS_BETTER = {"acc": True, "agree": True, "ce": False, "ece": False, "kl": False}
# Launchers that run a job again in its own folder: submitit requeues a preempted or timed-out job
# (the launcher's checkpoint() resubmits the same pickled job: same overrides, same sweep dir, whose
# ${now:} was resolved once at launch) and Ray retries a task whose worker or node died.
REQUEUING = ("hydra_plugins.hydra_submitit_launcher.", "hydra_plugins.hydra_ray_launcher.")


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_message(plugin: Plugin, selection: str) -> str:
    return (
        f"{selection} needs the {plugin.package} plugin, which is not installed: "
        f"pip install 'gendd-framework[{plugin.extra}]' (or pip install {plugin.package})"
    )


def job_resume(launcher: str, overrides: Iterable[str], resume: bool | str) -> bool | str:
    """`trainer.resume` of one sweep job started by the launcher class `launcher`: `auto` under a
    requeuing launcher (the submitit_slurm, submitit_local and ray presets) unless the job's command
    line sets trainer.resume itself, so a requeued job continues from its checkpoints."""
    explicit = any(o.split("=", 1)[0].lstrip("+~") == "trainer.resume" for o in overrides)
    if resume is False and not explicit and launcher.startswith(REQUEUING):
        return "auto"
    return resume


def check_plugins(config: Any) -> None:
    """Raise a ConfigError naming the extra to install when the selected launcher or sweeper plugin
    is not importable (`config` is the multirun's composed config, `hydra` node included)."""
    choices = OmegaConf.select(config, "hydra.runtime.choices", default=None) or {}
    for group in ("launcher", "sweeper"):
        node = config.hydra.get(group)
        target = str(node.get("_target_", "")) if node is not None else ""
        for plugin in PLUGINS:
            if target.startswith(plugin.module + ".") and not installed(plugin.module):
                option = choices.get(f"hydra/{group}") or target.rsplit(".", 1)[-1]
                raise ConfigError(missing_message(plugin, f"hydra/{group}={option}"))


def check_direction(config: Any) -> None:
    """An Optuna sweep must optimise the objective the right way: `gendd-train` returns the selection
    metric (trainer.select, default `acc/<primary output>`), so accuracy needs `direction: maximize`
    (the plugin's own default is minimize) and CE/ECE/KL need minimize."""
    sweeper = config.hydra.get("sweeper")
    if sweeper is None or "optuna" not in str(sweeper.get("_target_", "")).lower():
        return
    direction = sweeper.get("direction")
    direction = getattr(direction, "name", direction)  # the plugin's Direction enum, or a string
    if not isinstance(direction, str):
        return  # multi-objective: the user decides
    select = (config.get("trainer") or {}).get("select") or "acc/<primary output>"
    higher = HIGHER_IS_BETTER.get(str(select).split("/")[0])
    if higher is None:
        return
    wanted = "maximize" if higher else "minimize"
    if direction != wanted:
        raise ConfigError(
            f"hydra.sweeper.direction={direction} but the objective gendd-train returns is val {select}, "
            f"to {wanted}: add hydra.sweeper.direction={wanted}"
            + (" or use hydra/sweeper=optuna_maximize" if higher else "")
        )


def check_multirun(config: Any) -> None:
    """Everything checked before a sweep launches its first job."""
    check_plugins(config)
    check_direction(config)


def plugin_hint(argv: list[str]) -> str | None:
    """A line naming the extra to install when the command line selects a preset whose plugin is
    missing (a preset that builds on the plugin's own config cannot even compose without it)."""
    for arg in argv:
        selection = arg.lstrip("+")
        for plugin in PLUGINS:
            if selection in plugin.options and not installed(plugin.module):
                return f"gendd-train: hint: {missing_message(plugin, selection)}"
    return None


def precheck(argv: list[str], config_dir: str, extra_dirs: Iterable[Path] = ()) -> None:
    """Before `gendd-train -m` starts Hydra: compose the command line's config (sweep overrides left
    out) and run `check_multirun`, so a missing plugin or a wrong Optuna direction stops the sweep
    before its first job (Hydra turns errors raised in callbacks into warnings). `extra_dirs` are the
    command line's other config folders (`--config-dir`, `hydra.searchpath`), searched as Hydra will.
    Best effort: a command line this cannot compose is left to Hydra to report."""
    if not any(a in ("-m", "--multirun") for a in argv):
        return
    try:
        from hydra import compose, initialize_config_dir
        from hydra.core.override_parser.overrides_parser import OverridesParser

        # overrides only: not flags, nor flag values such as --config-dir's folder
        overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
        parsed = OverridesParser.create().parse_overrides(overrides)
        fixed = [
            o.input_line for o in parsed if not o.is_sweep_override() and o.key_or_group != "hydra.searchpath"
        ]
        extra = [f"file://{Path(d).absolute()}" for d in extra_dirs]
        if extra:
            fixed.append(f"hydra.searchpath=[{','.join(extra)}]")
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            config = compose(config_name="train", overrides=fixed, return_hydra_config=True)
    except Exception:  # noqa: BLE001  (Hydra reports its own composition errors)
        return
    check_multirun(config)
