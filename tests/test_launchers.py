"""Hydra launcher and sweeper presets: a real 2-job joblib sweep, the SLURM/Ray presets composing,
a 2-trial Optuna search (when its plugin is installed), and clear errors for a missing plugin or an
Optuna direction that would minimise accuracy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from gendd_framework import launchers
from gendd_framework.cli import config_dir
from gendd_framework.errors import ConfigError

BIN = Path(sys.executable).parent
# our launcher presets share the plugins' names: Hydra 1.3 validates them against the plugin schema
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/[^']+' is validated against:UserWarning")
# the digits KD job of test_sweeps.py (same teacher recipe, so the session's teacher cache serves both)
JOB = [
    "method=kd",
    "trainer.epochs=1",
    "teacher.train.epochs=3",
    "data.train_fraction=0.3",
    "trainer.progress=false",
]
OPTUNA = launchers.installed("hydra_plugins.hydra_optuna_sweeper")
JOBLIB = launchers.installed("hydra_plugins.hydra_joblib_launcher")


def gendd_train(*args: str, cwd: Path, cache_dir: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENDD_CACHE_DIR": cache_dir, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [str(BIN / "gendd-train"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def compose_hydra(overrides: list[str]):
    """The composed config with its `hydra` node, as `gendd-train -m ...` would build it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.skipif(not JOBLIB, reason="hydra-joblib-launcher is not installed (extra: joblib)")
def test_joblib_sweep_runs_two_jobs_in_parallel_processes(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    res = gendd_train(
        "-m", *JOB, "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path, cache_dir=cache_dir,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in res.stdout + res.stderr  # the plugin launched them
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    seeds = sorted(json.loads(p.read_text())["seed"] for p in summaries)
    assert seeds == [0, 1]
    for path in summaries:
        summary = json.loads(path.read_text())
        assert summary["objective"] == summary["distill"]["val"]["acc/student"]
        hydra_cfg = yaml.safe_load((path.parent / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert hydra_cfg["launcher"]["_target_"].endswith("JoblibLauncher")
    report = json.loads((sweep / "sweep_summary.json").read_text())
    assert len(report["finished"]) == 2 and not report["failed"]


def test_slurm_preset_composes_one_job_of_n_ranks():
    cfg = compose_hydra(["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == 4 and launcher.nodes == 1  # one rank per GPU of the same job
    assert OmegaConf.select(cfg, "hydra.launcher.submitit_folder", throw_on_resolution_failure=False)
    local = compose_hydra(["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2"]).hydra.launcher
    assert local._target_.endswith("LocalLauncher") and local.tasks_per_node == 2


def test_ray_and_joblib_presets_compose():
    ray = compose_hydra(["hydra/launcher=ray", "hydra.launcher.ray.remote.num_gpus=1"]).hydra.launcher
    assert ray._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert ray.ray.remote.num_gpus == 1 and ray.ray.init.address is None
    joblib = compose_hydra(["hydra/launcher=joblib"]).hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 2


def test_missing_plugin_stops_the_sweep_with_the_extra_to_install(tmp_path, cache_dir, monkeypatch):
    """Checked on the composed config before any job starts (unit), and through the console script
    for the Ray launcher when its plugin is absent (it is not a dev dependency)."""
    cfg = compose_hydra(["hydra/launcher=ray"])
    monkeypatch.setattr(launchers, "installed", lambda module: False)
    with pytest.raises(ConfigError, match=r"pip install 'gendd-framework\[ray\]'"):
        launchers.check_plugins(cfg)
    hint = launchers.plugin_hint(["-m", "hydra/sweeper=optuna_maximize"])
    assert hint is not None and "gendd-framework[optuna]" in hint
    monkeypatch.undo()
    if launchers.installed("hydra_plugins.hydra_ray_launcher"):
        return
    res = gendd_train(
        "-m",
        *JOB,
        "hydra/launcher=ray",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        cache_dir=cache_dir,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "gendd-train: error: hydra/launcher=ray needs the hydra-ray-launcher plugin" in res.stderr
    assert "pip install 'gendd-framework[ray]'" in res.stderr
    assert not (tmp_path / "sweep").exists()  # stopped before the first job


@pytest.mark.parametrize(
    ("direction", "select", "ok"),
    [("maximize", None, True), ("minimize", None, False), ("minimize", "ce/student", True),
     ("maximize", "kl/student", False), ("maximize", "agree/student", True)],
)  # fmt: skip
def test_optuna_direction_must_match_the_objective(direction, select, ok):
    target = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    cfg = OmegaConf.create(
        {"trainer": {"select": select}, "hydra": {"sweeper": {"_target_": target, "direction": direction}}}
    )
    if ok:
        launchers.check_direction(cfg)
    else:
        with pytest.raises(ConfigError, match="hydra.sweeper.direction="):
            launchers.check_direction(cfg)


@pytest.mark.skipif(not OPTUNA, reason="hydra-optuna-sweeper is not installed (extra: optuna)")
def test_optuna_preset_maximizes_the_validation_objective(tmp_path, cache_dir):
    sweeper = compose_hydra(["hydra/sweeper=optuna_maximize"]).hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 0
    # the plugin's own preset minimises: accuracy would be driven down, so the sweep does not start
    res = gendd_train(
        "-m", *JOB, "hydra/sweeper=optuna", "method.temperature=interval(1.0,8.0)",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, cache_dir=cache_dir,
    )  # fmt: skip
    assert res.returncode == 2 and "add hydra.sweeper.direction=maximize" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "sweep").exists()


@pytest.mark.skipif(not OPTUNA, reason="hydra-optuna-sweeper is not installed (extra: optuna)")
def test_optuna_two_trial_search_returns_the_validation_metric(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    res = gendd_train(
        "-m", *JOB, "hydra/sweeper=optuna_maximize", "hydra.sweeper.n_trials=2",
        "method.temperature=interval(1.0,8.0)", "method.beta=interval(0.1,1.0)", f"hydra.sweep.dir={sweep}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}", cwd=tmp_path, cache_dir=cache_dir,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    assert len(jobs) == 2
    summaries = [json.loads((job / "summary.json").read_text()) for job in jobs]
    for job in jobs:  # each trial ran with the values Optuna proposed inside the search space
        method = yaml.safe_load((job / "config_resolved.yaml").read_text())["method"]
        assert 1.0 <= method["temperature"] <= 8.0 and 0.1 <= method["beta"] <= 1.0
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    objectives = [s["objective"] for s in summaries]
    assert results["best_value"] == pytest.approx(max(objectives), rel=1e-12)  # maximised, from our return
    assert set(results["best_params"]) == {"method.temperature", "method.beta"}
    assert 1.0 <= results["best_params"]["method.temperature"] <= 8.0
    assert (tmp_path / "study.db").stat().st_size > 0  # the study persists (resumable with the same storage)
