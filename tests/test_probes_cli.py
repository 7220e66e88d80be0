"""`gendd-probe` and the `probe` stage on tiny real digits runs: probe.json + pictures, the stage and
the CLI agree exactly, CNN and ViT students are probed, an MLP's Grad-CAM is skipped with one line,
bad settings fail with one line naming the key."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gendd_framework.analysis.probes.cli import main, run_cli
from gendd_framework.analysis.probes.settings import ProbeSettings, parse_settings
from gendd_framework.analysis.probes.stage import probe_stage
from gendd_framework.cli import config_dir
from gendd_framework.errors import ConfigError

BIN = Path(sys.executable).parent
TINY = ["trainer.epochs=1", "teacher.train.epochs=3", "data.train_fraction=0.3", "trainer.progress=false"]
PICTURES = ("probe_cam.png", "probe_reliability.png", "probe_agreement.png")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def train(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    from hydra import compose, initialize_config_dir

    from gendd_framework.pipeline import run

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, *overrides])
    path = tmp_path_factory.mktemp("probe") / name
    run(cfg, path)
    return path


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, cache_dir) -> Path:
    return train(
        tmp_path_factory,
        "cnn",
        ["experiment=digits/transfer_cnn", "method=kd", "stages=[teacher,distill,{name:probe,images:120}]"],
    )


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, cache_dir) -> Path:
    return train(
        tmp_path_factory, "vit", ["experiment=digits/transfer_cnn", "student=digits_vit", "method=kd"]
    )


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory, cache_dir) -> Path:
    return train(tmp_path_factory, "mlp", ["experiment=digits/transfer", "method=ce"])


def test_stage_writes_probe_json_pictures_and_its_summary_record(cnn_run):
    report = json.loads((cnn_run / "probe.json").read_text())
    summary = json.loads((cnn_run / "summary.json").read_text())
    assert report["images"] == 120 and report["skipped"] == {} and report["stage"] == "distill"
    assert summary["probe"]["metrics"] == report["metrics"] and summary["probe"]["file"] == "probe.json"
    assert report["settings"]["images"] == 120
    assert report["settings"]["adversarial"]["step_size"] == pytest.approx(2.5 * 0.25 / 5)  # resolved
    assert report["details"]["localization"]["student_layer"] == "features.10"  # last stage: 2x2 map
    for probe in ("localization", "adversarial", "invariance", "corruption", "calibration"):
        assert any(k.startswith(f"{probe}/") for k in report["metrics"]), probe
        assert report["seconds"][probe] >= 0
    assert 0 <= report["metrics"]["adversarial/fooling_rate"] <= 100
    for name in PICTURES:
        assert (cnn_run / "plots" / name).stat().st_size > 1000


def test_cli_reproduces_the_stage_exactly(cnn_run):
    before = json.loads((cnn_run / "probe.json").read_text())
    (result,) = run_cli([str(cnn_run), "images=120", "plots=false"])
    assert result["metrics"] == before["metrics"]  # same best-on-val weights, images and seeds
    assert json.loads((cnn_run / "probe.json").read_text())["predictor"] in (
        "student model",
        "method.export()",
    )


def test_vit_and_mlp_students_with_a_control(vit_run, mlp_run, cnn_run):
    vit, mlp = run_cli([str(vit_run), str(mlp_run), f"control={cnn_run}", "images=100", "plots=false"])
    assert vit["skipped"] == {}
    assert "localization/win_rate_vs_control" in vit["metrics"]
    report = json.loads((vit_run / "probe.json").read_text())
    assert report["details"]["localization"]["student_layer"] == "blocks.5:input"
    assert report["control"] == str(cnn_run)
    reason = mlp["skipped"]["localization"]
    assert "\n" not in reason and "MLP" in reason
    assert set(mlp["skipped"]) == {"localization"} and "adversarial/fooling_rate" in mlp["metrics"]


def test_a_teacher_free_method_is_probed_against_the_runs_teacher(tmp_path_factory, cache_dir):
    """Mean teacher's `teacher` is its own EMA model (the predictor it deploys): the probes compare it
    with the run's teacher stage, loaded from the weights its summary records, never with itself."""
    import torch

    from gendd_framework.analysis.probes.loading import load_subject

    run_dir = train(tmp_path_factory, "mean_teacher", ["experiment=digits/transfer", "method=mean_teacher"])
    subject = load_subject(run_dir, device="cpu")
    source = json.loads((run_dir / "summary.json").read_text())["teacher"]["source"]
    assert subject.describe["teacher"] == source
    cached = torch.load(source.split(":", 1)[1], weights_only=True)
    assert all(torch.equal(v, cached[k]) for k, v in subject.teacher.state_dict().items())
    assert subject.student is not subject.teacher


@pytest.mark.parametrize(
    "args,message",
    [
        (["adversarial.epss=0.1"], "did you mean 'adversarial.eps'"),
        (["adversarial.eps=-1"], "'adversarial.eps' = -1"),
        (["probes=[localisation]"], "did you mean 'localization'"),
        (["localization.topk=lots"], "'localization.topk'"),
        (["stage=born_again"], "no checkpoint for stage 'born_again'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cnn_run, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main([str(cnn_run), *args])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gendd-probe: error:") and "\n" not in err and message in err


def test_missing_run_dir_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere")])
    assert "run directory not found" in capsys.readouterr().err


def test_entry_points_answer_help_without_loading_torch():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in (
        [str(BIN / "gendd-probe"), "--help"],
        [sys.executable, "-m", "gendd_framework.analysis.probes", "-h"],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0 and "usage: gendd-probe" in done.stdout


def test_stage_arguments_are_the_settings(compose, tmp_path):
    names = set(inspect.signature(probe_stage).parameters) - {"ctx", "split", "stage_name"}
    assert names == {f.name for f in dataclasses.fields(ProbeSettings)}
    assert parse_settings({"adversarial": {"eps": 0.5}}).adversarial.eps == 0.5
    with pytest.raises(ConfigError, match="stage 'probe'.*adversarial.steps"):
        parse_settings({"adversarial": {"steps": "many"}}, where="stage 'probe'")
    from gendd_framework.pipeline import run

    cfg = compose(["stages=[teacher,distill,{name:probe,epss:1}]"])
    with pytest.raises(ConfigError, match="stage 'probe' got unknown argument"):
        run(cfg, tmp_path / "run")  # refused by preflight, before any stage
    assert not (tmp_path / "run" / "summary.json").exists()
