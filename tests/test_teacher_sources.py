"""Teachers beyond one cached model: an ensemble of members, an earlier run's student (`from_run`), and
born-again generations inside one run. Tiny digits runs end to end."""

from __future__ import annotations

import json

import pytest

from gendd_framework.errors import ConfigError
from gendd_framework.pipeline import run

TINY = ["trainer.epochs=1", "data.train_fraction=0.3"]


def test_an_earlier_runs_student_teaches_the_next_run(compose, tmp_path):
    first = run(compose(["method=ce", *TINY]), tmp_path / "gen1")
    from_run = ["teacher=from_run", f"teacher.run_dir={tmp_path / 'gen1'}", "trainer.progress=false"]
    second = run(compose(["method=kd", *TINY, *from_run], fast=()), tmp_path / "gen2")
    assert second["teacher"]["source"] == f"run:{tmp_path / 'gen1' / 'student.pt'}"
    # the teacher evaluated in run 2 is exactly run 1's student (best-on-val weights, same test split)
    assert second["teacher"]["test"]["acc/teacher"] == first["distill"]["test"]["acc/student"]
    assert "agree/student" in second["distill"]["test"]


def test_from_run_without_a_finished_run_is_a_clear_error(compose, tmp_path):
    with pytest.raises(ConfigError, match="not a finished gendd-train run"):
        cfg = compose(["method=kd", *TINY, "teacher=from_run", f"teacher.run_dir={tmp_path}"], fast=())
        run(cfg, tmp_path / "r")


def test_born_again_generations_each_distil_from_the_previous_student(compose, tmp_path):
    stages = "stages=[teacher,distill,{name:born_again,stage_name:gen2},{name:born_again,stage_name:gen3}]"
    summary = run(compose(["method=kd", *TINY, stages]), tmp_path)
    assert summary["gen2"]["teacher"]["test"]["acc/teacher"] == summary["distill"]["test"]["acc/student"]
    assert summary["gen3"]["teacher"]["test"]["acc/teacher"] == summary["gen2"]["test"]["acc/student"]
    for name in ("gen2", "gen3"):
        assert (tmp_path / "checkpoints" / f"{name}_best.pt").exists()
    from gendd_framework.cli.evaluate import RunEvaluator

    again = RunEvaluator(tmp_path, stage="gen3", device="cpu").evaluate(split="test")
    assert again["acc/student"] == summary["gen3"]["test"]["acc/student"]
    assert again["agree/student"] == summary["gen3"]["test"]["agree/student"]  # vs its own teacher: gen2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} >= {"distill", "gen2", "gen3"}  # the teacher was cached


def test_repeated_stage_names_are_refused(compose, tmp_path):
    with pytest.raises(ConfigError, match="appears twice"):
        run(compose(["method=kd", *TINY, "stages=[teacher,distill,born_again,born_again]"]), tmp_path)


def test_ensemble_members_are_trained_cached_and_combined(compose, tmp_path):
    overrides = ["method=meal_v2", "teacher=digits_ensemble", *TINY, "teacher.train.epochs=2"]
    summary = run(compose(overrides), tmp_path / "a")
    teacher = summary["teacher"]
    assert teacher["combine"] == "probs"
    members = [teacher[f"member_{i}"] for i in range(3)]
    assert all(m["source"].startswith(("trained:", "cache:")) for m in members)
    # the second member differs from the first only by its seed: a different cache entry
    assert members[0]["source"].split(":", 1)[1] != members[1]["source"].split(":", 1)[1]
    again = run(compose(overrides), tmp_path / "b")
    assert all(again["teacher"][f"member_{i}"]["source"].startswith("cache:") for i in range(3))
    assert again["teacher"]["test"] == teacher["test"]
