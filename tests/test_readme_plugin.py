"""The README's plugin example, run exactly as written from a folder outside the repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_files() -> dict[str, str]:
    """`<!-- readme-plugin: PATH -->` followed by a fenced block -> {PATH: block text}."""
    text = (ROOT / "README.md").read_text()
    pattern = re.compile(r"<!-- readme-plugin: (\S+) -->\n```\w*\n(.*?)```", re.DOTALL)
    return {path: body for path, body in pattern.findall(text)}


def test_readme_plugin_example_trains_from_a_foreign_folder(tmp_path, cache_dir):
    files = readme_files()
    assert set(files) == {"my_plugins/hint_kd.py", "my_configs/method/hint_kd.yaml"}
    assert len(files["my_plugins/hint_kd.py"].splitlines()) <= 40
    for rel, body in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^gendd-train --config-dir my_configs .*$", readme, re.MULTILINE).group(0).split()
    fast = ["trainer.epochs=2", "teacher.train.epochs=3", "trainer.progress=false", "hydra.run.dir=run"]
    env = {**os.environ, "GENDD_CACHE_DIR": cache_dir, "HYDRA_FULL_ERROR": "1"}
    res = subprocess.run(
        [str(BIN / command[0]), *command[1:], *fast], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("stage") == "distill" and "train/hint" in r]
    assert len(train) == 2 and all(r["train/loss"] > r["train/ce"] for r in train)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "hint_kd" and "agree/student" in summary["distill"]["test"]
    # the warm-up is config: 5 epochs of steps, so the 2 trained epochs never reach the full weight
    resolved = (tmp_path / "run" / "config_resolved.yaml").read_text()
    assert "granularity: step" in resolved
