"""What the pipeline guards before and around the stages: preflight of the whole run, resume only with
the same config, provenance in summary.json, a non-finite loss recorded with its step, failing sweep
jobs that do not end the sweep, did-you-mean hints for Hydra typos, and one-way imports."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gendd_framework.errors import ConfigError, NonFiniteLossError
from gendd_framework.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["trainer.epochs=1", "data.train_fraction=0.3"]


def fresh_cache(monkeypatch, tmp_path) -> Path:
    """An empty teacher cache: a stage that got as far as the teacher would have to train and write it."""
    cache = tmp_path / "fresh_cache"
    monkeypatch.setenv("GENDD_CACHE_DIR", str(cache))
    return cache


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+method.temprature=2"], "did you mean 'temperature'"),
        (["trainer.select=acc/generative"], "trainer.select='acc/generative'"),
        (["optim.name=adamm"], "adamm"),
        (["stages=[teacher,distill,{name:born_again,generation:2}]"], "generation"),
        (["method=gendd", "method.tokenizer.token_dim=100"], "token_dim"),
    ],
)
def test_preflight_fails_before_the_teacher_is_trained(compose, monkeypatch, tmp_path, overrides, message):
    cache = fresh_cache(monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        run(compose(["method=kd", *TINY, *overrides]), tmp_path / "run")
    assert not cache.exists(), "the teacher stage ran before the error"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_refuses_a_changed_config_and_a_missing_run(compose, tmp_path):
    run(compose(["method=kd", *TINY]), tmp_path)
    with pytest.raises(ConfigError, match=r"method.temperature: 4.0 -> 2\b"):
        run(compose(["method=kd", *TINY, "method.temperature=2", "trainer.resume=true"]), tmp_path)
    resumed = run(compose(["method=kd", *TINY, "trainer.resume=true", "trainer.device=cpu"]), tmp_path)
    assert resumed["distill"]["test"]["acc/student"] > 0
    with pytest.raises(ConfigError, match="holds no earlier run"):
        run(compose(["method=kd", *TINY, "trainer.resume=true"]), tmp_path / "empty")


def test_summary_records_provenance_and_labels_the_teacher(compose, tmp_path):
    summary = run(compose(["method=kd", *TINY]), tmp_path)
    prov = summary["provenance"]
    assert prov["packages"]["torch"].startswith("2.14.1") and prov["packages"]["hydra-core"]
    assert prov["device"] == "cpu" and prov["python"].count(".") == 2
    if (ROOT / ".git").exists():
        assert len(prov["git"]["commit"]) == 40
    assert "acc/teacher" in summary["teacher"]["test"] and "acc/student" not in summary["teacher"]["test"]


NAN_PLUGIN = """
import torch
from gendd_framework.methods.compose import WeightedLossMethod
from gendd_framework.methods.terms import LossTerm
from gendd_framework.registry import LOSSES, METHODS


@LOSSES.register("nan_after")
class NanAfter(LossTerm):
    needs_teacher = False
    teacher_taps = ()

    def __init__(self, step: int = 3):
        super().__init__()
        self.at = step

    def forward(self, student, teacher, batch, ctx):
        value = student["logits"].pow(2).mean()
        return value * float("nan") if ctx.step >= self.at else value


@METHODS.register("nan_method")
def nan_method(student, step: int = 3):
    return WeightedLossMethod(student, None, [{"name": "nan_after", "step": step}])
