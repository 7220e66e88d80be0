"""End-to-end pipeline behaviour on tiny digits runs: run dir contents, teacher cache, precision, loggers."""

import json

import pytest
import torch

from gendd_framework.errors import ConfigError
from gendd_framework.pipeline import run

TINY = ["trainer.epochs=1", "data.train_fraction=0.3"]


def test_run_dir_has_metrics_summary_checkpoints_and_plot(compose, tmp_path):
    summary = run(compose(["method=kd", *TINY, "logger=tensorboard"]), tmp_path)
    for name in (
        "metrics.jsonl",
        "metrics.csv",
        "summary.json",
        "student.pt",
        "plots/curves.png",
        "checkpoints/distill_last.pt",
        "checkpoints/distill_best.pt",
    ):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    distill = [r for r in rows if r["stage"] == "distill"]
    assert {"train/loss", "train/ce", "train/kd_kl", "lr", "epoch_time_s"} <= set(distill[0])
    assert any("val/acc/student" in r for r in rows) and any("test/acc/student" in r for r in rows)
    assert summary["teacher"]["test"]["acc/teacher"] > 80
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["distill"]["test"] == summary["distill"]["test"]


def test_teacher_is_trained_once_then_reused(compose, tmp_path):
    first = run(compose(["method=ce", *TINY, "teacher.train.epochs=2"]), tmp_path / "a")
    second = run(compose(["method=ce", *TINY, "teacher.train.epochs=2"]), tmp_path / "b")
    assert first["teacher"]["source"].startswith(("trained:", "cache:"))
    assert second["teacher"]["source"].startswith("cache:")
    assert second["teacher"]["test"] == first["teacher"]["test"]


def test_missing_teacher_weights_file_is_a_clear_error(compose, tmp_path):
    missing = tmp_path / "teacher.pth"
    with pytest.raises(ConfigError, match=f"checkpoint file not found: {missing}"):
        run(compose(["method=kd", *TINY, f"teacher.weights={missing}"]), tmp_path / "run")


def test_teacher_weights_from_a_local_file_are_used(compose, tmp_path):
    from gendd_framework.models import build_model

    teacher = build_model(compose().teacher.model, num_classes=10)
    torch.save(teacher.state_dict(), tmp_path / "t.pth")
    summary = run(compose(["method=kd", *TINY, f"teacher.weights={tmp_path / 't.pth'}"]), tmp_path / "run")
    assert summary["teacher"]["source"] == str(tmp_path / "t.pth")
    assert summary["teacher"]["test"]["acc/teacher"] < 40  # random weights really were loaded


def test_bf16_autocast_runs_on_cpu_and_really_changes_the_arithmetic(compose, tmp_path):
    bf16 = run(compose(["method=kd", *TINY, "trainer.precision=bf16"]), tmp_path / "bf16")
    fp32 = run(compose(["method=kd", *TINY]), tmp_path / "fp32")

    def train_losses(path):
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in rows if r.get("stage") == "distill" and "train/loss" in r]

    low, full = train_losses(tmp_path / "bf16"), train_losses(tmp_path / "fp32")
    assert low != full  # autocast was active: bf16 matmuls round differently
    assert low[0] == pytest.approx(full[0], rel=0.05)  # ... but compute the same loss to bf16 precision
    assert abs(bf16["distill"]["test"]["acc/student"] - fp32["distill"]["test"]["acc/student"]) < 5


def test_same_config_and_seed_give_the_same_result(compose, tmp_path):
    a = run(compose(["method=kd", *TINY, "seed=3"]), tmp_path / "a")
    b = run(compose(["method=kd", *TINY, "seed=3"]), tmp_path / "b")
    run(compose(["method=kd", *TINY, "seed=4"]), tmp_path / "c")
    assert a["distill"]["val"] == b["distill"]["val"] and a["distill"]["test"] == b["distill"]["test"]
    wa = torch.load(tmp_path / "a" / "student.pt", weights_only=True)
    wc = torch.load(tmp_path / "c" / "student.pt", weights_only=True)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_bad_precision_and_stage_names_fail_early(compose, tmp_path):
    with pytest.raises(ConfigError, match="precision"):
        run(compose(["method=ce", *TINY, "trainer.precision=fp8"]), tmp_path / "a")
    with pytest.raises(ConfigError, match="unknown stage 'distil'. Did you mean: 'distill'"):
        run(compose(["method=ce", *TINY, "stages=[distil]"]), tmp_path / "b")


def test_frozen_student_classifier_keeps_its_initial_weights(compose, tmp_path):
    """`student.freeze: [classifier]` (the official unsupervised KL baseline): the fc never moves while
    the backbone trains; a one-epoch and a two-epoch run share the fc but not the backbone."""
    from gendd_framework.engine.checkpoint import load as load_checkpoint

    states = []
    for epochs in (1, 2):
        overrides = ["experiment=digits/kd_unsup_frozen_fc", *TINY, f"trainer.epochs={epochs}"]
        run(compose(overrides), tmp_path / f"e{epochs}")
        states.append(load_checkpoint(tmp_path / f"e{epochs}" / "checkpoints" / "distill_last.pt")["method"])
    fc = [k for k in states[0] if k.startswith("student.") and k.endswith("fc.weight")]
    backbone = [k for k in states[0] if k.startswith("student.") and k.endswith(".weight") and k not in fc]
    assert fc and backbone
    assert all(torch.equal(states[0][k], states[1][k]) for k in fc)
    assert not all(torch.equal(states[0][k], states[1][k]) for k in backbone)


def test_freezing_an_unknown_module_names_the_close_ones():
    from gendd_framework.models import build_model

    with pytest.raises(ConfigError, match=r"cannot freeze 'fcc'.*Did you mean: fc"):
        build_model({"name": "mlp", "in_features": 64, "hidden": [8], "freeze": ["fcc"]}, num_classes=10)
