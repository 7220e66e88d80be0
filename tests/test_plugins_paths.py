"""Plugin loading does not depend on where the code runs from: a second checkout's identical plugin files
are the same components, a different implementation under a taken name fails naming both files, and
relative plugin paths are recorded absolute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gendd_framework.errors import ConfigError
from gendd_framework.plugins import default_plugin_dirs, import_plugin, load_plugins
from gendd_framework.registry import LOSSES, METHODS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "registry" / "example_mimic.py"

load_plugins()


def copy_example(folder: Path, transform=lambda text: text) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / EXAMPLE.name
    target.write_text(transform(EXAMPLE.read_text()))
    return target


def test_identical_copies_in_two_folders_register_once(tmp_path):
    mimic, logit_mse = METHODS.get("mimic"), LOSSES.get("logit_mse")
    for checkout in ("checkout_a", "checkout_b"):
        import_plugin(str(copy_example(tmp_path / checkout / "registry").parent))
    assert METHODS.get("mimic") is mimic and LOSSES.get("logit_mse") is logit_mse
    assert METHODS.names("mimic") == ["mimic"] and LOSSES.names("logit_mse") == ["logit_mse"]


def test_identical_copy_imported_as_a_module_is_the_same_component(tmp_path, monkeypatch):
    """Another route to the same file contents (a dotted module name): the registry accepts it."""
    mimic = METHODS.get("mimic")
    copy_example(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import_plugin("example_mimic")
        assert METHODS.get("mimic") is mimic
    finally:
        sys.modules.pop("example_mimic", None)


def test_different_implementation_under_a_taken_name_names_both_files(tmp_path):
    changed = copy_example(
        tmp_path / "other", lambda text: text.replace("ramp_steps: int = 100", "ramp_steps: int = 7")
    )
    with pytest.raises(ConfigError, match="already registered") as err:
        import_plugin(str(changed))
    message = str(err.value)
    assert str(EXAMPLE) in message and str(changed) in message
    assert METHODS.get("mimic").__init__.__defaults__[-1] == 100  # the first implementation stays


def test_relative_plugin_paths_resolve_against_the_cwd_and_are_recorded_absolute(tmp_path, monkeypatch):
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "rel_plugin.py").write_text(
        "from gendd_framework.registry import LOSSES\n"
        "@LOSSES.register('rel_path_loss')\n"
        "def rel_path_loss():\n"
        "    return 0\n"
    )
    monkeypatch.chdir(tmp_path)
    recorded = load_plugins(["my_plugins/rel_plugin.py", "my_plugins"], scan_default_dirs=False)
    assert recorded == [str(folder / "rel_plugin.py"), str(folder)]
    assert "rel_path_loss" in LOSSES


def test_cwd_registry_is_the_project_registry_once_at_the_root(monkeypatch):
    monkeypatch.delenv("GENDD_REGISTRY_DIR", raising=False)
    monkeypatch.chdir(ROOT)
    assert default_plugin_dirs() == [(ROOT / "registry").resolve()]


def gendd_list(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GENDD_REGISTRY_DIR"}
    code = "import sys; from gendd_framework.cli import list_main; list_main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_gendd_list_from_another_cwd_and_from_a_second_checkout(tmp_path):
    elsewhere = gendd_list(tmp_path, "methods")
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "mimic(" in elsewhere.stdout and "gendd(" in elsewhere.stdout

    second = tmp_path / "second_checkout"
    copy_example(second / "registry")
    (second / "registry" / "_helpers.py").write_text("raise RuntimeError('underscore files are skipped')\n")
    run = gendd_list(second, "methods", "mimic")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("mimic(") == 1


def test_gendd_list_with_a_conflicting_second_checkout_fails_clearly(tmp_path):
    second = tmp_path / "second_checkout"
    changed = copy_example(
        second / "registry", lambda text: text.replace("weight: float = 1.0", "weight: float = 3.0")
    )
    run = gendd_list(second, "methods")
    assert run.returncode != 0
    assert "already registered" in run.stderr and str(EXAMPLE) in run.stderr and str(changed) in run.stderr
