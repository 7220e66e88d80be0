"""Config composition, start-up validation and the console scripts (run as real subprocesses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from gendd_framework import config as config_lib
from gendd_framework.cli import config_dir
from gendd_framework.errors import ConfigError
from gendd_framework.registry import METHODS, accepted_runtime, check_kwargs, split_spec

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
METHOD_FILES = sorted(p.stem for p in (config_dir() / "method").glob("*.yaml"))
EXPERIMENTS = sorted(
    p.relative_to(config_dir() / "experiment").with_suffix("").as_posix()
    for p in (config_dir() / "experiment").rglob("*.yaml")
)


def cli(*args, cwd, env_extra=None, timeout=300):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env_extra or {})}
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(compose, experiment):
    cfg = compose([f"experiment={experiment}"])
    config_lib.validate(cfg)


@pytest.mark.parametrize("method", METHOD_FILES)
def test_every_method_group_option_validates(compose, method):
    """Each conf/method/*.yaml composes and validates, and its keys, alone and with each of its
    `per_recipe` entries merged in, are arguments its registered factory accepts (no model is built)."""
    cfg = compose([f"method={method}"])
    config_lib.validate(cfg)
    recipes = list(cfg.method.get("per_recipe") or {})
    for recipe in [None, *recipes]:
        with open_dict(cfg):
            cfg.recipe = recipe
        name, kwargs = split_spec(config_lib.apply_recipe(cfg).method, "method")
        factory = METHODS.get(name)
        runtime = accepted_runtime(factory, {"student": None, "teacher": None, "num_classes": 10})
        check_kwargs(factory, {**runtime, **kwargs}, f"method '{name}' of {method}.yaml, recipe {recipe}")


def test_typo_in_top_level_key_fails_with_its_name(compose):
    cfg = compose()
    with open_dict(cfg):
        cfg.trainr = {"epochs": 3}
    with pytest.raises(ConfigError, match="unknown config key 'trainr' \\(did you mean 'trainer'\\?\\)"):
        config_lib.validate(cfg)
    cfg = compose()
    with open_dict(cfg):
        cfg.trainer.epoch = 3
    with pytest.raises(ConfigError, match="trainer.epoch.*did you mean 'epochs'"):
        config_lib.validate(cfg)
    cfg = compose()
    with open_dict(cfg):
        del cfg["method"]
    with pytest.raises(ConfigError, match="missing config key.*method"):
        config_lib.validate(cfg)


def test_cfg_job_prints_the_composed_config(tmp_path):
    res = cli("gendd-train", "--cfg", "job", "method=kd", "method.temperature=2.5", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cfg = OmegaConf.create(res.stdout)
    assert cfg.method.name == "kd" and cfg.method.temperature == 2.5 and cfg.data.name == "digits"


def test_unknown_registry_name_is_a_clean_cli_error(tmp_path, cache_dir):
    res = cli(
        "gendd-train",
        "student.name=mlpp",
        "trainer.epochs=1",
        "teacher.train.epochs=1",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
        env_extra={"GENDD_CACHE_DIR": cache_dir},
    )
    assert res.returncode == 2
    assert "unknown model 'mlpp'. Did you mean: 'mlp'" in res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_override_key_is_rejected_by_hydra(tmp_path):
    res = cli("gendd-train", "trainer.epohcs=3", "--cfg", "job", cwd=tmp_path)
    assert res.returncode != 0 and "epohcs" in res.stderr


def test_multirun_writes_one_run_dir_per_job(tmp_path, cache_dir):
    res = cli(
        "gendd-train",
        "-m",
        "method=kd",
        "method.temperature=2,8",
        "trainer.epochs=1",
        "teacher.train.epochs=2",
        "trainer.progress=false",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
        env_extra={"GENDD_CACHE_DIR": cache_dir},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 2
    temps = sorted(OmegaConf.load(p.parent / ".hydra" / "config.yaml").method.temperature for p in summaries)
    assert temps == [2.0, 8.0]
    for p in summaries:
        assert "test" in json.loads(p.read_text())["distill"]


def test_gendd_list_shows_names_signatures_and_docs(tmp_path):
    res = cli("gendd-list", "models", "resnet3*", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "resnet32(num_classes: int = 100)" in res.stdout and "resnet32x4" in res.stdout
    res = cli("gendd-list", "losses", cwd=tmp_path)
    assert (
        "kd_kl(temperature: float = 4.0, standardize: bool = False)" in res.stdout
        and "logit_mse" in res.stdout
    )
    res = cli("gendd-list", cwd=tmp_path)
    assert "method" in res.stdout and "stage" in res.stdout


def test_user_config_dir_and_registry_plugin_run_from_yaml(tmp_path, cache_dir):
    res = cli(
        "gendd-train",
        "--config-dir",
        str(ROOT / "examples"),
        "experiment=mimic_digits",
        "trainer.epochs=1",
        "teacher.train.epochs=2",
        "trainer.progress=false",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
        env_extra={"GENDD_CACHE_DIR": cache_dir},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "mimic" and summary["distill"]["test"]["acc/student"] > 20
