"""A real 2x2 multirun through the console script, then gendd-report on its sweep dir: one row per
temperature (seeds are the replicates, temperatures never averaged together), failed and unfinished
jobs listed under the table, CSV export and the bar chart."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
KEY = "distill/test/acc/student"


def cli(
    *args: str, cwd: Path, env_extra: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    # one torch thread: on a small shared box, intra-op thread barriers multiply the wall time
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir) -> Path:
    """`method.temperature=2,4 seed=0,1`: four KD jobs in one sweep dir."""
    tmp = tmp_path_factory.mktemp("sweep")
    res = cli(
        "gendd-train",
        "-m",
        "method=kd",
        "method.temperature=2,4",
        "seed=0,1",
        "trainer.epochs=1",
        "teacher.train.epochs=3",
        "data.train_fraction=0.3",
        "trainer.progress=false",
        f"hydra.sweep.dir={tmp / 'sweep'}",
        cwd=tmp,
        env_extra={"GENDD_CACHE_DIR": cache_dir},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "sweep"


def expected_by_temperature(sweep_dir: Path) -> dict[str, list[float]]:
    """The selected test accuracies of each temperature's runs, read back from the job dirs."""
    values: dict[str, list[float]] = {}
    for summary in sweep_dir.glob("*/summary.json"):
        overrides = yaml.safe_load((summary.parent / ".hydra" / "overrides.yaml").read_text())
        temperature = next(o for o in overrides if o.startswith("method.temperature="))
        values.setdefault(temperature, []).append(
            json.loads(summary.read_text())["distill"]["test"]["acc/student"]
        )
    return values


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """The markdown table at the top of the report -> {group: {column: cell}}."""
    lines = [line.strip().strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0]]
    return {cells[0].strip(): dict(zip(head, (c.strip() for c in cells))) for cells in lines[2:]}


def test_one_sweep_dir_holds_every_job(sweep):
    assert (sweep / "multirun.yaml").is_file()
    assert len(list(sweep.glob("*/summary.json"))) == 4
    assert all((p.parent / ".hydra" / "overrides.yaml").is_file() for p in sweep.glob("*/summary.json"))


def test_report_has_one_group_per_temperature(sweep, tmp_path):
    res = cli("gendd-report", str(sweep), "--metric", KEY, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = table_rows(res.stdout)
    expected = expected_by_temperature(sweep)
    assert sorted(expected) == ["method.temperature=2", "method.temperature=4"]
    assert sorted(rows) == sorted(expected)  # never one 4-run group, never a row per seed
    for group, values in expected.items():
        assert len(values) == 2
        assert rows[group]["runs"] == "2"
        mean, std = statistics.mean(values), statistics.stdev(values)
        assert rows[group]["acc student"] == f"{mean:.2f} ± {std:.2f}"
    assert "failed" not in res.stdout and "incomplete" not in res.stdout
    assert list(tmp_path.iterdir()) == []  # no --out, no --plot: nothing written


def test_failed_and_incomplete_jobs_are_listed_under_the_table(sweep, tmp_path):
    root = tmp_path / "sweep"
    shutil.copytree(sweep, root, ignore=shutil.ignore_patterns("checkpoints", "*.pt", "*.png"))
    # two more jobs of the same sweep at temperature 8: one failed, one killed before it finished
    template = yaml.safe_load(next(root.glob("0_*/.hydra/overrides.yaml")).read_text())
    temperature_8 = [o.replace("method.temperature=2", "method.temperature=8") for o in template]
    failed = root / "4_method.temperature=8,method=kd,seed=0"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(temperature_8))
    error = "NonFiniteLossError: non-finite loss 'loss' = nan in stage 'distill' at step 3"
    (failed / "failed.json").write_text(json.dumps({"error": error, "stage": "distill", "step": 3}))
    killed = root / "5_method.temperature=8,method=kd,seed=1"
    (killed / ".hydra").mkdir(parents=True)
    seed_1 = [o.replace("seed=0", "seed=1") for o in temperature_8]
    (killed / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(seed_1))
    (killed / "metrics.jsonl").write_text("")

    res = cli("gendd-report", str(root), "--metric", KEY, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = table_rows(res.stdout)
    assert sorted(rows) == ["method.temperature=2", "method.temperature=4"]
    assert all(row["runs"] == "2" for row in rows.values())
    below = res.stdout.split("\n\n", 1)[1]
    assert "failed jobs (1):" in below
    failed_line = next(line for line in below.splitlines() if str(failed) in line)
    assert error in failed_line and "method.temperature=8" in failed_line and "step 3" in failed_line
    assert "missing or incomplete jobs (1):" in below
    assert f"- {killed}" in below.splitlines()


def test_csv_export_and_plot(sweep, tmp_path):
    out = tmp_path / "tables" / "sweep.csv"
    res = cli("gendd-report", str(sweep), "--format", "csv", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert out.read_text() == res.stdout
    table = {r["group"]: r for r in csv.DictReader(io.StringIO(out.read_text()))}
    expected = expected_by_temperature(sweep)
    assert sorted(table) == sorted(expected)
    for group, values in expected.items():
        assert table[group]["runs"] == "2"
        assert table[group]["primary output"] == "student"  # the KD student's logits are what it selects on
        assert float(table[group]["acc (primary)"]) == pytest.approx(statistics.mean(values), rel=1e-12)
        assert float(table[group]["acc (primary) std"]) == pytest.approx(statistics.stdev(values), rel=1e-12)
    png = out.with_suffix(".png")  # --out without --plot: the chart lands next to the table
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    plot = tmp_path / "bars.png"
    res = cli("gendd-report", str(sweep), "--plot", str(plot), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert plot.is_file() and plot.stat().st_size > 1000
