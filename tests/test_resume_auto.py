"""trainer.resume=auto: runs and sweeps that resume themselves after a kill, a preemption or a time-out.

The subprocess tests crash `gendd-train` at exact points with the test hook of engine/checkpoint.py
($GENDD_TEST_KILL_FILE): a launch that reaches the point named on the file's first line removes the
line and sends itself the signal (SIGKILL, or SIGUSR2 = submitit's preemption signal), so the same
command re-launched runs on to the next point."""

from __future__ import annotations

import ast
import json
import logging
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from gendd_framework import launchers, pipeline
from gendd_framework.cli import config_dir
from gendd_framework.engine.trainer import Trainer
from gendd_framework.errors import ConfigError
from gendd_framework.pipeline import run

BIN = Path(sys.executable).parent
SRC = Path(__file__).resolve().parents[1] / "src" / "gendd_framework"
TINY = ["method=kd", "trainer.epochs=2", "data.train_fraction=0.3"]
# the teacher recipe of test_sweeps/test_launchers: the session's teacher cache serves them all
SWEEP_JOB = ["method=kd", "teacher.train.epochs=3", "data.train_fraction=0.3", "trainer.progress=false"]
SUBMITIT = launchers.installed("hydra_plugins.hydra_submitit_launcher")
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/[^']+' is validated against:UserWarning")


def gendd_train(*args: str, cwd: Path, cache: str, kill_file: Path | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "GENDD_CACHE_DIR": cache}
    env.pop("GENDD_TEST_KILL_FILE", None)
    if kill_file is not None:
        env["GENDD_TEST_KILL_FILE"] = str(kill_file)
    return subprocess.run(
        [str(BIN / "gendd-train"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def parse_rows(text: str) -> list[dict]:
    """JSONL records without the wall-clock field."""
    return [{k: v for k, v in json.loads(x).items() if k != "epoch_time_s"} for x in text.splitlines()]


def rows(run_dir: Path) -> list[dict]:
    return parse_rows((run_dir / "metrics.jsonl").read_text())


def by_stage(records: list[dict]) -> dict[str, list[dict]]:
    """Each stage's records in order (a resumed run re-evaluates a finished stage and appends its test
    row again after dropping the earlier one, so only the order across stages can differ)."""
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["stage"], []).append(r)
    return out


def assert_no_duplicate_rows(records: list[dict]) -> None:
    kinds = Counter((r["stage"], r["epoch"], min(k.split("/")[0] for k in r if "/" in k)) for r in records)
    assert max(kinds.values()) == 1, [k for k, n in kinds.items() if n > 1]


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- in process: the rule, start-up debris, a finished run ---------------------------------------------


def test_resume_takes_true_false_or_auto(compose, tmp_path):
    with pytest.raises(ConfigError, match=r"'trainer.resume' = 'maybe'.*true or false, or auto"):
        run(compose([*TINY, "trainer.resume=maybe"]), tmp_path)
    with pytest.raises(ConfigError, match="holds no earlier run"):  # true still needs a run to continue
        run(compose([*TINY, "trainer.resume=true"]), tmp_path / "empty")


def test_auto_in_a_folder_with_only_start_up_debris_starts_fresh(compose, tmp_path, caplog):
    reference = tmp_path / "reference"
    run(compose(TINY), reference)
    debris = tmp_path / "debris"  # what a job killed during start-up or its first epoch leaves
    (debris / ".hydra").mkdir(parents=True)
    (debris / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (debris / "gendd-train.log").write_text("[...] killed\n")
    (debris / "config_resolved.yaml").write_text("method: {name: kd, temperature: 9}\n")  # not compared
    (debris / "checkpoints").mkdir()
    (debris / "checkpoints" / ".distill_last.pt.abcd1234.tmp").write_bytes(b"half a checkpoint")
    stale = {"stage": "distill", "epoch": 1, "step": 5, "train/loss": 9.0}
    (debris / "metrics.jsonl").write_text(json.dumps(stale) + '\n{"stage": "distill", "ep')
    with caplog.at_level(logging.INFO, logger="gendd_framework"):
        run(compose([*TINY, "trainer.resume=auto"]), debris)
    assert f"resume=auto: no checkpoint in {debris}, starting fresh" in caplog.text
    assert same_weights(reference / "student.pt", debris / "student.pt")
    # the killed attempt's rows are gone (the teacher came from the cache the reference run filled)
    assert rows(debris) == [r for r in rows(reference) if r["stage"] != "teacher"]
    assert not list((debris / "checkpoints").glob("*.tmp"))


def test_a_finished_run_relaunched_with_auto_does_nothing(compose, tmp_path, monkeypatch, caplog):
    run(compose(TINY), tmp_path)
    files = ("summary.json", "metrics.jsonl", "student.pt", "checkpoints/distill_last.pt")
    before = {name: (tmp_path / name).read_bytes() for name in files}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a finished run built its data again")

    monkeypatch.setattr(pipeline, "build_data", no_rebuild)
    with caplog.at_level(logging.INFO, logger="gendd_framework"):
        summary = run(compose([*TINY, "trainer.resume=auto", "trainer.device=cpu"]), tmp_path)
    assert "already finished" in caplog.text
    assert summary == json.loads(before["summary.json"])
    assert {name: (tmp_path / name).read_bytes() for name in files} == before
    # a changed config is refused, as with resume=true
    with pytest.raises(ConfigError, match=r"trainer.resume=auto with a changed config \(method.temperature"):
        run(compose([*TINY, "trainer.resume=auto", "method.temperature=2"]), tmp_path)
    # a later failed launch in the folder (failed.json): not finished, so every stage is restored at its
    # last epoch and evaluated again, without training an epoch; success clears failed.json
    (tmp_path / "failed.json").write_text(json.dumps({"error": "ConfigError: a typo"}))
    monkeypatch.undo()

    def no_training(self, total_steps):
        raise AssertionError(f"stage {self.stage} trained epoch {self.epoch + 1} again")

    monkeypatch.setattr(Trainer, "train_one_epoch", no_training)
    again = run(compose([*TINY, "trainer.resume=auto"]), tmp_path)
    assert not (tmp_path / "failed.json").exists()
    assert (
        again["distill"]["test"] == summary["distill"]["test"] and again["objective"] == summary["objective"]
    )
    assert (tmp_path / "student.pt").read_bytes() == before["student.pt"]
    assert by_stage(rows(tmp_path)) == by_stage(parse_rows(before["metrics.jsonl"].decode()))


def test_requeuing_launchers_default_their_jobs_to_auto():
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    ray = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launchers.job_resume(slurm, ["seed=1"], False) == "auto"
    assert launchers.job_resume(ray, [], False) == "auto"
    assert launchers.job_resume(joblib, [], False) is False  # no requeue: the user decides
    assert launchers.job_resume(slurm, ["trainer.resume=false"], False) is False  # said on the command line
    assert launchers.job_resume(slurm, ["++trainer.resume=true"], True) is True
    presets = config_dir() / "hydra" / "launcher"
    assert yaml.safe_load((presets / "submitit_slurm.yaml").read_text())["max_num_timeout"] > 0
    assert yaml.safe_load((presets / "ray.yaml").read_text())["ray"]["remote"]["max_retries"] > 0


def test_the_sweep_callback_is_found_without_importing_the_cli():
    from hydra.utils import get_class

    from gendd_framework.sweep_callback import SweepReport

    train = yaml.safe_load((config_dir() / "train.yaml").read_text())
    target = train["hydra"]["callbacks"]["sweep_report"]["_target_"]
    assert get_class(target) is SweepReport
    tree = ast.parse((SRC / "sweep_callback.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "gendd_framework.cli" not in imported
    # a re-launch that adds trainer.resume=auto keeps the job folder names of the first launch
    assert "trainer.resume" in train["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]


# -- subprocesses: kill -9 at seeded points, a killed sweep, a preempted submitit job ------------------


def test_killed_at_seeded_points_and_relaunched_with_auto_ends_as_an_uninterrupted_run(tmp_path):
    args = [*TINY, "teacher.train.epochs=2", "trainer.progress=false"]
    full = gendd_train(*args, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path, cache=str(tmp_path / "c1"))
    assert full.returncode == 0, full.stderr[-3000:]
    reference = rows(tmp_path / "full")
    per_epoch = next(r["step"] for r in reference if r["stage"] == "teacher")
    rng = random.Random(18)
    points = [
        "preflight",  # config_resolved.yaml written, no checkpoint yet: start-up debris only
        f"teacher:step:{rng.randint(per_epoch + 1, 2 * per_epoch)}",  # after the teacher's first checkpoint
        "save:distill_last.pt",  # mid-save: a stale temp file, no distill checkpoint
        "distill:epoch:2",  # epoch 2 evaluated and logged, its checkpoint not written
    ]
    kill_file = tmp_path / "kills"
    kill_file.write_text("\n".join(points) + "\n")
    cut = tmp_path / "cut"
    command = [*args, "trainer.resume=auto", f"hydra.run.dir={cut}"]
    for point in points:
        res = gendd_train(*command, cwd=tmp_path, cache=str(tmp_path / "c2"), kill_file=kill_file)
        assert res.returncode == -9, f"not killed at {point}: {res.stderr[-2000:]}"
    last = gendd_train(*command, cwd=tmp_path, cache=str(tmp_path / "c2"), kill_file=kill_file)
    assert last.returncode == 0, last.stderr[-3000:]
    assert kill_file.read_text() == ""  # every point was reached

    assert same_weights(tmp_path / "full" / "student.pt", cut / "student.pt")
    teachers = [next((tmp_path / c / "teachers").glob("*.pt")) for c in ("c1", "c2")]
    assert same_weights(*teachers)
    assert by_stage(rows(cut)) == by_stage(reference)
    assert_no_duplicate_rows(rows(cut))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "full", cut))
    for key in ("teacher", "distill", "objective", "export"):
        assert json.dumps(a[key]).replace("/c1/", "/c2/") == json.dumps(b[key]), key
    log = (cut / "gendd-train.log").read_text()
    assert f"resume=auto: no checkpoint in {cut}, starting fresh" in log
    assert re.search(r"resume=auto: continuing stage teacher from \S+ at epoch 1/2", log)
    assert "removed 1 stale checkpoint temp file(s)" in log
    final = log.rsplit("test hook", 1)[1]
    assert re.search(r"resume=auto: continuing stage distill from \S+ at epoch 1/2", final)
    assert "teacher epoch" not in final  # the finished teacher stage was not trained again


def test_a_killed_sweep_relaunched_with_the_same_command_finishes_every_job(tmp_path, cache_dir):
    """Two jobs (2 and 3 epochs): the first launch finishes job 0 and is killed in job 1's last epoch
    (a point only job 1 reaches); the same command again skips job 0 and resumes job 1."""
    sweep = tmp_path / "sweep"
    command = ["-m", *SWEEP_JOB, "trainer.epochs=2,3", "trainer.resume=auto", f"hydra.sweep.dir={sweep}"]
    kill_file = tmp_path / "kills"
    kill_file.write_text("distill:epoch:3\n")
    first = gendd_train(*command, cwd=tmp_path, cache=cache_dir, kill_file=kill_file)
    assert first.returncode == -9, first.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name[:2] + j.name[-16:] for j in jobs] == ["0_trainer.epochs=2", "1_trainer.epochs=3"]
    assert (jobs[0] / "summary.json").exists() and not (jobs[1] / "summary.json").exists()
    finished_before = (jobs[0] / "summary.json").read_bytes()

    again = gendd_train(*command, cwd=tmp_path, cache=cache_dir, kill_file=kill_file)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 finished, 0 failed, 0 missing" in again.stdout
    report = json.loads((sweep / "sweep_summary.json").read_text())
    assert report == {"jobs": 2, "finished": [j.name for j in jobs], "failed": {}, "missing": []}
    assert (jobs[0] / "summary.json").read_bytes() == finished_before  # skipped, untouched
    assert "already finished" in (jobs[0] / "gendd-train.log").read_text()
    assert "resume=auto: continuing stage distill from" in (jobs[1] / "gendd-train.log").read_text()
    for job, epochs in zip(jobs, (2, 3)):
        records = rows(job)
        assert_no_duplicate_rows(records)
        assert [r["epoch"] for r in records if r["stage"] == "distill" and "train/loss" in r] == [
            *range(1, epochs + 1)
        ]
    from gendd_framework.analysis.report import collect, scan

    assert [j.status for j in scan(sweep)] == ["finished", "finished"] and len(collect(sweep)) == 2


@pytest.mark.skipif(not SUBMITIT, reason="hydra-submitit-launcher is not installed (extra: slurm)")
def test_a_preempted_submitit_job_is_requeued_into_its_folder_and_resumes(tmp_path, cache_dir):
    """submitit_local runs SLURM's code path: SIGUSR2 (what SLURM sends on preemption or before the
    time limit) makes submitit call the launcher's checkpoint() and requeue the pickled job. The sweep
    dir is the default `multirun/${now:...}`: the requeued job must land in the same folder."""
    kill_file = tmp_path / "kills"
    kill_file.write_text("distill:epoch:2 USR2\n")
    res = gendd_train(
        "-m", *SWEEP_JOB, "trainer.epochs=3", "hydra/launcher=submitit_local", "trainer.device=cpu",
        cwd=tmp_path, cache=cache_dir, kill_file=kill_file,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert kill_file.read_text() == ""
    (sweep,) = (tmp_path / "multirun").iterdir()  # one sweep folder: ${now:} was not evaluated again
    (job,) = [p for p in sweep.iterdir() if (p / ".hydra").is_dir()]
    submitit_log = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "this job is preempted" in submitit_log and "Requeued job" in submitit_log
    assert yaml.safe_load((job / "config_resolved.yaml").read_text())["trainer"]["resume"] == "auto"
    log = (job / "gendd-train.log").read_text()
    assert re.search(r"resume=auto: continuing stage distill from \S+ at epoch 1/3", log)
    records = rows(job)
    assert_no_duplicate_rows(records)
    assert [r["epoch"] for r in records if r["stage"] == "distill" and "train/loss" in r] == [1, 2, 3]
    assert json.loads((sweep / "sweep_summary.json").read_text())["finished"] == [job.name]
