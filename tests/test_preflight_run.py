"""Preflight runs each training stage's method once (dry_run.py): errors only a running method can find
fail before the teacher stage trains or anything is written, every RNG is left as it was, the tiny
batch comes through the real loader (extra sample keys survive), and `prepare` gets stand-in
statistics that never touch the cache folder."""

from __future__ import annotations

import json
import random
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from gendd_framework import config as config_lib
from gendd_framework.dry_run import STAND_IN_SAMPLES
from gendd_framework.errors import ConfigError
from gendd_framework.models import build_model
from gendd_framework.models.tap import feature_dim
from gendd_framework.pipeline import run
from gendd_framework.plugins import load_plugins
from gendd_framework.preflight import preflight
from gendd_framework.registry import METHODS
from gendd_framework.runtime import build_data

TINY = ["trainer.epochs=1", "data.train_fraction=0.3"]

load_plugins()  # the built-in components (the pipeline imports them before preflight)

PLUGIN = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from gendd_framework.data.base import DataSplits
    from gendd_framework.data.digits import digits
    from gendd_framework.methods.base import Method
    from gendd_framework.registry import DATASETS, METHODS

    SEEN = []  # what the dry run handed to the methods below


    class _Plain(Method):
        def training_step(self, batch, ctx):
            SEEN.append(("training_step", sorted(batch), tuple(batch["input"].shape)))
            return {"loss": F.cross_entropy(self.student(batch["input"])["logits"], batch["target"])}


    @METHODS.register("dry_no_primary")
    class NoPrimary(_Plain):
        primary_output = "generative"  # declared, but predict below forgets it

        def output_names(self):
            return ("generative", "student")


    @METHODS.register("dry_wrong_shape")
    class WrongShape(_Plain):
        def predict(self, x):
            return {"student": self.student(x)["logits"][:, :3]}


    @METHODS.register("dry_detached_loss")
    class DetachedLoss(_Plain):
        def training_step(self, batch, ctx):
            return {"loss": self.student(batch["input"])["logits"].sum().detach()}


    @METHODS.register("dry_two_views")
    class TwoViews(_Plain):
        batch_keys = ("input", "target", "view_1", "input_1")  # a dataset key and a drawn view

        def training_step(self, batch, ctx):
            out = super().training_step(batch, ctx)
            extra = self.student(batch["view_1"])["logits"] - self.student(batch["input_1"])["logits"]
            return {"loss": out["loss"] + extra.pow(2).mean()}


    @METHODS.register("dry_forgotten_param")
    class ForgottenParam(_Plain):
        def __init__(self, student, teacher=None):
            super().__init__(student, teacher)
            self.proj = nn.Linear(10, 10)

        def param_groups(self, weight_decay):
            return [{"params": list(self.student.parameters()), "weight_decay": weight_decay}]


    @METHODS.register("dry_stats_probe")
    class StatsProbe(_Plain):
        def prepare(self, stats):
            means = stats.class_means("feature")
            finite = bool(torch.isfinite(means).all())
            SEEN.append(("prepare", tuple(means.shape), len(stats.dataset), finite))


    class WithView(torch.utils.data.Dataset):
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            x, y = self.base[i]
            return {"input": x, "target": y, "view_1": x.flip(-1)}


    @DATASETS.register("dry_digits_views")
    def digits_views(**kwargs):
        splits = digits(**kwargs)
        return DataSplits(
            WithView(splits.train), splits.val, splits.test, splits.num_classes, splits.input_shape,
            splits.train_plain, splits.label_mask,
        )
    """
)


@pytest.fixture
def plugin(tmp_path) -> Path:
    path = tmp_path / "dry_run_plugin.py"
    path.write_text(PLUGIN)
    load_plugins([str(path)], scan_default_dirs=False)
    return path


def plugin_method(plugin: Path, name: str | None = None) -> list[str]:
    """Overrides that select a method of the test plugin (method=ce's node, renamed)."""
    keys = [f"plugins=[{plugin}]", "method=ce", "~method.label_smoothing"]
    return keys + ([f"method.name={name}"] if name else [])


def seen() -> list:
    return sys.modules[METHODS.get("dry_no_primary").__module__].SEEN


def fresh_cache(monkeypatch, tmp_path) -> Path:
    cache = tmp_path / "fresh_cache"
    monkeypatch.setenv("GENDD_CACHE_DIR", str(cache))
    return cache


def assert_nothing_written(run_dir: Path, cache: Path) -> None:
    assert not cache.exists(), f"written before the error: {sorted(cache.rglob('*'))}"
    assert not run_dir.exists(), f"written before the error: {sorted(run_dir.rglob('*'))}"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["method.name=dry_no_primary"],
            (
                "preflight of stage 'distill', method 'dry_no_primary', predict",
                "primary_output 'generative'",
                "missing ['generative']",
            ),
        ),
        (
            ["method.name=dry_wrong_shape"],
            ("method 'dry_wrong_shape', predict", "output 'student' is (2, 3)", "(2, 10)"),
        ),
        (["method.name=dry_detached_loss"], ("'dry_detached_loss', training_step", "'loss' does not depend")),
        (
            ["method.name=dry_forgotten_param"],
            ("stage 'distill'", "proj.weight, proj.bias", "no param group"),
        ),
    ],
    ids=["predict-missing-primary", "predict-wrong-shape", "loss-without-grad", "unoptimised-parameter"],
)
def test_plugin_method_errors_fail_at_preflight_before_anything_is_written(
    compose, plugin, monkeypatch, tmp_path, overrides, expected
):
    cache = fresh_cache(monkeypatch, tmp_path)
    cfg = compose([*TINY, *plugin_method(plugin), *overrides])
    with pytest.raises(ConfigError) as info:
        run(cfg, tmp_path / "run")
    message = str(info.value)
    assert "\n" not in message, message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert_nothing_written(tmp_path / "run", cache)


