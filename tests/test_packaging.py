"""A non-editable install carries the Hydra configs: the wheel holds every top-level conf/ file under
gendd_framework/conf/, and the unpacked package finds and composes them without the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "conf")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel offline (no deps, no build isolation) from a copy of the project, so the build
    leaves nothing (build/, *.egg-info) in the working tree."""
    work = tmp_path_factory.mktemp("packaging")
    project = work / "project"
    project.mkdir()
    for name in BUILD_INPUTS:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, project / name)
        elif src.is_file():
            shutil.copy2(src, project / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", project / "src", symlinks=True, ignore=ignore)
    out = work / "dist"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    result = subprocess.run(
        [*cmd, "-q", str(project), "-w", str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("gendd_framework-*.whl")
    return path


def test_wheel_ships_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "gendd_framework/conf/train.yaml" in names
    assert "gendd_framework/conf/method/dkd.yaml" in names
    assert "gendd_framework/analysis/published_recipes.yaml" in names  # gendd-report reads it at run time
    expected = {
        f"gendd_framework/conf/{p.relative_to(ROOT / 'conf').as_posix()}"
        for p in (ROOT / "conf").rglob("*.yaml")
    }
    assert expected - names == set()
    assert "gendd_framework/cli/train.py" in names


def test_unpacked_wheel_finds_and_composes_its_configs(wheel, tmp_path):
    site = tmp_path / "a" / "b" / "site-packages"  # deep enough that no parent holds a conf/ folder
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import gendd_framework.cli as cli, gendd_framework.plugins as plugins\n"
        "from hydra import compose, initialize_config_dir\n"
        "print(cli.__file__); print(cli.config_dir()); print(plugins.project_root())\n"
        "with initialize_config_dir(config_dir=str(cli.config_dir()), version_base='1.3'):\n"
        "    cfg = compose(config_name='train', overrides=['experiment=digits/gendd'])\n"
        "print(cfg.method.name)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    module, conf, project, method = result.stdout.split()
    assert Path(module).is_relative_to(site) and Path(conf) == site / "gendd_framework" / "conf"
    assert project == "None" and method == "gendd"
