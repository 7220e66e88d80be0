"""gendd-report on fake run directories with known numbers."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics

import pytest

from gendd_framework.analysis.report import (
    aggregate,
    collect,
    default_metrics,
    final_stage,
    main,
    markdown,
    render,
)

SEEDS = (0, 1, 2)


def kd_summary(seed: int) -> dict:
    """A KD run: teacher + distill, one output."""
    test = {
        "acc/student": 90.0 + seed,
        "ce/student": 0.30 + 0.01 * seed,
        "ece/student": 2.0 + 0.5 * seed,
        "agree/student": 93.0 + 2 * seed,
        "kl/student": 0.10 + 0.02 * seed,
    }
    return {
        "name": "digits_kd",
        "seed": seed,
        "method": "kd",
        "device": "cpu",
        "elapsed_s": 1.0,
        "teacher": {"source": "cache:x.pt", "val": {"acc/student": 98.0}, "test": {"acc/student": 99.0}},
        "distill": {
            "best_epoch": 4,
            "val": {"acc/student": 91.0 + seed},
            "test": test,
            "test_last": {**test, "acc/student": 89.0 + 0.5 * seed},
            "select": "acc/student",
        },
    }


def gendd_summary(seed: int) -> dict:
    """A GenDD run: pretrain, then distill with two outputs; a different teacher accuracy per seed."""
    test = {"acc/student": 80.0 + 3 * seed, "acc/generative": 82.0 - seed}
    test |= {
        f"{m}/{o}": 1.0 + seed + i
        for i, m in enumerate(("ece", "agree", "kl"))
        for o in ("student", "generative")
    }
    return {
        "name": "digits_gendd",
        "seed": seed,
        "method": "gendd",
        "teacher": {"val": {"acc/student": 97.0}, "test": {"acc/student": 98.0 + 0.1 * seed}},
        "pretrain": {"val": {"acc/student": 50.0}, "test": {"acc/student": 55.0 + seed}},
        "distill": {
            "best_epoch": 7,
            "val": {"acc/student": 81.0},
            "test": test,
            "test_last": {"acc/student": 79.0 + seed, "acc/generative": 80.0 + 2 * seed},
            "select": "acc/generative",  # GenDD selects on its generative output
        },
    }


@pytest.fixture
def runs(tmp_path):
    for seed in SEEDS:
        for make in (kd_summary, gendd_summary):
            summary = make(seed)
            run_dir = tmp_path / "multirun" / summary["name"] / f"{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "summary.json").write_text(json.dumps(summary))
    return tmp_path / "multirun"


def expected(make, stage: str, split: str, metric: str) -> tuple[float, float]:
    values = [make(seed)[stage][split][metric] for seed in SEEDS]
    return statistics.mean(values), statistics.stdev(values)


def md_cell(mean_std: tuple[float, float], decimals: int = 2) -> str:
    return f"{mean_std[0]:.{decimals}f} ± {mean_std[1]:.{decimals}f}"


def md_rows(text: str) -> dict[str, dict[str, str]]:
    """Markdown table -> {method: {column: cell}}."""
    lines = [line.strip().strip("|").split("|") for line in text.strip().splitlines()]
    head = [c.strip() for c in lines[0]]
    return {cells[0].strip(): dict(zip(head, (c.strip() for c in cells))) for cells in lines[2:]}


def test_collect_flattens_every_split_including_test_last(runs):
    rows = collect(runs)
    assert len(rows) == 6
    row = next(r for r in rows if r["name"] == "digits_kd" and r["seed"] == 1)
    assert row["distill/test_last/acc/student"] == 89.5
    assert row["teacher/test/acc/student"] == 99.0
    assert final_stage(row) == "distill"
    gendd = next(r for r in rows if r["name"] == "digits_gendd")
    assert final_stage(gendd) == "distill"  # the last stage with test numbers, not pretrain


def test_final_stage_skips_the_teacher_and_follows_summary_order():
    row = {
        "teacher/test/acc/student": 1,
        "born_again_1/test/acc/student": 2,
        "born_again_2/test/acc/student": 3,
    }
    assert final_stage(row) == "born_again_2"
    assert final_stage({"teacher/test/acc/student": 1}) is None


def test_default_columns(runs):
    metrics = default_metrics(collect(runs))
    assert metrics == [
        "teacher/test/acc/student",
        "distill/test/acc/primary",
        "distill/test_last/acc/primary",
        "distill/test/acc/student",
        "distill/test_last/acc/student",
        "distill/test/acc/generative",
        "distill/test_last/acc/generative",
        "distill/test/agree/student",
        "distill/test/agree/generative",
        "distill/test/kl/student",
        "distill/test/kl/generative",
        "distill/test/ece/student",
        "distill/test/ece/generative",
    ]


def test_markdown_mean_std_and_labels(runs):
    table = md_rows(render(collect(runs), default_metrics(collect(runs))))
    kd, gendd = table["digits_kd"], table["digits_gendd"]
    assert kd["runs"] == "3" and gendd["runs"] == "3"
    # the teacher is its own column, never mixed with the students
    assert kd["teacher acc"] == md_cell(expected(kd_summary, "teacher", "test", "acc/student"))
    assert gendd["teacher acc"] == md_cell(expected(gendd_summary, "teacher", "test", "acc/student"))
    assert kd["acc student"] == md_cell(expected(kd_summary, "distill", "test", "acc/student"))
    assert kd["last acc student"] == md_cell(expected(kd_summary, "distill", "test_last", "acc/student"))
    assert kd["agree student"] == md_cell(expected(kd_summary, "distill", "test", "agree/student"))
    assert kd["KL student"] == md_cell(expected(kd_summary, "distill", "test", "kl/student"), 3)
    assert kd["ECE student"] == md_cell(expected(kd_summary, "distill", "test", "ece/student"))
    assert kd["acc generative"] == "–"  # KD has no generative head
    assert gendd["acc generative"] == md_cell(expected(gendd_summary, "distill", "test", "acc/generative"))
    assert gendd["last acc generative"] == md_cell(
        expected(gendd_summary, "distill", "test_last", "acc/generative")
    )
    assert gendd["ECE generative"] == md_cell(expected(gendd_summary, "distill", "test", "ece/generative"))
    assert not any("pretrain" in column for column in gendd)


def test_csv_has_full_precision_mean_and_std(runs):
    rows = collect(runs)
    text = render(rows, default_metrics(rows), "csv")
    table = {r["method"]: r for r in csv.DictReader(io.StringIO(text))}
    for make, name in ((kd_summary, "digits_kd"), (gendd_summary, "digits_gendd")):
        for column, (stage, split, metric) in {
            "teacher acc": ("teacher", "test", "acc/student"),
            "acc student": ("distill", "test", "acc/student"),
            "last acc student": ("distill", "test_last", "acc/student"),
            "KL student": ("distill", "test", "kl/student"),
        }.items():
            mean, std = expected(make, stage, split, metric)
            assert float(table[name][column]) == pytest.approx(mean, rel=1e-12)
            assert float(table[name][f"{column} std"]) == pytest.approx(std, rel=1e-12)
    assert table["digits_kd"]["acc generative"] == ""


def test_explicit_metrics_and_labels(runs, capsys):
    main([str(runs), "--metric", "pretrain/test/acc/student", "distill/val/acc/student"])
    table = md_rows(capsys.readouterr().out)
    assert set(table["digits_gendd"]) == {"method", "runs", "pretrain acc student", "val acc student"}
    assert table["digits_gendd"]["pretrain acc student"] == md_cell(
        expected(gendd_summary, "pretrain", "test", "acc/student")
    )
    assert table["digits_kd"]["pretrain acc student"] == "–"


def test_main_writes_out(runs, tmp_path, capsys):
    out = tmp_path / "tables" / "report.csv"
    main([str(runs), "--format", "csv", "--out", str(out)])
    assert out.read_text() == capsys.readouterr().out
    header = out.read_text().splitlines()[0].split(",")
    assert header[:5] == ["method", "runs", "primary output", "teacher acc", "teacher acc std"]
    assert "last acc student" in header

    md = tmp_path / "report.md"
    main([str(runs), "--out", str(md)])
    head = (
        "| method | runs | primary output | teacher acc | acc (primary) | last acc (primary) | acc student |"
    )
    assert head in md.read_text()


def test_main_without_runs(tmp_path):
    with pytest.raises(SystemExit, match="no summary.json"):
        main([str(tmp_path)])


def test_legacy_api_still_composes(runs):
    """benchmarks/ and older scripts call collect -> aggregate -> markdown with raw keys."""
    rows = collect(runs)
    metrics = ["distill/test/acc/student"]
    text = markdown(aggregate(rows, metrics), metrics)
    assert text.splitlines()[0] == "| method | runs | distill/test/acc/student |"
    assert md_cell(expected(kd_summary, "distill", "test", "acc/student")) in text


def fake_job(
    root, dirname: str, overrides: list[str], summary: dict | None = None, failed: dict | None = None
):
    """A job dir as gendd-train -m leaves it: Hydra's overrides, then summary.json or failed.json."""
    import yaml

    job = root / dirname
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    if failed is not None:
        (job / "failed.json").write_text(json.dumps(failed))
    return job


