"""benchmarks/gpu_check.sh: the one-line refusal without CUDA, its synthetic CIFAR-100 folder, and the
CPU smoke mode (GENDD_GPU_CHECK_DEVICE=cpu --quick) end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
REFUSAL = "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine"
STEPS = {f"{m}/{v}" for m in ("kd", "gendd") for v in ("fp32", "bf16", "bf16+compile")}


def run_script(*args: str, device: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GENDD_GPU_CHECK_DEVICE"}
    env.update(GENDD_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    if device is not None:
        env["GENDD_GPU_CHECK_DEVICE"] = device
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda_in_one_line_before_any_work(tmp_path):
    proc = run_script("--results-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [REFUSAL]
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_smoke_run_never_writes_the_committed_gpu_results(tmp_path):
    target = ROOT / "benchmarks" / "results" / "gpu"
    before = sorted(target.iterdir()) if target.is_dir() else None
    proc = run_script("--quick", "--results-dir", str(target), "--work-dir", str(tmp_path), device="cpu")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"gpu_check: a --quick run never writes to {target}"]
    assert (sorted(target.iterdir()) if target.is_dir() else None) == before


def test_synthetic_cifar100_is_read_by_the_real_loader(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check_parts as parts
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torchvision

    from gendd_framework.data.vision import CIFAR_STATS
    from gendd_framework.registry import DATASETS

    root = parts.write_synthetic_cifar100(tmp_path, n_train=1000, n_test=50, seed=3)
    with pytest.raises(RuntimeError, match="corrupted"):  # torchvision's MD5 check, without the patch
        torchvision.datasets.CIFAR100(str(root), train=False)
    with parts.without_cifar_checksums():
        raw = torchvision.datasets.CIFAR100(str(root), train=False)
        splits = DATASETS.build({"name": "cifar100", "root": str(root), "val_fraction": 0.1})
    rng = np.random.default_rng(3)  # the writer's draws, repeated: train labels, train pixels, test ...
    rng.permutation(np.arange(1000) % 100), rng.integers(0, 256, size=(1000, 3072), dtype=np.uint8)
    labels = rng.permutation(np.arange(50) % 100)
    pixels = rng.integers(0, 256, size=(50, 3072), dtype=np.uint8)
    hwc = pixels.reshape(50, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(raw.data, hwc) and raw.targets == labels.tolist() and len(raw.classes) == 100
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (900, 100, 50, 100)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in CIFAR_STATS["cifar100"])
    x, y = splits.test[7]  # eval transform: ToTensor + Normalize of the written pixels
    expected = (torch.from_numpy(hwc[7]).permute(2, 0, 1).float() / 255 - mean) / std
    assert y == labels[7] and torch.allclose(x, expected, atol=1e-6)


def test_cpu_smoke_mode_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = run_script(
        "--quick", "--results-dir", str(out), "--work-dir", str(work), device="cpu", timeout=540
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    sections = ["cli_runs", "loader", "overhead", "steps", "steps_compile"]
    assert {k: v["status"] for k, v in data["sections"].items()} == dict.fromkeys(sections, "ok")
    assert data["environment"]["device"] == "cpu" and data["quick"] is True

    runs = {r["experiment"]: r for r in data["cli_runs"]}
    assert set(runs) == {"digits/kd", "digits/gendd"}
    for run in runs.values():
        assert run["exit_status"] == 0 and run["device"] == "cpu" and run["wall_s"] > 0
        assert all(0 <= acc <= 100 for acc in run["test_accuracy"].values())
    assert {"teacher/teacher", "distill/student"} <= set(runs["digits/kd"]["test_accuracy"])
    assert "distill/generative" in runs["digits/gendd"]["test_accuracy"]
    # the KD run trained the teacher into the check's own cache, the GenDD run read that file
    kd_teacher, gendd_teacher = runs["digits/kd"]["teacher_source"], runs["digits/gendd"]["teacher_source"]
    assert (
        kd_teacher.startswith(f"trained:{work}") and gendd_teacher == "cache:" + kd_teacher.split(":", 1)[1]
    )

    steps = data["steps"]
    assert set(steps) == STEPS
    for key, record in steps.items():
        assert record["finite"] and record["batch"] == 4 and record["median_images_per_s"] > 0, key
        assert record["peak_allocated_mib"] is None  # no CUDA allocator on the CPU
    assert "compile:head(default)" in steps["gendd/bf16+compile"]["applied"]
    assert "compile:student(default)" in steps["kd/bf16+compile"]["applied"]
    for method in ("kd", "gendd"):  # torch.compile's eager backend replays the very same ops
        assert steps[f"{method}/bf16+compile"]["final_loss"] == steps[f"{method}/bf16"]["final_loss"]
        fp32, bf16 = steps[f"{method}/fp32"]["final_loss"], steps[f"{method}/bf16"]["final_loss"]
        assert abs(bf16 - fp32) < 0.05 * abs(fp32)

    loader = data["loader"]
    assert (loader["num_workers"], loader["batches"], loader["images"], loader["train_images"]) == (
        1,
        3,
        12,
        900,
    )
    overhead = data["overhead"]["summary"]
    assert set(overhead) == {"bare", "bare_inference", "method", "trainer"}
    assert overhead["bare"]["ratio_median"] == 1.0 and all(v["median_ms"] > 0 for v in overhead.values())
    markdown = (out / "gpu_check.md").read_text()
    for title in (
        "## Digits presets",
        "## Training step",
        "## CIFAR-100 training loader",
        "## Framework overhead",
    ):
        assert title in markdown
