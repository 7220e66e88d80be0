"""What `gendd-train` shows when something fails: an exception in plugin code points at the plugin's
file and line (no config hint), a typo of an option that lives in `--config-dir` gets the right hint,
the full text of a multi-line error is kept in failed.json and the run log, and plugin paths never
become nested sweep folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TINY = ["trainer.epochs=1", "teacher.train.epochs=1", "data.train_fraction=0.3", "trainer.progress=false"]

PLUGIN = textwrap.dedent(
    """
    import torch.nn.functional as F

    from gendd_framework.errors import ConfigError
    from gendd_framework.methods.base import Method
    from gendd_framework.registry import METHODS


    def scale(logits):
        return logits / logits.new_zeros(3)  # BROKEN LINE: shapes (B, 10) and (3,) do not broadcast


    @METHODS.register("demo_broken")
    class Broken(Method):
        def training_step(self, batch, ctx):
            logits = self.student(batch["input"])["logits"]
            return {"loss": F.cross_entropy(scale(logits), batch["target"])}


    @METHODS.register("demo_refuses")
    class Refuses(Method):
        def __init__(self, student, teacher=None):
            raise ConfigError("demo_refuses cannot run here\\nfirst cause: detail one\\nsecond: detail two")
    """
)


@pytest.fixture
def user_files(tmp_path) -> tuple[Path, Path]:
    """A plugin file and a `--config-dir` with `method/demo_broken.yaml` and `method/demo_refuses.yaml`."""
    plugin = tmp_path / "plugins" / "failing_plugin.py"
    plugin.parent.mkdir()
    plugin.write_text(PLUGIN)
    configs = tmp_path / "my_configs" / "method"
    configs.mkdir(parents=True)
    for name in ("demo_broken", "demo_refuses"):
        (configs / f"{name}.yaml").write_text(f"name: {name}\n")
    return plugin, configs.parent


def gendd_train(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GENDD_CACHE_DIR": str(cache), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [str(BIN / "gendd-train"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def line_of(path: Path, marker: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if marker in line)


def test_an_exception_in_plugin_code_shows_the_plugin_line_and_no_config_hint(user_files, tmp_path):
    plugin, configs = user_files
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    res = gendd_train("--config-dir", str(configs), "method=demo_broken", f"plugins=[{plugin}]", *TINY,
                      f"hydra.run.dir={run_dir}", cwd=tmp_path, cache=cache)  # fmt: skip
    assert res.returncode == 1, res.stderr
    line = line_of(plugin, "BROKEN LINE")
    assert f'File "{plugin}", line {line}, in scale' in res.stderr
    assert f"{plugin}:{line}" in res.stderr
    assert "RuntimeError: The size of tensor a (10) must match" in res.stderr
    assert "hint" not in res.stderr and "did you mean" not in res.stderr
    assert "src/gendd_framework" not in res.stderr, "framework frames in the short traceback"
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["plugin"] == f"{plugin}:{line}" and failed["error"].startswith("RuntimeError: The size")
    assert "gendd_framework/dry_run.py" in failed["traceback"]  # the whole traceback is kept
    assert not (run_dir / "checkpoints").exists() and not cache.exists()  # found by preflight


def test_a_typo_of_an_option_in_a_config_dir_gets_the_right_hint(user_files, tmp_path):
    plugin, configs = user_files
    res = gendd_train("--config-dir", str(configs), "method=demo_brokn", cwd=tmp_path, cache=tmp_path / "c")
    assert res.returncode != 0
    assert "hint: method=demo_brokn: did you mean demo_broken" in res.stderr
    res = gendd_train(f"hydra.searchpath=[file://{configs}]", "method=demo_broken", "method.nam=x",
                      cwd=tmp_path, cache=tmp_path / "c")  # fmt: skip
    assert res.returncode != 0 and "unknown key 'method.nam': did you mean method.name" in res.stderr


def test_the_full_text_of_a_multi_line_error_is_kept_in_failed_json_and_the_log(user_files, tmp_path):
    plugin, configs = user_files
    run_dir = tmp_path / "run"
    res = gendd_train("--config-dir", str(configs), "method=demo_refuses", f"plugins=[{plugin}]", *TINY,
                      f"hydra.run.dir={run_dir}", cwd=tmp_path, cache=tmp_path / "cache")  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "gendd-train: error: demo_refuses cannot run here" in res.stderr
    assert "detail one" not in res.stderr  # the console gets the first line and where the rest is
    assert f"full text in {run_dir / 'failed.json'} and {run_dir / 'gendd-train.log'}" in res.stderr
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["error"] == "ConfigError: demo_refuses cannot run here"
    assert failed["detail"].endswith("first cause: detail one\nsecond: detail two")
    log = (run_dir / "gendd-train.log").read_text()
    assert "demo_refuses cannot run here\nfirst cause: detail one\nsecond: detail two" in log


def test_a_sweep_over_a_plugin_path_makes_flat_job_folders(user_files, tmp_path):
    plugin, _ = user_files
    sweep = tmp_path / "sweep"
    res = gendd_train("-m", f"plugins=[{plugin}]", "seed=0,1", "stages=[distill]", "method=ce", *TINY,
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path, cache=tmp_path / "cache")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p.parent.relative_to(sweep).as_posix() for p in sweep.rglob(".hydra"))
    assert len(jobs) == 2 and all("/" not in job for job in jobs), jobs  # no folder named after the path
    assert [job.split("_")[0] for job in jobs] == ["0", "1"] and "seed=1" in jobs[1]
    assert all("plugins" not in job and (sweep / job / "summary.json").is_file() for job in jobs)


def test_plugin_traceback_names_the_plugin_line_of_import_and_chained_errors(tmp_path):
    from gendd_framework.errors import ConfigError
    from gendd_framework.plugins import import_plugin, plugin_traceback

    bad_syntax = tmp_path / "bad_syntax_plugin.py"
    bad_syntax.write_text("x = 1\ndef broken(:\n    pass\n")
    with pytest.raises(SyntaxError) as info:
        import_plugin(str(bad_syntax))
    where, text = plugin_traceback(info.value)
    assert where == f"{bad_syntax}:2" and "SyntaxError" in text

    raises_at_import = tmp_path / "raises_at_import_plugin.py"
    raises_at_import.write_text("import math\n\nVALUE = math.sqrt(-1)  # line 3\n")
    with pytest.raises(ValueError) as info:
        import_plugin(str(raises_at_import))
    where, text = plugin_traceback(info.value)
    assert where == f"{raises_at_import}:3" and "in <module>" in text and text.endswith("math domain error")

    try:  # framework code wrapping a plugin's error: the plugin frame is found through the cause
        try:
            import_plugin(str(raises_at_import))
        except ValueError as exc:
            raise RuntimeError("building the method failed") from exc
    except RuntimeError as exc:
        assert plugin_traceback(exc)[0] == f"{raises_at_import}:3"
    assert plugin_traceback(ConfigError("not from a plugin")) is None


def test_the_sweep_precheck_composes_with_the_config_dir(user_files, monkeypatch):
    """A sweep whose method lives in `--config-dir` is still checked before its first job."""
    from gendd_framework import launchers
    from gendd_framework.cli import config_dir, search_dirs
    from gendd_framework.errors import ConfigError

    _, configs = user_files
    argv = ["-m", "--config-dir", str(configs), "method=demo_broken", "seed=0,1", "hydra/launcher=ray"]
    monkeypatch.setattr(launchers, "installed", lambda module: False)
    assert search_dirs(argv) == [config_dir(), configs]
    launchers.precheck(argv, str(config_dir()))  # without the config dir: nothing composes, nothing checked
    with pytest.raises(ConfigError, match=r"hydra/launcher=ray needs the hydra-ray-launcher plugin"):
        launchers.precheck(argv, str(config_dir()), search_dirs(argv)[1:])