def test_groups_are_the_overrides_that_differ(tmp_path, capsys):
    from gendd_framework.analysis.report import scan

    common = ["method=kd", "trainer.epochs=1", "trainer.progress=false"]
    num = 0
    for temperature in (2, 4, 10):
        for seed in SEEDS:
            summary = kd_summary(seed) | {"seed": seed}
            summary["distill"]["test"]["acc/student"] += temperature  # each temperature its own numbers
            extra = ["+data.label_fraction=0.5"] if temperature == 10 else []  # `+` adds, same key
            overrides = [*common, f"method.temperature={temperature}", f"seed={seed}", *extra]
            fake_job(tmp_path, f"{num}_t{temperature}_s{seed}", overrides, summary)
            num += 1
    # a job that failed, then was resumed and finished in the same dir, counts as finished
    rerun = fake_job(tmp_path, "20_rerun", [*common, "method.temperature=2", "seed=5"], failed={"error": "x"})
    os.utime(rerun / "failed.json", (1e9, 1e9))
    (rerun / "summary.json").write_text(json.dumps(kd_summary(0)))

    jobs = scan(tmp_path)
    assert [j.run_dir.name for j in jobs][-2:] == ["8_t10_s2", "20_rerun"]  # job numbers sort as numbers
    rows = collect(tmp_path, jobs)
    groups = {r["group"] for r in rows}
    assert groups == {
        "method.temperature=2",
        "method.temperature=4",
        "method.temperature=10 +data.label_fraction=0.5",
    }
    main([str(tmp_path), "--metric", "distill/test/acc/student"])
    out = capsys.readouterr().out
    table = md_rows(out)
    assert list(table) == sorted(groups, key=lambda g: int(g.split("=")[1].split()[0]))  # first-seen order
    assert table["method.temperature=2"]["runs"] == "4" and table["method.temperature=4"]["runs"] == "3"
    values = [kd_summary(s)["distill"]["test"]["acc/student"] + 4 for s in SEEDS]
    assert table["method.temperature=4"]["acc student"] == md_cell(
        (statistics.mean(values), statistics.stdev(values))
    )
    assert out.splitlines()[0].startswith("| group | runs |")
    assert "failed" not in out


