"""Distributed data parallel through the real entry point: `torchrun --nproc-per-node 2` (gloo, CPU)
running `gendd-train`, against a single-process run with the same global batch.

The student has no BatchNorm: with BN each rank normalises with its own half-batch statistics, which is
a different computation from one process normalising the whole batch (that is what trainer.sync_bn
is for, on GPUs). Without BN, the mean of the two ranks' per-rank mean gradients equals the
full-batch mean gradient, so the runs differ by float summation order only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gendd_framework.cli import config_dir
from gendd_framework.engine import distributed
from gendd_framework.engine.metrics import MetricAccumulator
from gendd_framework.models import build_model
from gendd_framework.pipeline import run

PLUGIN = '''
"""Test-only plugin: a student without BatchNorm, a stage that saves every rank's student, and a copy
of the run dir as a kill would leave it at the start of an epoch (GENDD_TEST_SNAPSHOT_EPOCH)."""
import os
import shutil

import torch
from torch import nn

from gendd_framework.engine import distributed
from gendd_framework.engine.trainer import Trainer
from gendd_framework.registry import MODELS, STAGES


@MODELS.register("test_plain_mlp")
class PlainMLP(nn.Module):
    def __init__(self, in_features=64, hidden=(32,), num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden[0]), nn.ReLU())
        self.fc = nn.Linear(hidden[0], num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


@STAGES.register("test_dump_weights")
def dump_weights(ctx):
    out = os.environ.get("GENDD_TEST_DUMP")
    if out:
        torch.save(ctx.models["student"].state_dict(), os.path.join(out, f"rank{distributed.rank()}.pt"))
    return {}


_original = Trainer.train_one_epoch


def _snapshot_then_train(self, total_steps):
    epoch, target = os.environ["GENDD_TEST_SNAPSHOT_EPOCH"], os.environ["GENDD_TEST_SNAPSHOT_DIR"]
    if self.stage == "distill" and self.epoch == int(epoch) and distributed.rank() == 0:
        shutil.copytree(self.ckpt_dir.parent, target)  # every rank passed the barrier after the save
    return _original(self, total_steps)


if os.environ.get("GENDD_TEST_SNAPSHOT_EPOCH"):  # only the torchrun processes that asked for it
    Trainer.train_one_epoch = _snapshot_then_train
'''

BATCH = 16  # per rank; the single-process run uses 2 x BATCH


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cache_dir):
    """The plugin file, a random digits teacher (nothing is trained but the student) and overrides."""
    tmp = tmp_path_factory.mktemp("ddp")
    plugin = tmp / "ddp_plugin.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    torch.manual_seed(0)
    teacher = build_model({"name": "small_cnn", "in_channels": 1, "channels": [8, 16]}, num_classes=10)
    weights = tmp / "teacher.pt"
    torch.save(teacher.state_dict(), weights)
    overrides = [
        "method=kd",
        "student.name=test_plain_mlp",
        "teacher.model.channels=[8,16]",
        f"teacher.weights={weights}",
        f"plugins=[{plugin}]",
        "stages=[teacher,distill,test_dump_weights]",
        "data.augment=false",
        "data.train_fraction=0.3",
        "trainer.epochs=2",
        "trainer.progress=false",
        "trainer.device=cpu",
    ]
    return tmp, overrides


def torchrun(args: list[str], cwd: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", **env_extra}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "gendd_framework.cli", *args,
    ]  # fmt: skip
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def distill_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows if r["stage"] == "distill"]


@pytest.fixture(scope="module")
def ddp_run(setup):
    """Two ranks, default `outputs/${name}/${now:...}` run dir (each rank composes its own); the run
    dir is also copied as it stands at the start of epoch 2, as if the job had been killed there."""
    tmp, overrides = setup
    work, dump = tmp / "ddp_cwd", tmp / "dump"
    work.mkdir()
    dump.mkdir()
    env = {
        "GENDD_TEST_DUMP": str(dump),
        "GENDD_TEST_SNAPSHOT_EPOCH": "1",
        "GENDD_TEST_SNAPSHOT_DIR": str(tmp / "cut"),
    }
    res = torchrun([*overrides, f"data.loader.batch_size={BATCH}"], work, env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return work, dump


@pytest.fixture(scope="module")
def single_run(setup, tmp_path_factory):
    """The same run in one process (in this one) with the same global batch."""
    from hydra import compose, initialize_config_dir

    _, overrides = setup
    run_dir = tmp_path_factory.mktemp("single")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"data.loader.batch_size={2 * BATCH}"])
    return run_dir, run(cfg, run_dir)


def test_ranks_hold_identical_weights_equal_to_one_process(ddp_run, single_run):
    _, dump = ddp_run
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    single_dir, single = single_run
    weights = torch.load(single_dir / "student.pt", weights_only=True)
    assert weights.keys() == rank0.keys()
    for key, value in weights.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert single["world_size"] == 1


def test_the_plugin_leaves_this_process_trainer_and_registries_alone(single_run):
    """The in-process run imported the plugin: the Trainer is unpatched here, and its names end with
    this module (tests/conftest.py isolates registries per module and per test)."""
    from gendd_framework.engine.trainer import Trainer
    from gendd_framework.registry import MODELS, STAGES

    assert Trainer.train_one_epoch.__module__ == "gendd_framework.engine.trainer"
    assert "test_plain_mlp" in MODELS and "test_dump_weights" in STAGES  # registered for this module


def test_device_for_is_the_one_device_resolver(monkeypatch):
    from gendd_framework import runtime
    from gendd_framework.errors import ConfigError

    assert runtime.resolve_device is distributed.device_for
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # the real set_device's argument check (a bare "cuda" is refused), without a GPU
    monkeypatch.setattr(
        torch.cuda, "set_device", lambda d: current.append(torch.cuda._utils._get_device_index(d))
    )
    assert distributed.device_for("auto") == torch.device("cuda") and current == []  # one process
    assert distributed.device_for("cuda:1") == torch.device("cuda", 1) and current == [1]
    assert distributed.device_for("cuda", local_rank=3, world_size=2) == torch.device("cuda", 1)
    assert current == [1, 1]
    with pytest.raises(ConfigError, match="each rank takes cuda:LOCAL_RANK"):
        distributed.device_for("cuda:0", 0, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.device_for("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available; use trainer.device=auto or cpu"):
        distributed.device_for("cuda")


def test_one_run_dir_with_one_set_of_files(ddp_run, single_run):
    work, _ = ddp_run
    run_dirs = [p for p in (work / "outputs").rglob("*") if (p / "summary.json").is_file()]
    assert len(run_dirs) == 1, run_dirs  # both ranks used rank 0's directory
    assert sorted(p.name for p in work.iterdir()) == ["outputs"]  # rank 1 wrote nothing in its cwd
    run_dir = run_dirs[0]
    assert {p.name for p in (run_dir / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "distill_best.pt",
        "distill_last.pt",
    ]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    log = (run_dir / "gendd-train.log").read_text()
    assert log.count("distill epoch 1/2") == 1  # rank 1 does not log into rank 0's file
    rows = distill_rows(run_dir)
    assert [(r["epoch"], next(k for k in r if "/" in k).split("/")[0]) for r in rows] == [
        (1, "train"), (1, "val"), (2, "train"), (2, "val"), (2, "test"),
    ]  # fmt: skip

    # validation covers the whole split once: the same metrics as one process with the same weights
    ddp_val, single_val = summary["distill"]["val"], single_run[1]["distill"]["val"]
    assert ddp_val.keys() == single_val.keys()
    for key in ddp_val:
        assert ddp_val[key] == pytest.approx(single_val[key], rel=1e-4, abs=1e-4), key
    assert summary["objective"] == ddp_val["acc/student"]


def test_resume_under_ddp_is_exact(setup, ddp_run, tmp_path):
    """The run dir as a kill after epoch 1 of 2 leaves it, resumed with 2 ranks: the same student and
    records as the uninterrupted run (sampler epoch, per-rank RNG and optimizer state restored)."""
    tmp, overrides = setup
    work, _ = ddp_run
    full_dir = next(p for p in (work / "outputs").rglob("*") if (p / "summary.json").is_file())
    cut = tmp / "cut"
    assert not (cut / "summary.json").exists() and (cut / "checkpoints" / "distill_last.pt").is_file()
    args = [*overrides, f"data.loader.batch_size={BATCH}", f"hydra.run.dir={cut}", "trainer.resume=true"]
    resumed = torchrun(args, tmp_path, {})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in (cut / "gendd-train.log").read_text()
    a = torch.load(full_dir / "student.pt", weights_only=True)
    b = torch.load(cut / "student.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert distill_rows(cut) == distill_rows(full_dir)
    assert (
        json.loads((cut / "summary.json").read_text())["distill"]
        == json.loads((full_dir / "summary.json").read_text())["distill"]
    )


# -- pieces, in one process ------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "world"), [(10, 3), (7, 2), (2, 4), (9, 1)])
def test_eval_shards_cover_a_split_exactly_once(size, world):
    shards = [distributed.EvalShard(list(range(size)), r, world) for r in range(world)]
    seen = sorted(i for shard in shards for i in shard.indices)
    assert seen == list(range(size)) and all(s.full_size == size for s in shards)


def test_merged_shard_metrics_equal_whole_split_metrics():
    """GenDD's two outputs and the teacher metrics (agree, KL) over shards, merged = over the split."""
    gen = torch.Generator().manual_seed(0)
    n, classes = 37, 5
    outputs = {name: torch.randn(n, classes, generator=gen) * 3 for name in ("student", "generative")}
    teacher = torch.randn(n, classes, generator=gen) * 3
    target = torch.randint(classes, (n,), generator=gen)
    whole = MetricAccumulator()
    whole.update(outputs, target, teacher)
    states = []
    for rank in range(3):
        part, idx = MetricAccumulator(), torch.arange(rank, n, 3)
        for chunk in idx.split(4):  # several batches per shard
            part.update({k: v[chunk] for k, v in outputs.items()}, target[chunk], teacher[chunk])
        states.append(part.state())
    merged = MetricAccumulator()
    merged.merge(states)
    expected, got = whole.result(), merged.result()
    assert expected.keys() == got.keys() and {"acc/generative", "kl/generative", "agree/student"} <= set(got)
    for key in expected:
        # counts are exact; CE and KL are float32 per batch, so batching changes their last digits
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    assert merged.total == n


