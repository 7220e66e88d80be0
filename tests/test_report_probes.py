"""gendd-report's probe columns and probe plot on fake sweeps with known probe.json numbers.

Two student families (the CNN preset and a ViT student on it), CE/KD/AT in the first, CE/KD in the
second. Expected cells are written out by hand (sample std over seeds), so a population std, a
missing probe.json counted as 0 or groups mixed together all fail.
"""

from __future__ import annotations

import json

import pytest
import yaml

from gendd_framework.analysis import plots
from gendd_framework.analysis.report import collect, default_metrics, main
from gendd_framework.analysis.report_probes import controls, read_probe

SEEDS = (0, 1, 2)
CNN = ["experiment=digits/transfer_cnn"]
VIT = [*CNN, "student=digits_vit"]
# (family overrides, method) -> per-seed probe metrics; None: that seed has no probe.json
PROBES: dict[tuple[str, str], list[dict | None]] = {
    ("cnn", "ce"): [
        {"localization/iou_top20": v, "adversarial/fooling_rate": f, "calibration/min_class_agree": 50.0}
        for v, f in ((0.20, 30.0), (0.22, 32.0), (0.27, 37.0))
    ],
    ("cnn", "kd"): [
        {
            "localization/iou_top20": v,
            "localization/win_rate_vs_control": w,
            "adversarial/fooling_rate": f,
            "adversarial/same_class": 10.0,  # not a headline: no default column
            "invariance/student_given_teacher": 90.0,
            "corruption/noise/agree": 80.0,
            "calibration/min_class_agree": 60.0,
        }
        for v, w, f in ((0.30, 55.0, 40.0), (0.33, 60.0, 43.0), (0.39, 71.0, 49.0))
    ],
    ("cnn", "at"): [{"localization/iou_top20": 0.40}, {"localization/iou_top20": 0.44}, None],
    ("vit", "ce"): [None, None, None],
    # Grad-CAM skipped (no iou key) and a NaN win rate written as null
    ("vit", "kd"): [
        {"localization/win_rate_vs_control": None, "adversarial/fooling_rate": f} for f in (20.0, 20.0, 26.0)
    ],
}


def summary(method: str, seed: int) -> dict:
    test = {"acc/student": 90.0 + seed, "agree/student": 95.0, "kl/student": 0.1, "ece/student": 2.0}
    return {
        "name": f"digits_transfer_cnn_{method}",
        "seed": seed,
        "method": method,
        "teacher": {"test": {"acc/teacher": 99.0}},
        "distill": {"val": {"acc/student": 91.0}, "test": test, "select": "acc/student"},
    }


@pytest.fixture
def sweep(tmp_path):
    """A multirun tree as `gendd-train -m` leaves it, with probe.json where PROBES has metrics."""
    num = 0
    for (fam, method), per_seed in PROBES.items():
        for seed, metrics in zip(SEEDS, per_seed):
            job = tmp_path / "multirun" / f"{num}"
            (job / ".hydra").mkdir(parents=True)
            overrides = [*(CNN if fam == "cnn" else VIT), f"method={method}", f"seed={seed}"]
            (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
            (job / "summary.json").write_text(json.dumps(summary(method, seed)))
            if metrics is not None:
                (job / "probe.json").write_text(json.dumps({"metrics": metrics, "skipped": {}}))
            num += 1
    return tmp_path / "multirun"


def md_rows(text: str) -> dict[str, dict[str, str]]:
    """The first markdown table of `text` -> {group: {column: cell}}."""
    lines = [line.strip().strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0]]
    return {cells[0].strip(): dict(zip(head, (c.strip() for c in cells))) for cells in lines[2:]}