def test_runs_without_overrides_group_by_name_and_same_labels_get_the_name(tmp_path):
    fake_job(tmp_path / "a", "0", ["method.temperature=2", "seed=0"], kd_summary(0))
    fake_job(tmp_path / "a", "1", ["method.temperature=2", "seed=1"], kd_summary(1))
    fake_job(tmp_path / "b", "0", ["method.temperature=2", "seed=0"], gendd_summary(0))  # other config
    fake_job(tmp_path / "c", "0", ["method.temperature=4", "seed=0"], kd_summary(0))
    old = tmp_path / "old"  # a run dir from before Hydra's overrides were kept
    old.mkdir()
    (old / "summary.json").write_text(json.dumps(kd_summary(2) | {"name": "legacy"}))
    rows = collect(tmp_path)
    assert {r["group"]: r["name"] for r in rows} == {
        "digits_kd method.temperature=2": "digits_kd",
        "digits_gendd method.temperature=2": "digits_gendd",
        "method.temperature=4": "digits_kd",
        "legacy": "legacy",
    }
    assert [e["runs"] for e in aggregate(rows, [])] == [2, 1, 1, 1]


def test_failed_and_unfinished_jobs_are_listed_csv_stays_clean(tmp_path, capsys):
    fake_job(tmp_path, "0_a", ["method.temperature=2", "seed=0"], kd_summary(0))
    fake_job(
        tmp_path,
        "1_b",
        ["method.temperature=4", "seed=0"],
        failed={"error": "RuntimeError: boom", "stage": None, "step": None},
    )
    fake_job(tmp_path, "2_c", ["method.temperature=4", "seed=1"])
    main([str(tmp_path), "--format", "csv"])
    captured = capsys.readouterr()
    assert "failed" not in captured.out and len(captured.out.strip().splitlines()) == 2  # header + 1 group
    assert f"- {tmp_path / '1_b'} (method.temperature=4): RuntimeError: boom" in captured.err.splitlines()
    assert f"- {tmp_path / '2_c'}" in captured.err.splitlines()

    out = tmp_path / "r" / "table.md"
    main([str(tmp_path), "--out", str(out)])
    text = out.read_text()
    assert "failed jobs (1):" in text and "missing or incomplete jobs (1):" in text
    assert (tmp_path / "r" / "table.png").is_file()


