"""gendd-eval: gendd-train's override dialect on a finished run, from any working directory, writing
nothing; a renamed method component is replaced, never merged with the old one's settings."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gendd_framework.cli import config_dir
from gendd_framework.cli.evaluate import compose_eval, main, merge_method, parse_args

BIN = Path(sys.executable).parent
TINY_GENDD = [
    "method=gendd",
    "trainer.epochs=1",
    "teacher.train.epochs=3",
    "data.train_fraction=0.3",
    "trainer.progress=false",
    "method.sampler.steps=5",
    "method.diffusion_batch_mul=1",
]
# one torch thread, here and in the subprocesses: on a small shared box, intra-op thread barriers
# cost GenDD's many small tensors several times the wall time
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **ONE_THREAD}
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir) -> Path:
    """One tiny supervised GenDD run (teacher from the session cache, 1 epoch, 5 DDPM steps)."""
    from hydra import compose, initialize_config_dir

    from gendd_framework.pipeline import run

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=TINY_GENDD)
    path = tmp_path_factory.mktemp("eval") / "run"
    run(cfg, path)
    return path


def distill_record(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["distill"]


def test_eval_from_another_cwd_matches_the_summary_and_writes_nothing(run_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = cli("gendd-eval", f"run_dir={os.path.relpath(run_dir, elsewhere)}", "device=cpu", cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    record = distill_record(run_dir)
    assert result["run_dir"] == str(run_dir) and result["split"] == "test" and result["stage"] == "distill"
    for key in ("acc/student", "acc/generative", "agree/generative"):  # best-on-val weights, same settings
        assert result[key] == pytest.approx(record["test"][key], abs=1e-9)
    assert result["eval_settings"] == record["eval_settings"]
    assert list(elsewhere.iterdir()) == []  # no outputs/, no .hydra/, no logs


DDIM_VAL = ["method/sampler=ddim", "method.sampler.steps=3", "method.num_sampling=2"]


@pytest.fixture(scope="module")
def ddim_val(run_dir) -> dict:
    """The new form, in-process: DDIM instead of the run's DDPM sampler, on the validation split."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main([f"run_dir={run_dir}", *DDIM_VAL, "split=val", "device=cpu"])
    return json.loads(buffer.getvalue())


def test_method_overrides_change_the_evaluation_settings(ddim_val):
    settings = ddim_val["eval_settings"]
    assert settings["sampler"] == "DDIMSampler" and settings["steps"] == 3 and settings["num_sampling"] == 2
    assert "temperature" not in settings  # the DDPM sampler's knob is not inherited by DDIM
    assert ddim_val["split"] == "val" and 0 <= ddim_val["acc/generative"] <= 100


def test_older_positional_form_still_works(run_dir, ddim_val, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    main([str(run_dir), *DDIM_VAL, "--split", "val", "--device=cpu"])
    old = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in old.items() if k != "seconds"} == {
        k: v for k, v in ddim_val.items() if k != "seconds"
    }
    assert list(tmp_path.iterdir()) == []


def test_unknown_run_dir_is_one_line_and_exit_2(tmp_path):
    res = cli("gendd-eval", f"run_dir={tmp_path / 'nope'}", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"gendd-eval: error: run directory not found: {tmp_path / 'nope'}"
    ]
    assert res.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["split=val"], "no run directory"),
        (["run_dir=RUN", "splt=val"], "unknown override 'splt=val'"),
        (["run_dir=RUN", "split=train"], "split=train"),
        (["run_dir=RUN", "method=kd"], "re-evaluates the run's own method"),
        (["run_dir=RUN", "stage=gen7"], "no checkpoint for stage 'gen7'"),
        (["run_dir=RUN", "method.num_sampling=1,2"], "Ambiguous value"),
        (["run_dir=RUN", "method.num_samplin=2"], "did you mean 'num_sampling'"),
    ],
)
def test_config_errors_exit_2_with_one_line(run_dir, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main([a.replace("RUN", str(run_dir)) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gendd-eval: error:") and message in err[0]


def test_overrides_parse_like_gendd_train():
    """Sweep job dirs hold `=` and `,`: the run dir is taken literally, the rest typed by Hydra."""
    run, overrides = parse_args(
        ["run_dir=multirun/x/0_method.temperature=2,seed=0", "method/sampler=ddim", "method.sampler.steps=20"]
    )
    assert run == "multirun/x/0_method.temperature=2,seed=0"
    cfg = compose_eval([*overrides, "++method.guidance_scale=1.5", "++method.flag=null", "split=val"])
    assert OmegaConf.to_container(cfg.method) == {
        "sampler": {"name": "ddim", "steps": 20, "eta": 0.0},
        "guidance_scale": 1.5,
        "flag": None,
    }
    assert cfg.split == "val" and cfg.stage == "distill" and cfg.device == "auto"


def test_merge_method_replaces_a_renamed_component():
    base = OmegaConf.create(
        {"name": "gendd", "num_sampling": 1, "sampler": {"name": "ddpm", "steps": 100, "temperature": 0.9}}
    )
    renamed = merge_method(base, {"sampler": {"name": "ddim", "steps": 10}})
    assert OmegaConf.to_container(renamed.sampler) == {"name": "ddim", "steps": 10}
    same = merge_method(base, {"sampler": {"name": "ddpm", "steps": 20}, "num_sampling": 4})
    assert OmegaConf.to_container(same.sampler) == {"name": "ddpm", "steps": 20, "temperature": 0.9}
    assert same.num_sampling == 4
    tweaked = merge_method(base, {"sampler": {"steps": 5}})
    assert tweaked.sampler.temperature == 0.9 and tweaked.sampler.steps == 5
    assert base.sampler.steps == 100  # the run's config is never modified
