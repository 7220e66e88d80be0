"""Trainer robustness: NaN stops on the step, kills leave no orphans or duplicate rows, exact resume
with worker processes, terminal-only progress bars and one console line per epoch, clipping and AMP."""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gendd_framework.engine import checkpoint as ckpt
from gendd_framework.engine import trainer as trainer_mod
from gendd_framework.engine.checkpoint import seed_worker
from gendd_framework.engine.loggers import JsonlLogger, LoggerGroup, truncate_jsonl
from gendd_framework.engine.trainer import Trainer, TrainerConfig
from gendd_framework.errors import NonFiniteLossError

FORK = "fork" in multiprocessing.get_all_start_methods()


class Points(Dataset):
    """Separable 3-class points; `noise` draws from the global torch, NumPy and Python RNGs (the
    ones a worker process must seed itself)."""

    def __init__(self, n: int = 32, noise: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 3
        self.x = F.one_hot(self.y, 4).float() * 2 + 0.3 * torch.randn(n, 4, generator=g)
        self.noise = noise

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.x[i]
        if self.noise:
            x = x + 0.1 * torch.randn(4) + float(np.random.rand()) + random.random()
        return {"input": x, "target": self.y[i]}


class Tiny(nn.Module):
    """The Trainer's method contract on a linear model; `bad` maps a step to a losses override."""

    primary_output = "student"

    def __init__(self, bad: dict[int, dict[str, float]] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3)
        self.bad = bad or {}
        self.snapshot: dict[str, torch.Tensor] | None = None

    def training_step(self, batch, ctx) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(self.net(batch["input"]).float(), batch["target"])
        losses = {"loss": ce, "ce": ce.detach()}
        if ctx.step in self.bad and self.snapshot is None:
            self.snapshot = {k: v.detach().clone() for k, v in self.state_dict().items()}
            bad = {k: ce * 0 + v if k == "loss" else torch.tensor(v) for k, v in self.bad[ctx.step].items()}
            losses = {**bad, **{k: v for k, v in losses.items() if k not in bad}}  # bad keys first
        return losses

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"student": self.net(x).float()}

    def on_evaluate_start(self) -> None:
        pass


def make_logger(run_dir) -> LoggerGroup:
    group = LoggerGroup([JsonlLogger(str(run_dir))])
    group.jsonl_path = group.loggers[0].path
    return group


def make_trainer(run_dir, method=None, loader=None, generator=None, lr=0.1, opt="sgd", **cfg) -> Trainer:
    method = method or Tiny()
    cfg = {"epochs": 2, "progress": False, "log_every": 100, **cfg}
    if loader is None:
        generator = torch.Generator()
        loader = DataLoader(Points(), batch_size=8, shuffle=True, generator=generator)
    params = method.parameters()
    optimizer = torch.optim.SGD(params, lr=lr) if opt == "sgd" else torch.optim.AdamW(params, lr=lr)
    return Trainer(
        method,
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        loader,
        DataLoader(Points(12), batch_size=6),
        config=TrainerConfig(**cfg),
        device=torch.device("cpu"),
        ckpt_dir=run_dir / "checkpoints",
        stage="distill",
        logger=make_logger(run_dir),
        shuffle_seed=1,
        shuffle_generator=generator,
    )


def rows(run_dir, drop=("epoch_time_s",)) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]


def weights_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- 1. non-finite loss ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "key"),
    [
        ({"aux": float("inf"), "loss": float("nan")}, "loss"),  # 'loss' preferred over earlier keys
        ({"aux": float("-inf")}, "aux"),  # a non-finite term stops the run too
    ],
)
def test_non_finite_loss_stops_on_its_step_before_the_update(tmp_path, bad, key):
    method = Tiny(bad={5: bad})  # 4 steps per epoch: step 5 is mid-epoch 2, far from log_every=100
    loop = make_trainer(tmp_path, method, epochs=3)
    with pytest.raises(NonFiniteLossError) as info:
        loop.fit()
    assert (info.value.stage, info.value.step, info.value.key) == ("distill", 5, key)
    assert loop.step == 5
    assert all(torch.equal(v, method.snapshot[k]) for k, v in method.state_dict().items())
    last = ckpt.load(tmp_path / "checkpoints" / "distill_last.pt")
    assert (last["epoch"], last["step"]) == (1, 4)  # epoch 2's `last` was never written
    expected = {"stage": "distill", "epoch": 2, "step": 5, "event": "non_finite_loss"}
    assert rows(tmp_path)[-1] == {**expected, "key": key, "value": str(bad[key])}
    assert not any(r.get("epoch") == 2 and "train/loss" in r for r in rows(tmp_path))