def test_only_failed_jobs_still_says_why(tmp_path, capsys):
    fake_job(tmp_path, "0", ["seed=0"], failed={"error": "ConfigError: bad", "stage": "distill", "step": 7})
    with pytest.raises(SystemExit, match="no summary.json"):
        main([str(tmp_path)])
    assert "ConfigError: bad [stage distill, step 7]" in capsys.readouterr().err


def test_accuracy_column_is_each_runs_primary_output(runs):
    """KD selects on its student logits, GenDD on its generative output: `acc (primary)` shows each
    row's own primary output (never GenDD's CE head), named in `primary output`; both outputs stay
    available as extra columns."""
    text = render(collect(runs), default_metrics(collect(runs)))
    table = md_rows(text)
    kd, gendd = table["digits_kd"], table["digits_gendd"]
    assert (kd["primary output"], gendd["primary output"]) == ("student", "generative")
    assert kd["acc (primary)"] == md_cell(expected(kd_summary, "distill", "test", "acc/student"))
    assert gendd["acc (primary)"] == md_cell(expected(gendd_summary, "distill", "test", "acc/generative"))
    assert gendd["last acc (primary)"] == md_cell(
        expected(gendd_summary, "distill", "test_last", "acc/generative")
    )
    assert gendd["acc (primary)"] != md_cell(expected(gendd_summary, "distill", "test", "acc/student"))
    assert gendd["acc student"] == md_cell(expected(gendd_summary, "distill", "test", "acc/student"))
    assert kd["acc generative"] == "–"


def test_an_output_that_is_every_runs_primary_is_not_repeated(tmp_path):
    for seed in SEEDS:
        run_dir = tmp_path / f"gendd_{seed}"
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps(gendd_summary(seed)))
    metrics = default_metrics(collect(tmp_path))
    assert "distill/test/acc/primary" in metrics and "distill/test/acc/student" in metrics
    assert "distill/test/acc/generative" not in metrics  # the primary column already shows it


def test_runs_without_select_fall_back_to_the_student_output(tmp_path):
    summary = kd_summary(0)
    del summary["distill"]["select"]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (row,) = collect(tmp_path)
    assert row["distill/primary"] == "student"
    assert row["distill/test/acc/primary"] == summary["distill"]["test"]["acc/student"]


def test_plot_shows_the_primary_accuracy(runs, tmp_path):
    from gendd_framework.analysis.report_table import plot_metrics_of

    assert plot_metrics_of(default_metrics(collect(runs))) == ["distill/test/acc/primary"]
