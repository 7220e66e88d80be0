"""Every bad config fails before any work with one line naming the key, the value and what is allowed.

Each case runs the real pipeline on the composed config with a fresh teacher cache, so a check that
came too late would first train (and cache) a teacher; the test then finds checkpoints, `train/loss`
rows or cache files. Value checks live in `config_checks.RULES`; registry names, kwargs, shapes, files
and `trainer.select` are checked when `preflight` builds every component, and values only a running
method checks when preflight runs it once (dry_run.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from gendd_framework import config_checks
from gendd_framework.engine.trainer import TrainerConfig
from gendd_framework.errors import ConfigError
from gendd_framework.pipeline import run

NO_FAST = ("trainer.progress=false",)  # for overrides that FAST's `teacher.train.epochs=3` would break


def case(case_id: str, overrides: list[str], *expected: str, fast: bool = True):
    return pytest.param(overrides, expected, fast, id=case_id)


# caught by config.validate (value rules and cross-key checks)
VALUE_CASES = [
    case("epochs-negative", ["trainer.epochs=-1"], "'trainer.epochs' = -1: must be an integer >= 1"),
    case("epochs-zero", ["trainer.epochs=0"], "'trainer.epochs' = 0: must be an integer >= 1"),
    case("epochs-float", ["trainer.epochs=1.5"], "'trainer.epochs' = 1.5: must be an integer >= 1"),
    case("epochs-string", ['trainer.epochs="3"'], "'trainer.epochs' = '3'", "not a number"),
    case("epochs-bool", ["trainer.epochs=true"], "'trainer.epochs' = true"),
    case("eval-every-zero", ["trainer.eval_every=0"], "'trainer.eval_every' = 0"),
    case("log-every-zero", ["trainer.log_every=0"], "'trainer.log_every' = 0"),
    case("accum-steps-zero", ["trainer.accum_steps=0"], "'trainer.accum_steps' = 0"),
    case("grad-clip-negative", ["trainer.grad_clip=-1"], "'trainer.grad_clip' = -1: must be null or"),
    case("precision-fp8", ["trainer.precision=fp8"], "'trainer.precision' = 'fp8'", "fp32, bf16, fp16"),
    case("device-gpu", ["trainer.device=gpu"], "'trainer.device' = 'gpu'", "cuda:N"),
    case("progress-not-bool", ["trainer.progress=maybe"], "'trainer.progress' = 'maybe'", "true or false"),
    case("resume-int", ["trainer.resume=1"], "'trainer.resume' = 1", "true or false"),
    case("select-int", ["trainer.select=3"], "'trainer.select' = 3", "<metric>/<output>"),
    case("seed-string", ["seed=abc"], "'seed' = 'abc': must be an integer"),
    case("lr-string", ["optim.lr=abc"], "'optim.lr' = 'abc': must be a number > 0"),
    case("lr-negative", ["optim.lr=-0.1"], "'optim.lr' = -0.1"),
    case("weight-decay-negative", ["optim.weight_decay=-1"], "'optim.weight_decay' = -1", ">= 0"),
    case("lr-unresolvable", ["optim.lr=${oc.env:GENDD_NO_SUCH_VAR}"], "'optim.lr' cannot be resolved"),
    case("batch-size-zero", ["data.loader.batch_size=0"], "'data.loader.batch_size' = 0"),
    case("num-workers-negative", ["data.loader.num_workers=-1"], "'data.loader.num_workers' = -1"),
    case("loader-key-typo", ["+data.loader.batchsize=8"], "data.loader.batchsize", "'batch_size'"),
    case("label-fraction", ["data.label_fraction=1.5"], "'data.label_fraction' = 1.5", "(0, 1]"),
    case("train-fraction-zero", ["data.train_fraction=0"], "'data.train_fraction' = 0"),
    case("val-fraction-negative", ["data.val_fraction=-0.1"], "'data.val_fraction' = -0.1", "[0, 1]"),
    case("teacher-model-null", ["teacher.model=null"], "'teacher.model' = null", "teacher.members"),
    case("teacher-train-epochs", ["teacher.train.epochs=0"], "'teacher.train.epochs' = 0"),
    case("teacher-train-lr", ["teacher.train.optim.lr=abc"], "'teacher.train.optim.lr' = 'abc'"),
    case("teacher-train-key-typo", ["+teacher.train.epoch=3"], "teacher.train.epoch", "'epochs'"),
    case(
        "teacher-train-incomplete",
        ["~teacher.train.sched"],
        "'teacher.train.sched' is missing",
    ),
    case(
        "ensemble-combine",
        ["teacher=digits_ensemble", "teacher.combine=mean"],
        "'teacher.combine' = 'mean'",
        "probs, logits",
    ),
    case(
        "ensemble-member-model",
        ["teacher=digits_ensemble", "teacher.members.1.model=null"],
        "'teacher.members.1.model' = null",
    ),
    case("from-run-unset", ["teacher=from_run"], "teacher.run_dir", "'???'", fast=False),
    case("stages-empty", ["stages=[]"], "'stages' = []", "non-empty list"),
    case("stage-not-a-name", ["stages=[teacher,{x:1}]"], "'stages.1'", "stage name"),
    case("pretrain-without-config", ["stages=[teacher,pretrain,distill]"], "'pretrain' is missing"),
    case(
        "pretrain-epochs",
        ["experiment=digits/gendd_pretrain", "pretrain.epochs=0"],
        "'pretrain.epochs' = 0",
    ),
    case("pretrain-handover", ["experiment=digits/gendd_pretrain", "pretrain.handover=first"], "handover"),
    case("logger-not-named", ["logger.backends=[3]"], "'logger.backends.0' = 3"),
    case("unknown-top-level-key", ["+trainerr.epochs=1"], "'trainerr'", "did you mean 'trainer'"),
    case("unknown-trainer-key", ["+trainer.epoch=3"], "'trainer.epoch'", "did you mean 'epochs'"),
]

# caught when pipeline.preflight builds every component (registry names, kwargs, shapes, files, select)
PREFLIGHT_CASES = [
    case("method-kwarg-typo", ["+method.temprature=2"], "temprature", "did you mean 'temperature'"),
    case("method-name", ["method.name=kdd"], "kdd", "'kd'"),
    case("student-name", ["student.name=resnet99"], "resnet99", "Did you mean"),
    case("loss-term-name", ["method=distill", "method.losses=[{name:kd_kll}]"], "kd_kll", "'kd_kl'"),
    case(
        "loss-term-shapes",
        ["method=distill", "method.losses=[{name:feature_mse}]"],
        "feature_mse",
        "feature shapes",
    ),
    case("optimizer-name", ["optim.name=adamm"], "adamm", "'adamw'"),
    case("scheduler-name", ["sched.name=cosin"], "cosin", "'cosine'"),
    case("stage-name", ["stages=[teacher,distil]"], "distil", "'distill'"),
    case("tokenizer-name", ["method=gendd", "method.tokenizer.name=splitt"], "splitt", "'split'"),
    case("token-dim-shape", ["method=gendd", "method.tokenizer.token_dim=100"], "token_dim", "100"),
    case("data-path", ["data=cifar100", "data.root=/nonexistent"], "/nonexistent"),
    case("teacher-weights-file", ["teacher.weights=/nonexistent.pt"], "/nonexistent.pt"),
    case("select-unknown-output", ["trainer.select=acc/nope"], "acc/nope"),
    case("logger-name", ["logger.backends=[{name:jsonll}]"], "jsonll", "'jsonl'"),
    # raised only when the method runs (GenDD's contraction): preflight's dry run reaches it
    case("gendd-lam-range", ["method=gendd", "method.lam=1.5"], "method 'gendd'", "lambda", "1.5"),
]


@pytest.fixture
def fresh_cache(compose, tmp_path, monkeypatch) -> Path:
    """An empty GENDD_CACHE_DIR: a teacher would have to be trained (and cached) before a late check."""
    path = tmp_path / "cache"
    monkeypatch.setenv("GENDD_CACHE_DIR", str(path))
    return path


def assert_nothing_trained(run_dir: Path, cache: Path) -> None:
    assert not (run_dir / "checkpoints").exists(), "a stage trained before the error"
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        assert not [r for r in rows if "train/loss" in r], "training steps ran before the error"
    written = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert not written, f"cache files written before the error: {written}"


@pytest.mark.parametrize(("overrides", "expected", "fast"), VALUE_CASES + PREFLIGHT_CASES)
def test_bad_config_fails_before_work_with_one_line(
    compose, fresh_cache, tmp_path, overrides, expected, fast
):
    cfg = compose(overrides) if fast else compose([*NO_FAST, *overrides], fast=())
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        run(cfg, run_dir)
    message = str(info.value)
    assert "\n" not in message, message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert_nothing_trained(run_dir, fresh_cache)


def test_there_are_enough_cases():
    assert len(VALUE_CASES) + len(PREFLIGHT_CASES) >= 30


def test_every_trainer_field_has_a_value_rule():
    """A new TrainerConfig field must get a rule, or a wrong type would reach the loop unchecked."""
    ruled = {r.key.split(".", 1)[1] for r in config_checks.RULES if r.key.startswith("trainer.")}
    assert {f.name for f in dataclasses.fields(TrainerConfig)} | {"device"} <= ruled


def test_shipped_defaults_pass_the_value_rules(compose):
    config_checks.check_values(compose(fast=()))


@pytest.mark.parametrize(
    ("value", "shown"),
    [(None, "null"), (True, "true"), ("3", "'3' (a quoted string, not a number)"), ("a\nb", "'a\\nb'")],
)
def test_values_are_shown_on_one_line_as_written(value, shown):
    assert config_checks.show(value) == shown


def test_rule_wildcards_name_the_item(compose):
    cfg = compose(["teacher=digits_ensemble", "+teacher.members.2.train={epochs:0}"])
    with pytest.raises(ConfigError, match=r"^config key 'teacher.members.2.train.epochs' = 0: "):
        config_checks.check_values(cfg)
    with open_dict(cfg):
        cfg.teacher.train = None
        for member in cfg.teacher.members:
            member.train = None
    config_checks.check_values(cfg)  # no recipe at all: nothing to train, nothing to require