def test_rank_seeds_differ_per_rank_and_are_stable():
    seeds = [distributed.rank_seed(7, r) for r in range(4)]
    assert len(set(seeds)) == 4 and seeds == [distributed.rank_seed(7, r) for r in range(4)]
    assert all(0 <= s < 2**63 for s in seeds)


def test_one_process_runs_without_a_process_group():
    info, device = distributed.setup("cpu")
    assert not info.enabled and info.is_main and device.type == "cpu"
    assert not torch.distributed.is_initialized()
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.all_true(torch.tensor(True)) and not distributed.all_true(torch.tensor(False))


def test_torchrun_ranks_above_zero_write_nothing_of_their_own():
    from gendd_framework.cli import torchrun_argv

    argv = ["method=kd", "hydra.run.dir=out/x"]
    assert torchrun_argv(argv, {}) == argv  # not under torchrun
    torchrun = {"RANK": "0", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "abc"}
    assert torchrun_argv(argv, torchrun) == argv  # rank 0 composes and writes as usual
    extra = torchrun_argv(argv, {**torchrun, "RANK": "1", "LOCAL_RANK": "1"})[len(argv) :]
    assert extra == ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    with pytest.raises(SystemExit) as exit_:
        torchrun_argv(["-m", "seed=0,1"], torchrun)  # a whole sweep in every rank: refused
    assert exit_.value.code == 2


