"""The CIFAR zoo computes the official networks, checked against the upstream code's own outputs.

The oracle is `tests/fixtures/cifar_official/<arch>.json`, written by `tools/make_cifar_fixtures.py`
from the RepDistiller / mdistiller model files at a recorded commit: the official state dict's keys
and shapes, a seed (+ per-BN variance scales) that regenerate its weights, and the official model's
logits and `is_feat` / `preact` maps on a seeded batch. Each test rebuilds the weights, writes them as
an official checkpoint (`<arch>_vanilla/ckpt_epoch_240.pth`, a dict whose `model` entry is the state
dict), loads that through `build_model` / the teacher config path, and compares with the oracle.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import gendd_framework.models.cifar_zoo  # noqa: F401  (registers the zoo)
from gendd_framework.config import plain
from gendd_framework.models import FeatureTap, build_model
from gendd_framework.models.checkpoints import file_names
from gendd_framework.models.feature_stages import feature_stages
from gendd_framework.stages.teacher import single_teacher

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = sorted((ROOT / "tests" / "fixtures" / "cifar_official").glob("*.json"))
ATOL = 1e-5


def _load_oracle():
    spec = importlib.util.spec_from_file_location(
        "make_cifar_fixtures", ROOT / "tools" / "make_cifar_fixtures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


oracle = _load_oracle()


def fixture(arch: str) -> dict:
    return json.loads((ROOT / "tests" / "fixtures" / "cifar_official" / f"{arch}.json").read_text())


def official_checkpoint(fx: dict, folder: Path) -> Path:
    """`<folder>/<arch>_vanilla/ckpt_epoch_240.pth` laid out as the upstream training scripts save it."""
    state = oracle.synthetic_weights(fx["state_dict"], fx["weights_seed"], fx["bn_var_scale"])
    path = folder / f"{fx['arch']}_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    optimizer = {"state": {}, "param_groups": [{"lr": 0.0005, "momentum": 0.9, "params": [0, 1]}]}
    torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(70.0), "optimizer": optimizer}, path)
    return path


def max_logit_error(model: torch.nn.Module, fx: dict) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(oracle.fixture_input(fx["input"]["seed"], fx["input"]["shape"]))
    return float((logits - torch.tensor(fx["logits"])).abs().max())


def test_fixtures_cover_both_upstreams_and_record_their_commits():
    assert len(FIXTURES) >= 23  # the 22 architectures both model dicts share + mdistiller's ResNet18
    records = [json.loads(p.read_text()) for p in FIXTURES]
    commits = {r["upstream"]: r["commit"] for r in records}
    assert commits == {
        "HobbitLong/RepDistiller": "b84f547c5db6a35318d4671d7d5c4de74c822403",
        "megvii-research/mdistiller": "a08d46f10d6102bd6e3f258ca5ac880b020ea259",
    }
    shared = [r["arch"] for r in records if r["cross_checked"]]
    assert len(shared) == 22, shared  # built by both upstreams with identical logits
    assert sum(p.stat().st_size for p in FIXTURES) < 2_000_000
    torch.testing.assert_close(oracle.fixture_input().double().sum().item(), records[0]["input"]["sum"])


@pytest.fixture(scope="module", params=[p.stem for p in FIXTURES])
def official(request, tmp_path_factory):
    """The zoo model loaded through build_model from an official-format checkpoint, and one forward
    of the oracle batch with its default stage taps, preact taps and pooled feature."""
    fx = fixture(request.param)
    path = official_checkpoint(fx, tmp_path_factory.mktemp("teachers"))
    torch.manual_seed(0)  # a different random init than the weights: only loading can match
    model = build_model({**fx["zoo_model"], "checkpoint": str(path)}, num_classes=fx["num_classes"]).eval()
    path.unlink()
    stages = feature_stages(model, (3, 32, 32))
    preact = feature_stages(model, (3, 32, 32), preact=True)
    with torch.no_grad():
        out = FeatureTap(model, [*stages, *preact, "feature"])(oracle.fixture_input(fx["input"]["seed"]))
    return SimpleNamespace(fx=fx, model=model, stages=stages, preact=preact, out=out)


def test_official_names_map_onto_the_zoo_in_order(official):
    fx, model = official.fx, official.model
    ours = model.state_dict()
    names = file_names(model, "repdistiller")
    assert list(names.values()) == [key for key, _ in fx["state_dict"]]
    assert [list(ours[k].shape) for k in names] == [shape for _, shape in fx["state_dict"]]


def test_official_checkpoint_gives_the_official_logits(official):
    error = (official.out["logits"] - torch.tensor(official.fx["logits"])).abs().max()
    assert error <= ATOL


def assert_same_map(value: torch.Tensor, summary: dict, what: str) -> None:
    assert list(value.shape) == summary["shape"], what
    flat = value.detach().double().reshape(-1)
    scale = math.sqrt(summary["sumsq"] / flat.numel())
    got = flat[summary["index"]]
    torch.testing.assert_close(
        got, torch.tensor(summary["values"], dtype=torch.float64), atol=ATOL * max(1, scale), rtol=0, msg=what
    )
    torch.testing.assert_close(float((flat * flat).sum()), summary["sumsq"], rtol=1e-5, atol=1e-6, msg=what)
    torch.testing.assert_close(
        float(flat.sum()), summary["sum"], rtol=1e-5, atol=1e-4 * flat.numel() ** 0.5, msg=what
    )


def test_stage_taps_are_the_official_is_feat_and_preact_maps(official):
    """Default stages = the official `forward(is_feat=True)` maps without the stem (the pooled vector is
    the `feature` tap); `preact=True` stages = the official `preact` maps."""
    fx, stages, preact, out = official.fx, official.stages, official.preact, official.out
    official_stages, official_preact = fx["is_feat"][1:], fx["preact"][1:]  # [0] is the stem
    assert len(stages) == len(official_stages) and len(preact) == len(official_preact)
    for i, (name, summary) in enumerate(zip(stages, official_stages)):
        assert_same_map(out[name], summary, f"{fx['arch']} is_feat[{i + 1}] vs tap {name}")
    for i, (name, summary) in enumerate(zip(preact, official_preact)):
        assert_same_map(out[name], summary, f"{fx['arch']} preact[{i + 1}] vs tap {name}")
    assert_same_map(out["feature"], fx["pooled"], f"{fx['arch']} pooled feature")


# the CIFAR-100 teachers that ship a conf/teacher/<name>.yaml, with the official checkpoint folder name
TEACHERS = {
    "resnet56": "resnet56",
    "resnet110": "resnet110",
    "resnet32x4": "resnet32x4",
    "wrn_40_2": "wrn_40_2",
    "vgg13": "vgg13",
    "resnet50_cifar": "ResNet50",
}


@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_teacher_config_loads_the_official_checkpoint(compose, teacher, tmp_path, monkeypatch):
    """`teacher=<name>` with the checkpoints under $GENDD_TEACHERS in the upstream layout: the teacher
    the run builds gives the official logits."""
    fx = fixture(TEACHERS[teacher])
    official_checkpoint(fx, tmp_path)
    monkeypatch.setenv("GENDD_TEACHERS", str(tmp_path))
    cfg = compose([f"teacher={teacher}", "data=cifar100"])
    ctx = SimpleNamespace(data=SimpleNamespace(num_classes=100), cfg=cfg)
    model, record = single_teacher(ctx, plain(cfg.teacher))
    assert record["source"] == str(tmp_path / f"{fx['arch']}_vanilla" / "ckpt_epoch_240.pth")
    assert max_logit_error(model, fx) <= ATOL
