"""benchmarks/_digits_probes.py: which runs are probed with which control, and the probe table."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dp():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("_digits_probes")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


METHODS = [
    ("ce", "CE", [], "distill"),
    ("kd", "KD", [], "distill"),
    ("born_again", "BA", [], "born_again"),
    ("mean_teacher", "MT", [], "distill"),
    ("cnn_kd", "KD", [], "distill"),  # before its CE in the benchmark order: CE still comes first
    ("cnn_ce", "CE", [], "distill"),
    ("cnn_simkd", "SimKD", [], "distill"),
    ("vit_kd", "ViT student: KD", [], "distill"),
]


def make_runs(root: Path, keys: list[str], seeds=(0, 1), probed: dict | None = None) -> None:
    for key in keys:
        for seed in seeds:
            run = root / key / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text("{}")
            metrics = (probed or {}).get((key, seed))
            if metrics is not None:
                (run / "probe.json").write_text(json.dumps({"metrics": metrics}))


def test_batches_pick_the_ce_of_the_same_seed_and_family(dp, tmp_path, monkeypatch):
    monkeypatch.setattr(dp, "SKIP", {"mean_teacher": "not probed here"})  # the skip list is honoured
    make_runs(tmp_path, [m[0] for m in METHODS if m[0] != "vit_kd"], probed={("kd", 1): {}})
    make_runs(tmp_path, ["vit_kd"], seeds=(0,))  # no vit_ce run: probed without a control
    got = {
        (
            b.seed,
            b.family,
            b.stage,
            str(b.control.relative_to(tmp_path)) if b.control else None,
            b.extra,
        ): sorted(f"{d.parent.name}/{d.name}" for d in b.run_dirs)
        for b in dp.batches(tmp_path, [0, 1], METHODS)
    }
    simkd = ("localization.student_layer=projector",)
    assert got == {
        (0, "MLP", "distill", None, ()): ["ce/seed0", "kd/seed0"],  # MLP: no map, so no control
        (0, "MLP", "born_again", None, ()): ["born_again/seed0"],
        (0, "CNN", "distill", "cnn_ce/seed0", ()): ["cnn_kd/seed0"],
        (0, "CNN", "distill", None, ()): ["cnn_ce/seed0"],  # the control itself: none
        (0, "CNN", "distill", None, simkd): ["cnn_simkd/seed0"],  # own layer: no control
        (0, "ViT", "distill", None, ()): ["vit_kd/seed0"],  # its CE run is missing
        (1, "MLP", "distill", None, ()): ["ce/seed1"],  # kd seed 1 already has its probe.json
        (1, "MLP", "born_again", None, ()): ["born_again/seed1"],
        (1, "CNN", "distill", "cnn_ce/seed1", ()): ["cnn_kd/seed1"],
        (1, "CNN", "distill", None, ()): ["cnn_ce/seed1"],
        (1, "CNN", "distill", None, simkd): ["cnn_simkd/seed1"],
    }
    assert all("mean_teacher" not in d for dirs in got.values() for d in dirs)


DETAIL = {
    "corruption/noise/agree": 80.0,
    "corruption/noise_0.25/agree": 85.0,
    "invariance/shift/student": 70.0,
}


def test_probe_table_orders_families_ce_first_with_sample_std(dp, tmp_path, monkeypatch):
    monkeypatch.setattr(dp, "SKIP", {"mean_teacher": "not probed here"})
    probed = {
        ("cnn_kd", 0): {"adversarial/fooling_rate": 40.0, "calibration/agree": 90.0, **DETAIL},
        ("cnn_kd", 1): {"adversarial/fooling_rate": 46.0, "calibration/agree": 94.0},
        ("cnn_ce", 0): {"adversarial/fooling_rate": 20.0, "calibration/agree": 70.0},
        ("cnn_ce", 1): {"adversarial/fooling_rate": 20.0, "calibration/agree": 70.0},
        ("mean_teacher", 0): {"adversarial/fooling_rate": 100.0},  # SKIP: never shown
        ("kd", 0): {"adversarial/fooling_rate": 10.0},
    }
    make_runs(tmp_path, ["kd", "cnn_kd", "cnn_ce", "mean_teacher"], probed=probed)
    records = []
    for key, label, _, _ in METHODS:
        rec = {"key": key, "label": label, "seeds": [0, 1] if (tmp_path / key).is_dir() else []}
        rec["acc/student"] = [91.0, 93.0]
        dp.add_probes(rec, tmp_path)
        records.append(rec)
    # the JSON keeps the probe-level scalars and per-kind means, not the per-level/per-family detail
    assert sorted(records[4]["probes"]) == [
        "adversarial/fooling_rate",
        "calibration/agree",
        "corruption/noise/agree",
    ]
    rows = dp.probe_table(records).splitlines()[2:]
    assert [r.split("|")[1:3] for r in rows] == [[" MLP ", " KD "], [" CNN ", " CE "], [" CNN ", " KD "]]
    cnn_kd = [c.strip() for c in rows[2].split("|")]
    # probed runs, acc, agreement (the probe's), ..., fooling rate: mean ± sample std of 40 and 46
    assert cnn_kd[3:6] == ["2", "92.00 ± 1.41", "92.00 ± 2.83"] and cnn_kd[8] == "43.00 ± 4.24"
    assert rows[0].split("|")[3].strip() == "1"  # kd: one of two seeds probed
    notes = "\n".join(dp.probe_notes({}, records))
    assert "mean_teacher" in notes and "SimKD" not in notes  # cnn_simkd has no runs here