def test_views_and_extra_sample_keys_reach_the_dry_run_through_the_real_loader(
    compose, plugin, monkeypatch, tmp_path
):
    cfg = config_lib.apply_recipe(
        compose([*TINY, *plugin_method(plugin, "dry_two_views"), "data.name=dry_digits_views"])
    )
    data, loader_cfg = build_data(cfg.data)
    seen().clear()
    preflight(cfg, data, loader_cfg)
    ((what, keys, shape),) = [s for s in seen() if s[0] == "training_step"]
    assert {"input", "input_1", "target", "index", "view_1", "all_labelled"} <= set(keys)
    assert shape == (2, *data.input_shape)
    # the same data without the extra key: one line from preflight
    cfg = config_lib.apply_recipe(compose([*TINY, *plugin_method(plugin, "dry_two_views")]))
    with pytest.raises(
        ConfigError, match=r"^preflight of stage 'distill', method 'dry_two_views': .*'view_1'"
    ):
        preflight(cfg, *build_data(cfg.data))


def test_prepare_gets_stand_in_statistics_and_the_cache_folder_stays_empty(
    compose, plugin, monkeypatch, tmp_path
):
    cache = fresh_cache(monkeypatch, tmp_path)
    cfg = config_lib.apply_recipe(compose([*TINY, *plugin_method(plugin, "dry_stats_probe")]))
    data, loader_cfg = build_data(cfg.data)
    seen().clear()
    preflight(cfg, data, loader_cfg)
    teacher_dim = feature_dim(build_model(cfg.teacher.model, num_classes=data.num_classes))
    # statistics on the stand-in samples, spread over the split (per-sample memories stay small)
    stand_in = min(len(data.train), STAND_IN_SAMPLES)
    assert stand_in < len(data.train)
    assert ("prepare", (data.num_classes, teacher_dim), stand_in, True) in seen()
    for method in ("crd", "wkd_l", "nd"):  # statistics users: class features, CKA cost, labels per sample
        cfg = config_lib.apply_recipe(compose([*TINY, f"method={method}", "experiment=digits/transfer_cnn"]))
        preflight(cfg, *build_data(cfg.data))
    assert not cache.exists(), sorted(cache.rglob("*"))


def test_preflight_builds_crd_banks_for_the_stand_in_samples_only(compose, monkeypatch):
    """CRD's two memory banks get one row per stand-in sample in preflight (not one per training
    image: ~1.3 GB on ImageNet), and the run's own build still gets the full split."""
    from gendd_framework.methods.feature import crd

    sizes = []
    bind = crd.CRDTerm.bind

    def recording_bind(self, student, teacher, facts):
        bind(self, student, teacher, facts)
        sizes.append((self.memory_student.shape[0], self.memory_teacher.shape[0]))

    monkeypatch.setattr(crd.CRDTerm, "bind", recording_bind)
    cfg = config_lib.apply_recipe(compose([*TINY, "method=crd", "experiment=digits/transfer_cnn"]))
    data, loader_cfg = build_data(cfg.data)
    preflight(cfg, data, loader_cfg)
    assert sizes == [(STAND_IN_SAMPLES, STAND_IN_SAMPLES)] and len(data.train) > STAND_IN_SAMPLES


def test_preflight_leaves_every_rng_as_it_was(compose):
    cfg = config_lib.apply_recipe(compose([*TINY, "experiment=digits/gendd"]))
    data, loader_cfg = build_data(cfg.data)
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    preflight(cfg, data, loader_cfg)
    after = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(after[0], expected[0]) and np.array_equal(after[1], expected[1])
    assert after[2] == expected[2]


def test_the_dry_run_changes_nothing_in_the_run(compose, monkeypatch, tmp_path):
    """Same config and seed, with and without the dry run: the same metrics, step for step. CRD keeps
    memory banks and draws negatives from the global generator: any state the dry run left behind in
    shared objects or the process would change them."""
    from gendd_framework.dry_run import DryRun

    overrides = [*TINY, "experiment=digits/transfer_cnn", "method=crd", "method.nce_k=64"]
    with_dry_run = run(compose(overrides), tmp_path / "a")
    monkeypatch.setattr(DryRun, "check", lambda self, method, **kwargs: None)
    without = run(compose(overrides), tmp_path / "b")
    assert with_dry_run["distill"]["test"] == without["distill"]["test"]
    rows = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("a", "b")]
    distill = [[json.loads(r) for r in x if '"distill"' in r] for x in rows]
    strip = [[{k: v for k, v in r.items() if k != "epoch_time_s"} for r in x] for x in distill]
    assert strip[0] == strip[1] and len(strip[0]) >= 3  # train, val and test rows