"""


def test_non_finite_loss_stops_on_its_step_and_is_recorded(compose, tmp_path):
    plugin = tmp_path / "nan_plugin.py"
    plugin.write_text(NAN_PLUGIN)
    cfg = compose([f"plugins=[{plugin}]", "method=ce", "method.name=nan_method", "~method.label_smoothing"])
    with pytest.raises(NonFiniteLossError) as info:
        run(cfg, tmp_path / "run")
    assert (info.value.stage, info.value.step) == ("distill", 3)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["failed"]["step"] == 3 and summary["failed"]["stage"] == "distill"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "non_finite_loss" and r["step"] == 3 for r in rows)


def cli(*args, cwd, cache):
    env = {**os.environ, "GENDD_CACHE_DIR": cache, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([str(BIN / "gendd-train"), *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_a_failing_sweep_job_does_not_end_the_sweep(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    res = cli("-m", "method.temperature=2,-1", *TINY, "teacher.train.epochs=3", "trainer.progress=false",
              f"hydra.sweep.dir={sweep}", cwd=tmp_path, cache=cache_dir)  # fmt: skip
    assert res.returncode != 0, res.stdout
    report = json.loads((sweep / "sweep_summary.json").read_text())
    assert report["jobs"] == 2 and len(report["finished"]) == 1
    ((failed_job, error),) = report["failed"].items()
    assert "temperature" in error and (sweep / failed_job / "failed.json").exists()
    assert "1 finished, 1 failed" in res.stdout


def test_hydra_typos_get_a_did_you_mean_hint(tmp_path, cache_dir):
    res = cli("trainer.epoch=3", cwd=tmp_path, cache=cache_dir)
    assert res.returncode != 0 and "did you mean trainer.epochs" in res.stderr
    res = cli("method=dkdd", cwd=tmp_path, cache=cache_dir)
    assert res.returncode != 0 and "did you mean dkd" in res.stderr


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gendd_framework"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gendd_framework"))
    return found


def test_stages_and_components_never_import_the_pipeline_or_plugins():
    src = ROOT / "src" / "gendd_framework"
    for path in [*(src / "stages").glob("*.py"), src / "runtime.py", src / "components.py"]:
        bad = imports_of(path) & {"gendd_framework.pipeline", "gendd_framework.plugins"}
        assert not bad, f"{path.relative_to(src)} imports {bad}"
    for folder in ("engine", "methods", "models", "data", "generative", "losses"):
        for path in (src / folder).rglob("*.py"):
            bad = {m for m in imports_of(path) if m.split(".")[1] in ("pipeline", "stages", "cli", "plugins")}
            assert not bad, f"{path.relative_to(src)} imports {bad}"


@pytest.mark.parametrize(
    ("override", "changes"),
    [
        ("teacher.train.epochs=7", True),
        ("teacher.train.seed=5", True),
        ("teacher.model.channels=[8,16]", True),
        ("data.noise_std=0.2", True),  # the training transform
        ("data.split_seed=3", True),
        ("data.loader.batch_size=32", True),
        ("trainer.precision=bf16", True),
        ("data.loader.eval_batch_size=17", False),
        ("data.loader.num_workers=2", False),
        ("data.label_fraction=0.1", False),  # the teacher trains on every label anyway
        ("trainer.epochs=9", False),  # the student's epochs
        ("trainer.eval_every=5", False),  # the teacher validates every epoch whatever the student does
        ("method=dkd", False),
    ],
)
def test_teacher_cache_key_covers_what_changes_the_teacher_and_nothing_else(compose, override, changes):
    from types import SimpleNamespace

    from gendd_framework.stages import teacher_cache_key

    def key(overrides):
        return teacher_cache_key(SimpleNamespace(cfg=compose(overrides)))

    assert (key([override]) != key([])) == changes


GENDD_RECIPES = sorted(
    p.relative_to(ROOT / "conf" / "experiment").with_suffix("").as_posix()
    for p in (ROOT / "conf" / "experiment").rglob("*gendd*.yaml")
    if not p.name.startswith("_")
)


@pytest.mark.parametrize("experiment", GENDD_RECIPES)
def test_sampler_head_and_objective_groups_swap_cleanly_on_every_gendd_recipe(compose, experiment):
    from gendd_framework import config as config_lib

    cfg = config_lib.apply_recipe(compose([f"experiment={experiment}", "method/sampler=ddim"]))
    config_lib.validate(cfg)
    assert cfg.method.sampler.name == "ddim" and "temperature" not in cfg.method.sampler  # nothing inherited
    ddpm = config_lib.apply_recipe(compose([f"experiment={experiment}"]))
    assert ddpm.method.sampler.name == "ddpm" and ddpm.method.head.name == "mlp_adaln"
    assert ddpm.method.objective.name == "gaussian_diffusion"


def test_the_run_log_file_has_the_epoch_lines(tmp_path, cache_dir):
    res = cli(*TINY, "teacher.train.epochs=3", "trainer.epochs=2", "trainer.progress=true",
              f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, cache=cache_dir)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    log = (tmp_path / "run" / "gendd-train.log").read_text()
    assert "distill epoch 1/2" in log and "distill epoch 2/2" in log
    assert "\r" not in res.stderr  # no progress bar when stderr is not a terminal


def test_command_line_method_values_win_over_per_recipe_values(compose):
    from gendd_framework import config as config_lib

    experiment = "experiment=cifar100/gendd_resnet32x4_resnet8x4"
    recipe_only = config_lib.apply_recipe(compose([experiment]))
    assert recipe_only.method.lam == 0.7  # the pair's published value
    overrides = [experiment, "method.lam=0.5", "method/sampler=euler"]
    cfg = config_lib.apply_recipe(compose(overrides), overrides)
    assert cfg.method.lam == 0.5 and cfg.method.sampler.name == "euler"
    imagenet = [
        "experiment=imagenet/gendd_resnet34_resnet18",
        "method/objective=flow",
        "method/sampler=euler",
    ]
    cfg = config_lib.apply_recipe(compose(imagenet), imagenet)
    assert cfg.method.sampler.steps == 4  # the recipe's 64 DDPM steps do not leak into a chosen sampler
    assert "per_recipe" not in cfg.method


def test_the_teacher_does_not_depend_on_the_students_eval_every(compose, monkeypatch, tmp_path):
    import torch

    weights = []
    for i, every in enumerate((1, 5)):
        monkeypatch.setenv("GENDD_CACHE_DIR", str(tmp_path / f"cache{i}"))
        overrides = ["method=ce", *TINY, "teacher.train.epochs=6", f"trainer.eval_every={every}"]
        summary = run(compose(overrides), tmp_path / f"run{i}")
        weights.append(torch.load(summary["teacher"]["source"].split(":", 1)[1], weights_only=True))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