def test_probe_columns_are_mean_and_sample_std_per_group(sweep, tmp_path, capsys):
    out = tmp_path / "report.md"
    main([str(sweep), "--out", str(out)])
    table = md_rows(out.read_text())
    assert set(table) == {"method=ce", "method=kd", "method=at", "method=ce student=digits_vit",
                          "method=kd student=digits_vit"}  # fmt: skip
    iou, win, fool = "CAM IoU top-20%", "CAM win rate vs CE (%)", "adv. fooling rate (%)"
    assert table["method=ce"][iou] == "0.230 ± 0.036"  # population std would be 0.029
    assert table["method=kd"][iou] == "0.340 ± 0.046"
    assert table["method=kd"][win] == "62.00 ± 8.19"
    assert table["method=kd"][fool] == "44.00 ± 4.58"
    assert table["method=kd"]["invariance given teacher (%)"] == "90.00 ± 0.00"
    assert table["method=kd"]["noise agreement (%)"] == "80.00 ± 0.00"
    assert table["method=ce"]["worst-class agreement (%)"] == "50.00 ± 0.00"
    # two of three seeds probed: their mean, not a 0 for the missing one; the run count is unchanged
    assert table["method=at"][iou] == "0.420 ± 0.028" and table["method=at"]["runs"] == "3"
    assert [table[g]["probed runs"] for g in table] == ["3", "3", "2", "0", "3"]
    assert table["method=at"][fool] == "–" and table["method=ce"][win] == "–"
    # other family: its own numbers; no probe.json at all, skipped Grad-CAM, null win rate -> blanks
    assert table["method=kd student=digits_vit"][fool] == "22.00 ± 3.46"
    assert (
        table["method=kd student=digits_vit"][iou] == "–"
        and table["method=kd student=digits_vit"][win] == "–"
    )
    assert all(table["method=ce student=digits_vit"][c] == "–" for c in (iou, win, fool))
    # accuracy columns are untouched, probe headlines come after them in a fixed order
    head = out.read_text().splitlines()[0]
    assert head.index("acc (primary)") < head.index(iou) < head.index(win) < head.index(fool)
    assert "same_class" not in head


def test_csv_and_explicit_probe_metric(sweep, capsys):
    main([str(sweep), "--format", "csv", "--metric", "probe:adversarial/same_class"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "group,runs,adversarial/same_class,adversarial/same_class std,probed runs"
    kd = next(line for line in lines if line.startswith("method=kd,"))
    assert kd == "method=kd,3,10.0,0.0,3"
    assert next(line for line in lines if line.startswith("method=ce,")) == "method=ce,3,,,3"


def test_runs_without_any_probe_json_get_no_probe_columns(sweep):
    for path in sweep.rglob("probe.json"):
        path.unlink()
    assert not any(key.startswith("probe:") for key in default_metrics(collect(sweep)))


def test_unreadable_or_missing_probe_json_reads_as_no_metrics(tmp_path):
    (tmp_path / "probe.json").write_text('{"metrics": {"adversarial/fooling')  # killed while writing
    assert read_probe(tmp_path) == {}
    assert read_probe(tmp_path / "absent") == {}


def test_each_ce_group_controls_its_own_family(sweep):
    assert controls(collect(sweep)) == {
        "method=ce": ["method=ce", "method=kd", "method=at"],
        "method=ce student=digits_vit": ["method=ce student=digits_vit", "method=kd student=digits_vit"],
    }


def test_probe_plot_is_written_with_the_ce_control_marked(sweep, tmp_path, monkeypatch):
    """`<plot>_probes.png`: one panel per headline present, CE bars hatched, dashed lines at CE means."""
    figures = []
    real_close = plots._pyplot().close
    monkeypatch.setattr(plots._pyplot(), "close", lambda fig: figures.append(fig))
    out = tmp_path / "tables" / "report.md"
    main([str(sweep), "--out", str(out)])
    png = tmp_path / "tables" / "report_probes.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = figures[-1]
    panels = [ax.get_title() for ax in fig.axes]
    assert panels == [
        "CAM IoU top-20%",
        "CAM win rate vs CE (%)",
        "adv. fooling rate (%)",
        "invariance given teacher (%)",
        "noise agreement (%)",
        "worst-class agreement (%)",
    ]
    fool = fig.axes[2]
    names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    hatched = {names[round(p.get_y() + p.get_height() / 2)] for p in fool.patches if p.get_hatch() == "//"}
    assert hatched == {"method=ce", "method=ce student=digits_vit"}
    # dashed control lines: only the CNN CE has fooling numbers; its line is at its mean 33.0
    segments = [seg for coll in fool.collections for seg in coll.get_segments()]  # error bars: horizontal
    xs = {round(float(seg[0][0]), 6) for seg in segments if len(seg) == 2 and seg[0][0] == seg[1][0]}
    assert xs == {33.0}
    bar_ends = sorted(p.get_width() for p in fool.patches if p.get_width() == p.get_width())
    assert bar_ends == [22.0, 33.0, 44.0]
    for fig in figures:
        real_close(fig)


def test_plot_skipped_without_probes(sweep, tmp_path, monkeypatch):
    for path in sweep.rglob("probe.json"):
        path.unlink()
    main([str(sweep), "--out", str(tmp_path / "r.md")])
    assert (tmp_path / "r.png").is_file() and not (tmp_path / "r_probes.png").exists()