def test_sync_bn_converts_in_place_and_keeps_feature_taps():
    from gendd_framework.models.tap import FeatureTap

    model = build_model({"name": "small_cnn", "in_channels": 1, "channels": [4, 8]}, num_classes=10)
    tap = FeatureTap(model, ["logits", "features.1"])  # a tap on a BatchNorm output
    before = tap(torch.randn(2, 1, 8, 8))
    assert distributed.convert_sync_bn([model]) == 2
    assert all(
        not isinstance(m, torch.nn.BatchNorm2d) or isinstance(m, torch.nn.SyncBatchNorm)
        for m in model.modules()
    )
    model.eval()  # SyncBatchNorm runs on the CPU in eval mode (it syncs only while training, on GPUs)
    after = tap(torch.randn(2, 1, 8, 8))
    assert after.keys() == before.keys() and after["features.1"].shape == before["features.1"].shape


def test_sync_bn_on_the_cpu_with_several_ranks_is_a_config_error(monkeypatch):
    from gendd_framework.errors import ConfigError
    from gendd_framework.methods.base import Method

    method = type("Plain", (Method,), {"needs_teacher": False})(torch.nn.Linear(4, 3))
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    monkeypatch.setattr(
        distributed, "info", lambda: distributed.DistInfo(rank=0, world_size=2, backend="gloo")
    )
    with pytest.raises(ConfigError, match="trainer.sync_bn=true needs CUDA"):
        distributed.StepRunner(method, optimizer, torch.device("cpu"), sync_bn=True)
