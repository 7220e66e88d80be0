"""Stages declare their own preflight check and evaluation rebuild (`stage_hooks`): a plugin stage is
checked before any stage trains, with its settings and what the earlier stages' checks built, and
`gendd-eval` rebuilds any stage that declares how (one-line error for one that does not)."""

from __future__ import annotations

import pytest
import torch

from gendd_framework import config as config_lib
from gendd_framework.cli.evaluate import RunEvaluator
from gendd_framework.errors import ConfigError
from gendd_framework.pipeline import run
from gendd_framework.plugins import load_plugins
from gendd_framework.registry import STAGES
from gendd_framework.stages import stage_hooks
from gendd_framework.stages.distill import distill_stage, rebuild_distill

TINY = ["trainer.epochs=1", "data.train_fraction=0.3", "method=kd"]

load_plugins()


def register_audit_stage(seen: list) -> None:
    """A plugin stage whose preflight refuses `threshold` outside (0, 1) and records what it got."""

    def check_audit(check, threshold: float = 0.5, stage_name: str = "audit") -> None:
        seen.append((check.stage, threshold, sorted(check.models), type(check.models["method"]).__name__))
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"stage '{stage_name}': threshold={threshold} must lie in (0, 1)")

    @STAGES.register("audit")
    @stage_hooks(preflight=check_audit)
    def audit_stage(ctx, threshold: float = 0.5, stage_name: str = "audit") -> dict:
        seen.append(("ran", threshold))
        return {"threshold": threshold}


def test_a_plugin_stages_preflight_runs_before_any_stage_trains(compose, tmp_path):
    seen: list = []
    register_audit_stage(seen)
    bad = config_lib.apply_recipe(compose([*TINY, "stages=[teacher,distill,{name:audit,threshold:1.5}]"]))
    with pytest.raises(ConfigError, match=r"stage 'audit': threshold=1.5 must lie in \(0, 1\)"):
        run(bad, tmp_path / "bad")
    assert seen == [("audit", 1.5, ["method", "student", "teacher"], "KDMethod")]
    assert not (tmp_path / "bad" / "checkpoints").exists()  # nothing trained, not even the teacher
    seen.clear()
    good = config_lib.apply_recipe(compose([*TINY, "stages=[teacher,distill,{name:audit,threshold:0.25}]"]))
    summary = run(good, tmp_path / "good")
    assert seen == [("audit", 0.25, ["method", "student", "teacher"], "KDMethod"), ("ran", 0.25)]
    assert summary["audit"] == {"threshold": 0.25}


def test_a_stage_without_a_preflight_check_is_only_checked_for_its_keywords(compose, tmp_path):
    @STAGES.register("plain_plugin")
    def plain_plugin(ctx, level: int = 1) -> dict:
        return {"level": level}

    cfg = config_lib.apply_recipe(compose([*TINY, "stages=[teacher,distill,{name:plain_plugin,levle:2}]"]))
    with pytest.raises(ConfigError, match="levle"):
        run(cfg, tmp_path)


def test_gendd_eval_rebuilds_a_plugin_training_stage_through_its_declared_rebuild(compose, tmp_path):
    calls = []

    def rebuild(cfg, stage_key, facts):
        calls.append(stage_key)
        return rebuild_distill(cfg, stage_key, facts)

    @STAGES.register("second_distill")
    @stage_hooks(rebuild=rebuild)
    def second_distill(ctx, stage_name: str = "second_distill") -> dict:
        return distill_stage(ctx, stage_name)

    cfg = config_lib.apply_recipe(
        compose([*TINY, "stages=[teacher,distill,{name:second_distill,stage_name:again}]"])
    )
    summary = run(cfg, tmp_path)
    result = RunEvaluator(tmp_path, stage="again", device="cpu").evaluate(split="test")
    assert calls == ["again"]
    assert result["acc/student"] == pytest.approx(summary["again"]["test"]["acc/student"], abs=1e-9)
    # a stage that declares no rebuild cannot be re-evaluated, said in one line
    STAGES.add("no_rebuild", lambda ctx, stage_name="no_rebuild": distill_stage(ctx, stage_name))
    cfg = config_lib.apply_recipe(compose([*TINY, "stages=[teacher,{name:no_rebuild,stage_name:nr}]"]))
    run(cfg, tmp_path / "nr")
    with pytest.raises(ConfigError, match=r"^stage 'nr' \(no_rebuild\) declares no evaluation rebuild"):
        RunEvaluator(tmp_path / "nr", stage="nr", device="cpu").build_method()


def test_the_rebuilt_method_is_what_the_stage_trained(compose, tmp_path):
    """gendd-eval's rebuild has exactly the trained method's state-dict keys and shapes (CRD's banks at
    the full split size, not the preflight stand-in's) and loads its best weights."""
    cfg = config_lib.apply_recipe(compose([*TINY, "method=crd", "experiment=digits/transfer_cnn"]))
    run(cfg, tmp_path)
    evaluator = RunEvaluator(tmp_path, stage="distill", device="cpu")
    rebuilt = evaluator.build_method()
    saved = evaluator.state
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {
        k: tuple(v.shape) for k, v in saved.items()
    }
    assert all(torch.equal(rebuilt.state_dict()[k].cpu(), v.cpu()) for k, v in saved.items())