def test_non_finite_micro_batch_blocks_the_accumulated_update(tmp_path):
    method = Tiny(bad={1: {"loss": float("nan")}})  # first micro-batch of the 2nd update
    loop = make_trainer(tmp_path, method, accum_steps=2)
    with pytest.raises(NonFiniteLossError) as info:
        loop.fit()
    assert info.value.step == 1 and loop.step == 1
    assert all(torch.equal(v, method.snapshot[k]) for k, v in method.state_dict().items())


# -- 2. kills: orphans, duplicate rows, half-written lines -------------------------------------------
def test_fit_removes_only_atomic_save_orphans(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _, orphan = tempfile.mkstemp(dir=folder, prefix=".distill_last.pt.", suffix=".tmp")
    keep = [folder / "keep.tmp", folder / ".hidden.tmp", folder / "notes.txt"]
    for path in keep:
        path.write_text("x")
    make_trainer(tmp_path, epochs=1).fit()
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([".hidden.tmp", "keep.tmp", "notes.txt", "distill_best.pt", "distill_last.pt"])
    assert orphan not in names


KILLED_SAVE = """
import os, signal, sys, torch
from gendd_framework.engine import checkpoint as ckpt
def dying_save(obj, fh):
    fh.write(b"half a checkpoint"); fh.flush(); os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
ckpt.atomic_save({"x": 1}, sys.argv[1])
"""


def test_sigkill_during_save_leaves_an_orphan_that_remove_stale_tmp_deletes(tmp_path):
    target = tmp_path / "distill_last.pt"
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target)], timeout=120)
    assert proc.returncode == -9
    orphans = [p for p in tmp_path.iterdir() if ckpt.TMP_PATTERN.match(p.name)]
    assert len(orphans) == 1 and not target.exists()
    assert ckpt.remove_stale_tmp(tmp_path) == orphans and not list(tmp_path.iterdir())


def test_kill_before_last_save_then_resume_has_the_rows_of_an_uninterrupted_run(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    reference = make_trainer(full, epochs=3)
    reference.fit()
    reference.logger.log({"stage": "distill", "epoch": 3, "step": reference.step, "test/acc": 1.0})

    original, saves = ckpt.atomic_save, []

    def killed_on_second_last(obj, path):
        if str(path).endswith("_last.pt"):
            saves.append(path)
            if len(saves) == 2:  # epoch 2: train and val rows logged, `best` maybe saved, `last` not
                raise KeyboardInterrupt
        original(obj, path)

    monkeypatch.setattr(ckpt, "atomic_save", killed_on_second_last)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(cut, epochs=3).fit()
    monkeypatch.setattr(ckpt, "atomic_save", original)
    with (cut / "metrics.jsonl").open("a") as fh:
        fh.write('{"stage": "distill", "epoch": 2, "st')  # a record killed mid-write
    resumed = make_trainer(cut, epochs=3, resume=True)
    resumed.fit()
    resumed.logger.log({"stage": "distill", "epoch": 3, "step": resumed.step, "test/acc": 1.0})
    # killed after the test row (same step as the last checkpoint), then resumed once more
    again = make_trainer(cut, epochs=3, resume=True)
    again.fit()
    again.logger.log({"stage": "distill", "epoch": 3, "step": again.step, "test/acc": 1.0})
    assert rows(cut) == rows(full)
    assert weights_equal(again.method, reference.method)


def test_fresh_restart_replaces_the_rows_of_an_earlier_attempt(tmp_path):
    make_trainer(tmp_path / "full", epochs=2).fit()
    first = make_trainer(tmp_path / "cut", epochs=2)
    first.logger.log({"stage": "other", "step": 0})
    first.fit()  # e.g. a teacher stage (resume=false) that is trained again after a kill
    make_trainer(tmp_path / "cut", epochs=2).fit()
    assert rows(tmp_path / "cut") == [{"stage": "other", "step": 0}, *rows(tmp_path / "full")]


def test_truncate_jsonl_keeps_counted_rows_and_drops_a_half_line(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [{"stage": "a", "step": 1}, {"stage": "b", "step": 9}, {"stage": "a", "step": 2}]
    lines.append({"stage": "a", "step": 2, "test/acc": 1})  # logged after the checkpoint at step 2
    text = "".join(json.dumps(r) + "\n" for r in lines)
    path.write_text(text + '{"stage": "a", "st')
    truncate_jsonl(path, "a", max_step=2)  # by step: the same-step test row survives
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines
    truncate_jsonl(path, "a", max_step=2, keep_rows=2)  # by count: it goes
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:3]
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]


