"""Teacher-output cache (engine/teacher_cache.py): replayed augmentation, cached == uncached losses,
invalidation by teacher / transform / data, fingerprint checks, storage dtype, merging, end to end."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import gendd_framework.components  # noqa: F401  (registrations)
from gendd_framework.data.base import BatchDataset, TensorImages
from gendd_framework.data.digits import RandomShift
from gendd_framework.data.replay import ReplayViews
from gendd_framework.engine.loggers import JsonlLogger, LoggerGroup
from gendd_framework.engine.teacher_cache import (
    CacheConfig,
    TeacherCache,
    attach_teacher_cache,
    fingerprint,
    wrap_train_dataset,
)
from gendd_framework.engine.trainer import Trainer, TrainerConfig
from gendd_framework.errors import ConfigError
from gendd_framework.models import build_model
from gendd_framework.pipeline import run
from gendd_framework.registry import METHODS

N = 40
NUMERICS = {"precision": "fp32", "channels_last": False, "compile_teacher": None, "device": "cpu"}


def images(shift: int = 1, noise: float = 0.2) -> TensorImages:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 1, 8, 8, generator=g), torch.arange(N) % 10
    return TensorImages(x, y, RandomShift(shift, noise) if shift or noise else None)


def method(teacher_seed: int = 1, name: str = "kd") -> nn.Module:
    torch.manual_seed(0)
    student = build_model({"name": "small_cnn", "channels": [4, 8]}, num_classes=10)
    torch.manual_seed(teacher_seed)
    width = 8 if name == "distill" else 16  # feature_mse needs the student's feature size
    teacher = build_model({"name": "small_cnn", "channels": [8, width]}, num_classes=10).eval()
    extra = (
        {"losses": [{"name": "ce"}, {"name": "kd_kl"}, {"name": "feature_mse"}]} if name == "distill" else {}
    )
    return METHODS.build(
        {"name": name, **extra},
        student=student,
        teacher=teacher,
        num_classes=10,
        input_shape=(1, 8, 8),
        num_samples=N,
    )


def attach(m: nn.Module, root, mode: str = "replay", data: TensorImages | None = None, **cfg):
    data = data if data is not None else images()
    return attach_teacher_cache(
        m,
        {"mode": mode, "dir": str(root), **cfg},
        train_dataset=data,
        data_config={"name": "tiny", "shift": 1},
        numerics=NUMERICS,
        default_dir=root,
        epochs=3,
    )


def fit(m: nn.Module, tmp, cache: TeacherCache | None, epochs: int = 3) -> list[dict]:
    """Train with a shuffled loader over replayable views; returns the per-epoch train records."""
    dataset = ReplayViews(BatchDataset(images()), seed=7, views=epochs) if cache is None else None
    dataset = dataset if dataset is not None else wrap_train_dataset(BatchDataset(images()), cache)
    gen = torch.Generator()
    loader = DataLoader(dataset, batch_size=10, shuffle=True, drop_last=True, generator=gen)
    opt = torch.optim.SGD(m.param_groups(5e-4), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    logger = LoggerGroup([JsonlLogger(str(tmp))])
    logger.jsonl_path = logger.loggers[0].path
    loop = Trainer(
        m,
        opt,
        sched,
        loader,
        None,
        config=TrainerConfig(epochs=epochs, progress=False),
        device=torch.device("cpu"),
        ckpt_dir=tmp / "ckpt",
        stage="distill",
        logger=logger,
        shuffle_seed=0,
        shuffle_generator=gen,
    )
    loop.fit()
    if cache is not None:
        cache.flush()
    rows = [json.loads(x) for x in (tmp / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("train/")} for r in rows if "train/loss" in r]


# -- replayable views -------------------------------------------------------------------------------
def test_replay_views_depend_on_seed_view_and_index_only():
    views = ReplayViews(BatchDataset(images()), seed=3, views=2)
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a = views[5]["input"]
    torch.rand(3)  # global RNG use in between changes nothing
    assert torch.equal(views[5]["input"], a) and views[5]["view"] == 0
    views.set_epoch(1)
    b = views[5]
    assert b["view"] == 1 and not torch.equal(b["input"], a)
    views.set_epoch(2)  # view 2 mod 2 = 0: the epoch-0 draw again
    assert torch.equal(views[5]["input"], a)
    assert not torch.equal(views[6]["input"], a)
    other = ReplayViews(BatchDataset(images()), seed=4, views=2)
    assert not torch.equal(other[5]["input"], a)
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    fresh = ReplayViews(BatchDataset(images()), seed=3, views=2)
    fresh[5]
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]


# -- the main guarantee -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kd", "distill"])
def test_cached_run_gives_the_same_losses_as_an_uncached_one_under_augmentation(tmp_path, name):
    uncached = method(name=name)
    reference = fit(uncached, tmp_path / "a", None)
    filling, reading = method(name=name), method(name=name)
    fill_cache = attach(filling, tmp_path / "cache", seed=7)
    filled = fit(filling, tmp_path / "b", fill_cache)
    read_cache = attach(reading, tmp_path / "cache", seed=7)
    assert read_cache.folder == fill_cache.folder
    calls = []
    reading.teacher.model.register_forward_hook(lambda *a: calls.append(1))
    read = fit(reading, tmp_path / "c", read_cache)
    assert fill_cache.misses == 12 and fill_cache.hits == 0  # 3 epochs x 4 batches, all computed
    assert read_cache.hits == 12 and read_cache.misses == 0 and not calls  # the teacher never ran
    assert reference == filled == read  # identical per-epoch losses
    for a, b in zip(uncached.student.parameters(), reading.student.parameters()):
        assert torch.equal(a, b)
    assert any(r["train/loss"] != reference[0]["train/loss"] for r in reference[1:])


def test_views_repeat_when_fewer_than_epochs(tmp_path):
    m = method()
    cache = attach(m, tmp_path, views=1, seed=7)
    wrapped = wrap_train_dataset(BatchDataset(images()), cache)
    assert isinstance(wrapped, ReplayViews) and wrapped.views == 1
    fit(m, tmp_path / "run", cache, epochs=2)  # epoch 2 replays view 0: every batch is a hit
    assert cache.misses == 4 and cache.hits == 4


# -- invalidation -----------------------------------------------------------------------------------
def test_another_teacher_transform_or_data_gets_another_cache(tmp_path):
    base = attach(method(), tmp_path).folder
    assert attach(method(), tmp_path).folder == base  # same everything: same cache
    changed_teacher = method()
    with torch.no_grad():
        changed_teacher.teacher.model.features[0].weight[0, 0, 0, 0] += 1e-3
    assert attach(changed_teacher, tmp_path).folder != base
    assert attach(method(teacher_seed=2), tmp_path).folder != base
    assert attach(method(), tmp_path, data=images(noise=0.3)).folder != base  # transform settings
    assert attach(method(), tmp_path, seed=1).folder != base  # another replay seed
    assert attach(method(), tmp_path, views=2).folder != base
    m = method()
    other_data = attach_teacher_cache(
        m,
        {"mode": "replay", "dir": str(tmp_path)},
        train_dataset=images(),
        data_config={"name": "tiny2"},
        numerics=NUMERICS,
        default_dir=tmp_path,
        epochs=3,
    )
    assert other_data.folder != base
    bf16 = attach_teacher_cache(
        method(),
        {"mode": "replay", "dir": str(tmp_path)},
        train_dataset=images(),
        data_config={"name": "tiny", "shift": 1},
        numerics={**NUMERICS, "precision": "bf16"},
        default_dir=tmp_path,
        epochs=3,
    )
    assert bf16.folder != base
    assert json.loads((base / "meta.json").read_text())["transform"].count("max_shift=1, noise_std=0.2")


def test_deterministic_mode_needs_a_deterministic_transform(tmp_path):
    with pytest.raises(ConfigError, match="mode=replay"):
        attach(method(), tmp_path, mode="deterministic")
    cache = attach(method(), tmp_path, mode="deterministic", data=images(shift=0, noise=0.0))
    assert cache.views == 1 and wrap_train_dataset(BatchDataset(images()), cache).__class__ is BatchDataset
    assert attach(method(), tmp_path, mode="off") is None


def test_a_different_input_at_a_cached_index_is_refused(tmp_path):
    m = method()
    cache = attach(m, tmp_path, mode="deterministic", data=images(0, 0.0))
    x = torch.randn(4, 1, 8, 8)
    batch = {"input": x, "index": torch.arange(4)}
    first = m.teacher_outputs(x, batch)
    again = m.teacher_outputs(x, batch)
    assert cache.hits == 1 and all(torch.equal(first[k], again[k]) for k in first)
    x2 = x.clone()
    x2[2, 0, 3, 4] += 0.5
    with pytest.raises(ConfigError, match="sample 2"):
        m.teacher_outputs(x2, {"input": x2, "index": torch.arange(4)})
    flipped = x.flip(-1)  # a flip keeps the per-sample sum: the weighted sum still catches it
    assert torch.allclose(fingerprint(flipped)[:, 0], fingerprint(x)[:, 0])
    with pytest.raises(ConfigError, match="differs from the input"):
        m.teacher_outputs(flipped, {"input": flipped, "index": torch.arange(4)})


def test_half_precision_storage_returns_the_computed_dtype(tmp_path):
    m = method(name="distill")
    cache = attach(m, tmp_path, mode="deterministic", data=images(0, 0.0), dtype="float16")
    x = torch.randn(5, 1, 8, 8)
    batch = {"input": x, "index": torch.arange(5)}
    computed = m.teacher_outputs(x, batch)
    read = m.teacher_outputs(x, batch)
    assert cache.hits == 1 and set(read) == set(computed) == {"logits", "feature"}
    for key in computed:
        assert read[key].dtype == torch.float32
        assert torch.allclose(read[key], computed[key], rtol=1e-3, atol=1e-3)


def test_flush_merges_what_another_run_saved(tmp_path):
    a, b = method(), method()
    cache_a = attach(a, tmp_path, mode="deterministic", data=images(0, 0.0))
    cache_b = attach(b, tmp_path, mode="deterministic", data=images(0, 0.0))
    x = torch.randn(N, 1, 8, 8)
    xa, xb, xc = x[:10], x[10:20], x[:20]  # the teacher is called on the batch's own tensor
    a.teacher_outputs(xa, {"input": xa, "index": torch.arange(10)})
    b.teacher_outputs(xb, {"input": xb, "index": torch.arange(10, 20)})
    cache_a.flush()
    cache_b.flush()  # loads a's file, keeps both halves
    c = method()
    cache_c = attach(c, tmp_path, mode="deterministic", data=images(0, 0.0))
    c.teacher_outputs(xc, {"input": xc, "index": torch.arange(20)})
    assert cache_c.hits == 1


def test_cache_config_errors_name_the_key():
    assert CacheConfig.from_mapping({"mode": False}).mode == "off"  # an unquoted YAML `off`
    for node, expected in (
        ({"mode": "always"}, "trainer.teacher_cache.mode"),
        ({"views": 0}, "trainer.teacher_cache.views"),
        ({"dtype": "int8"}, "trainer.teacher_cache.dtype"),
        ({"mdoe": "replay"}, "mdoe"),
    ):
        with pytest.raises(ConfigError, match=expected):
            CacheConfig.from_mapping(node)


# -- end to end -------------------------------------------------------------------------------------
def _losses(run_dir) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k.startswith("train/")}
        for r in rows
        if r["stage"] == "distill" and "train/loss" in r
    ]


def test_replay_cache_end_to_end_reuses_outputs_and_invalidates_on_transform(compose, tmp_path, caplog):
    caplog.set_level("INFO", logger="gendd_framework")
    base = [
        "method=kd",
        "trainer.epochs=1",
        "data.train_fraction=0.3",
        "data.max_shift=1",
        "trainer.teacher_cache.mode=replay",
        f"trainer.teacher_cache.dir={tmp_path / 'cache'}",
    ]
    run(compose(base), tmp_path / "fill")
    run(compose(base), tmp_path / "read")
    stats = [r.getMessage() for r in caplog.records if "teacher cache {" in r.getMessage()]
    assert "'hits': 0" in stats[0] and "'misses': 0" in stats[1]
    assert _losses(tmp_path / "fill") == _losses(tmp_path / "read")
    run(compose([*base, "data.noise_std=0.2"]), tmp_path / "other")  # another transform: a new folder
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2
    with pytest.raises(ConfigError, match="persistent_workers"):
        run(compose([*base, "trainer.speed.persistent_workers=true"]), tmp_path / "bad")
