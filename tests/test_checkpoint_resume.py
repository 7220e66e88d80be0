"""Atomic, code-free checkpoint loading and exact resume after an interruption."""

import json
import pickle

import pytest
import torch

from gendd_framework.engine import checkpoint as ckpt
from gendd_framework.engine.trainer import Trainer
from gendd_framework.errors import ConfigError
from gendd_framework.models import build_model
from gendd_framework.pipeline import run


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint file not found"):
        ckpt.load(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="checkpoint file not found"):
        build_model({"name": "mlp", "checkpoint": str(tmp_path / "w.pt")})


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_loading_never_executes_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": Evil()}, fh)
    with pytest.raises(ConfigError, match="weights_only"):
        ckpt.load(path)


def test_atomic_save_leaves_no_partial_file(tmp_path):
    path = tmp_path / "a.pt"
    ckpt.atomic_save({"x": torch.ones(3)}, path)
    assert torch.equal(ckpt.load(path)["x"], torch.ones(3))
    with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):
        ckpt.atomic_save({"f": lambda: 0}, path)  # cannot be pickled: old file must survive
    assert torch.equal(ckpt.load(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def _distill_records(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows if r["stage"] == "distill"]


def test_resume_after_interruption_is_exact(compose, tmp_path, monkeypatch):
    overrides = ["method=kd", "trainer.epochs=4", "data.train_fraction=0.5"]
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = run(compose(overrides), full_dir)

    original = Trainer.train_one_epoch

    def interrupt_at_epoch_2(self, total_steps):
        if self.stage == "distill" and self.epoch == 2:
            raise KeyboardInterrupt
        return original(self, total_steps)

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupt_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(compose(overrides), cut_dir)
    monkeypatch.setattr(Trainer, "train_one_epoch", original)
    resumed = run(compose([*overrides, "trainer.resume=true"]), cut_dir)

    a = torch.load(full_dir / "student.pt", weights_only=True)
    b = torch.load(cut_dir / "student.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["distill"]["test"] == full["distill"]["test"]
    assert resumed["distill"]["val"] == full["distill"]["val"]
    assert _distill_records(cut_dir) == _distill_records(full_dir)