def test_jsonl_logger_cuts_a_half_written_line_before_appending(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"stage": "a", "step": 1}\n{"stage": "a", "st')
    JsonlLogger(str(tmp_path)).log({"stage": "a", "step": 2})
    assert rows(tmp_path) == [{"stage": "a", "step": 1}, {"stage": "a", "step": 2}]


# -- 3. exact resume with worker processes -----------------------------------------------------------
def worker_loader(noise: bool = True, persistent: bool = False) -> tuple[DataLoader, torch.Generator]:
    generator = torch.Generator()
    loader = DataLoader(
        Points(noise=noise),
        batch_size=8,
        shuffle=True,
        num_workers=2,
        persistent_workers=persistent,
        worker_init_fn=seed_worker,
        generator=generator,
        multiprocessing_context="fork" if FORK else None,
    )
    return loader, generator


def test_seed_worker_derives_numpy_and_python_seeds_from_torch_only():
    def draws(torch_seed: int, other_seed: int) -> tuple[float, float]:
        torch.manual_seed(torch_seed)  # in a worker: base_seed + worker_id
        np.random.seed(other_seed)
        random.seed(other_seed)
        seed_worker(0)
        return float(np.random.rand()), random.random()

    state = ckpt.rng_state()
    try:
        a = draws(123, 0)
        assert draws(123, 1) == a  # the parent's NumPy/Python state does not leak in
        b = draws(124, 0)
        assert b[0] != a[0] and b[1] != a[1]
    finally:
        ckpt.set_rng_state(state)


def test_workers_draw_distinct_reproducible_streams_per_worker_and_epoch():
    class Draw(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[float, float, float]:
            return float(np.random.rand()), random.random(), float(torch.rand(()))

    def draws(seed: int) -> list[list[float]]:
        g = torch.Generator().manual_seed(seed)
        kwargs = {"multiprocessing_context": "fork"} if FORK else {}
        loader = DataLoader(
            Draw(), batch_size=1, num_workers=2, worker_init_fn=seed_worker, generator=g, **kwargs
        )
        return [[v.item() for b in loader for v in b] for _ in range(2)]

    epoch1, epoch2 = draws(0)
    assert all(x != y for x, y in zip(epoch1[0:3], epoch1[3:6], strict=True))  # worker 0 vs worker 1
    assert epoch1 != epoch2
    assert draws(0) == [epoch1, epoch2] and draws(1)[0] != epoch1


def test_resume_with_worker_processes_is_bit_exact(tmp_path):
    loader, g = worker_loader()
    full = make_trainer(tmp_path / "full", loader=loader, generator=g, opt="adamw", epochs=2)
    full.fit()
    loader, g = worker_loader()
    make_trainer(tmp_path / "cut", loader=loader, generator=g, opt="adamw", epochs=1).fit()
    loader, g = worker_loader()
    resumed = make_trainer(tmp_path / "cut", loader=loader, generator=g, opt="adamw", epochs=2, resume=True)
    resumed.fit()
    assert weights_equal(resumed.method, full.method)
    assert len(rows(tmp_path / "cut")) == 4 and rows(tmp_path / "cut") == rows(tmp_path / "full")


def test_resuming_with_persistent_workers_warns_that_it_is_not_bit_exact(tmp_path, caplog):
    make_trainer(tmp_path, epochs=1).fit()
    loader, g = worker_loader(persistent=True)
    caplog.set_level(logging.WARNING, logger="gendd_framework")
    make_trainer(tmp_path, loader=loader, generator=g, epochs=1, resume=True).fit()  # nothing left to train
    assert any("persistent_workers" in r.getMessage() for r in caplog.records)


# -- 4. progress bars and console lines --------------------------------------------------------------
@pytest.mark.parametrize(
    ("tty", "progress", "disabled"), [(False, True, True), (True, True, False), (True, False, True)]
)
def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, tty, progress, disabled):
    seen = []
    real = trainer_mod.tqdm

    def spy(*args, **kwargs):
        seen.append(kwargs["disable"])
        return real(*args, **{**kwargs, "disable": True})

    monkeypatch.setattr(trainer_mod, "tqdm", spy)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    make_trainer(tmp_path, epochs=1, progress=progress).fit()
    assert seen == [disabled]


def test_one_console_line_per_epoch_and_one_per_new_best(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gendd_framework")
    make_trainer(tmp_path, epochs=3, lr=0.5).fit()
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("gendd_framework")]
    epochs = [m for m in messages if m.startswith("distill epoch ")]
    pattern = r"distill epoch {}/3  loss \d+\.\d{{4}}  val acc/student [\d.]+  \(\d+\.\d s\)"
    assert len(epochs) == 3
    for i, line in enumerate(epochs, 1):
        assert re.fullmatch(pattern.format(i), line), line
    best = [m for m in messages if "new best" in m]
    assert best and all("distill_best.pt" in m for m in best)


# -- 6. clipping and mixed precision -----------------------------------------------------------------
def test_grad_clip_bounds_the_update(tmp_path):
    class Huge(Tiny):
        def training_step(self, batch, ctx):
            return {"loss": 1e6 * self.net(batch["input"]).pow(2).mean()}

    def change(clip: float | None) -> float:
        method = Huge()
        before = torch.cat([p.detach().flatten().clone() for p in method.parameters()])
        loader = DataLoader(Points(8), batch_size=8)
        make_trainer(tmp_path / str(clip), method, loader=loader, lr=1.0, epochs=1, grad_clip=clip).fit()
        return float((torch.cat([p.detach().flatten() for p in method.parameters()]) - before).norm())

    assert change(0.5) <= 0.5 * (1 + 1e-4)
    assert change(None) > 100


def test_fp16_autocast_on_cpu_stays_finite_and_checkpoints_the_scaler(tmp_path):
    loop = make_trainer(tmp_path, epochs=2, precision="fp16")
    assert loop.scaler.is_enabled()
    loop.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # not the default: restore must copy
    loop.fit()
    assert all(torch.isfinite(p).all() for p in loop.method.parameters())
    train = [r for r in rows(tmp_path) if "train/loss" in r]
    assert len(train) == 2 and all(np.isfinite(r["train/loss"]) for r in train)
    saved = ckpt.load(tmp_path / "checkpoints" / "distill_last.pt")["scaler"]
    assert saved["scale"] == 1024.0 and saved["_growth_tracker"] == 8
    resumed = make_trainer(tmp_path, epochs=2, precision="fp16", resume=True)
    resumed.fit()
    assert resumed.scaler.get_scale() == 1024.0 and resumed.scaler.state_dict() == loop.scaler.state_dict()


def test_bf16_autocast_run_is_finite(tmp_path):
    loop = make_trainer(tmp_path, epochs=2, precision="bf16")
    loop.fit()
    assert not loop.scaler.is_enabled()
    assert all(torch.isfinite(p).all() for p in loop.method.parameters())
    train = [r for r in rows(tmp_path) if "train/loss" in r]
    assert len(train) == 2 and all(np.isfinite(r["train/loss"]) for r in train)


def test_atomic_files_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    """Run folders on shared clusters are read by others: atomic writes must not leave 0600 files."""
    import os
    import stat

    from gendd_framework.engine.checkpoint import atomic_save
    from gendd_framework.engine.loggers import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_save({"a": 1}, tmp_path / "x.pt")
        atomic_write_text(tmp_path / "s.json", "{}")
    finally:
        os.umask(old)
    assert {n: stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("x.pt", "s.json")} == {
        "x.pt": 0o644,
        "s.json": 0o644,
    }
    assert (tmp_path / "s.json").read_text() == "{}"
