"""docs/plugins.md's examples, run as written from a folder outside the repository: every block marked
`plugins-doc: PATH` is written to PATH there and the page's two `gendd-train` commands run on them (a
model, a dataset with an extra sample key, a teacher-free method with hooks, a loss term, a weight
schedule and a stage)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOC = ROOT / "docs" / "plugins.md"


def doc_files() -> dict[str, str]:
    """`<!-- plugins-doc: PATH -->` followed by a fenced block -> {PATH: block text}."""
    pattern = re.compile(r"<!-- plugins-doc: (\S+) -->\n```\w*\n(.*?)```", re.DOTALL)
    return dict(pattern.findall(DOC.read_text()))


def doc_commands() -> list[list[str]]:
    block = re.search(r"<!-- plugins-doc-commands -->\n```bash\n(.*?)```", DOC.read_text(), re.DOTALL)
    return [line.split() for line in block.group(1).splitlines() if line.strip()]


def rows(run_dir: Path, stage: str = "distill") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == stage and "train/loss" in r]


def test_every_python_example_of_the_page_is_run():
    files = doc_files()
    python_blocks = DOC.read_text().count("```python")
    assert python_blocks == sum(p.endswith(".py") for p in files) == 5
    assert {p.split("/")[0] for p in files} == {"my_plugins", "my_configs"}


def test_plugins_doc_examples_train_from_a_foreign_folder(tmp_path, cache_dir):
    for rel, body in doc_files().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    commands = doc_commands()
    assert [c[-1] for c in commands] == ["experiment=blobs_self", "experiment=blobs_kd"]
    env = {**os.environ, "GENDD_CACHE_DIR": cache_dir, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    fast = ["trainer.epochs=2", "trainer.progress=false"]
    procs = []
    for command, run_dir in zip(commands, ("self", "kd")):
        extra = [*fast, f"hydra.run.dir={run_dir}"] + (["teacher.train.epochs=3"] if run_dir == "kd" else [])
        argv = [str(BIN / command[0]), *command[1:], *extra]
        out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        procs.append(subprocess.Popen(argv, cwd=tmp_path, env=env, **out))  # both runs at once
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)

    # the teacher-free method, its dataset key and second view, its hook, export and the plugin stage
    summary = json.loads((tmp_path / "self" / "summary.json").read_text())
    assert "teacher" not in summary and summary["distill"]["select"] == "acc/ema"
    assert set(summary["noise_eval"]["noisy_acc"]) == {"ema", "student"}
    assert all(r["train/kl"] >= 0 for r in rows(tmp_path / "self"))
    state = torch.load(tmp_path / "self" / "checkpoints" / "distill_last.pt", weights_only=True)["method"]
    exported = torch.load(tmp_path / "self" / "student.pt", weights_only=True)
    assert set(exported) == {"body.1.weight", "body.1.bias", "fc.weight", "fc.bias"}
    assert not torch.equal(state["teacher.model.fc.weight"], state["student.model.fc.weight"])  # an EMA
    assert state["offset"].abs().sum() > 0  # the parameter set directly on the method was optimised

    # the loss term with its weight schedule, after a teacher trained on the plugin dataset
    summary = json.loads((tmp_path / "kd" / "summary.json").read_text())
    assert summary["teacher"]["test"]["acc/teacher"] > 50 and "agree/student" in summary["distill"]["test"]
    assert [r["train/weight/logit_cosine"] for r in rows(tmp_path / "kd")] == [0.0, 2.0]  # weight x schedule
    assert all(r["train/logit_cosine"] > 0 for r in rows(tmp_path / "kd"))


def test_the_plugin_stages_preflight_check_stops_a_bad_setting_before_training(tmp_path, compose):
    """The page's `noise_eval` stage declares a preflight check: sigma < 0 fails in preflight, named,
    before the distill stage trains (no checkpoint written)."""
    from gendd_framework import config as config_lib
    from gendd_framework.errors import ConfigError
    from gendd_framework.pipeline import run

    for rel, body in doc_files().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    plugin = str(tmp_path / "my_plugins" / "noise_eval.py")
    base = [f"plugins=[{plugin}]", "method=ce", "trainer.epochs=1"]
    cfg = compose([*base, "stages=[distill,{name:noise_eval,sigma:-1}]"])
    with pytest.raises(ConfigError, match=r"stage 'noise_eval': sigma=-1 must be >= 0"):
        run(config_lib.apply_recipe(cfg), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    cfg = compose([*base, "stages=[{name:noise_eval}]"])
    with pytest.raises(ConfigError, match="needs a training stage before it"):
        run(config_lib.apply_recipe(cfg), tmp_path / "run2")
