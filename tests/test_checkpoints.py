"""Weights files in every supported format load through `build_model` (the `checkpoint` / `weights`
keys), are told apart from files of another architecture, and fail with errors that say why.

Official CIFAR checkpoints are rebuilt from the upstream oracle (tests/fixtures/cifar_official, see
test_cifar_official.py); their logits are compared with the upstream code's.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import gendd_framework.models.cifar_zoo  # noqa: F401
from gendd_framework.config import plain
from gendd_framework.data.vision import imagenet_eval
from gendd_framework.errors import ConfigError
from gendd_framework.models import build_model
from gendd_framework.stages.teacher import single_teacher
from test_cifar_official import fixture, official_checkpoint, oracle

BIN = Path(sys.executable).parent


def official_state(arch: str) -> dict[str, torch.Tensor]:
    fx = fixture(arch)
    return oracle.synthetic_weights(fx["state_dict"], fx["weights_seed"], fx["bn_var_scale"])


def logit_error(model: torch.nn.Module, arch: str) -> float:
    fx = fixture(arch)
    with torch.no_grad():
        logits = model.eval()(oracle.fixture_input())
    return float((logits - torch.tensor(fx["logits"])).abs().max())


def load(path: Path, name: str = "resnet8", num_classes: int = 100, **node) -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model({"name": name, "checkpoint": str(path), **node}, num_classes=num_classes)


def test_own_state_dicts_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model({"name": "wrn_16_1"}, num_classes=100)
    torch.save(model.state_dict(), tmp_path / "student.pt")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    for file in ("student.pt", "wrapped.pth"):
        loaded = load(tmp_path / file, "wrn_16_1")
        assert all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values())
        )


@pytest.mark.parametrize("layout", ["plain", "dataparallel", "safetensors", "distiller", "named"])
def test_official_state_dict_layouts_load(tmp_path, layout):
    """Bare state dict, DataParallel prefixes, safetensors, an mdistiller distiller checkpoint (student
    and teacher under `module.student.` / `module.teacher.`), or the format named explicitly."""
    state, node = official_state("resnet8"), {}
    path = tmp_path / "weights.pth"
    if layout == "plain":
        torch.save(state, path)
    elif layout == "dataparallel":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif layout == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file(state, str(path))
    elif layout == "distiller":
        teacher = official_state("resnet56")
        nested = {**{f"module.student.{k}": v for k, v in state.items()}}
        nested |= {f"module.teacher.{k}": v for k, v in teacher.items()}
        torch.save({"model": nested, "epoch": 240, "best_acc": 0.5}, path)
    else:
        torch.save({"model": state}, path)
        node = {"weights_format": "mdistiller"}
    assert logit_error(load(path, **node), "resnet8") <= 1e-5


def test_missing_bn_step_counters_are_tolerated(tmp_path):
    state = {k: v for k, v in official_state("resnet8").items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": state}, tmp_path / "old.pth")
    assert logit_error(load(tmp_path / "old.pth"), "resnet8") <= 1e-5


def test_weights_format_must_fit_the_file_and_the_model(tmp_path):
    path = official_checkpoint(fixture("resnet8"), tmp_path)
    with pytest.raises(ConfigError) as err:
        load(path, weights_format="gendd")
    text = str(err.value)
    assert text.splitlines()[0].endswith(
        "detected gendd format; after conversion 45 missing keys, 54 unexpected keys, 0 shape mismatches"
    )
    assert "weights_format: auto reads it as repdistiller (47 tensors fit)" in text
    choices = "choose from auto, gendd, repdistiller"
    with pytest.raises(
        ConfigError, match=f"weights_format 'torchvision' does not apply to CifarResNet; {choices}"
    ):
        load(path, weights_format="torchvision")
    with pytest.raises(
        ConfigError, match="weights_format 'crd' is unknown; choose from auto, gendd, repdistiller"
    ):
        load(path, weights_format="crd")


def test_wrong_architecture_is_told_apart_from_an_unknown_layout(tmp_path):
    # the right format, another depth: the names fit, the missing blocks and mismatched shapes are listed
    path = official_checkpoint(fixture("resnet20"), tmp_path)
    with pytest.raises(ConfigError) as err:
        load(path, "resnet56")
    lines = str(err.value).splitlines()
    assert lines[0] == (
        f"weights in {path} do not fit model 'resnet56' (CifarResNet): detected repdistiller format; after "
        "conversion 180 missing keys, 0 unexpected keys, 0 shape mismatches"
    )
    assert any(
        line.startswith("  missing keys (180): layer1.3.conv1.weight, layer1.3.bn1.weight,") for line in lines
    )
    assert "another architecture (check the model name)" in lines[-1]
    # another width: shape mismatches name the file's and the model's shapes
    path = official_checkpoint(fixture("resnet32x4"), tmp_path)
    with pytest.raises(ConfigError) as err:
        load(path, "resnet56")
    assert "conv1.weight: file (32, 3, 3, 3) vs model (16, 3, 3, 3)" in str(err.value)
    # the right architecture in a layout no format knows: nothing is named, first keys are shown
    state = official_state("resnet56")
    torch.save({"model": {f"backbone.{k}": v for k, v in state.items()}}, tmp_path / "odd.pth")
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "odd.pth", "resnet56")
    assert "no tensor of this model is named in the file" in str(err.value)
    assert "the file's first keys are ['backbone.conv1.weight'" in str(err.value)


def test_partial_loading_reports_and_refuses_a_head_only_file(tmp_path, caplog):
    path = official_checkpoint(fixture("resnet20"), tmp_path)
    with caplog.at_level(logging.INFO, logger="gendd_framework.models.checkpoints"):
        model = load(path, "resnet32", strict=False)
    message = caplog.records[-1].getMessage()
    assert caplog.records[-1].levelno == logging.WARNING
    assert message.startswith(f"loaded 107 of 167 tensors of model 'resnet32' (CifarResNet) from {path}")
    assert "strict=false left 60 at their initial values (layer1.3.conv1.weight," in message
    state = official_state("resnet20")
    assert torch.equal(model.layers[2].body[0].weight, state["layer1.2.conv1.weight"])  # loaded
    by_name = state["layer3.0.conv1.weight"]  # resnet20's layers.6, resnet32's layers.10
    assert torch.equal(model.layers[10].body[0].weight, by_name)
    head_only = {"model": {"fc.weight": state["fc.weight"], "fc.bias": state["fc.bias"]}}
    torch.save(head_only, tmp_path / "fc.pth")
    with pytest.raises(
        ConfigError, match=r"no layer beyond the classifier would load \(2 of 107 tensors fit"
    ):
        load(tmp_path / "fc.pth", "resnet20", strict=False)


def test_teacher_config_with_another_architectures_file_says_so(compose, tmp_path, monkeypatch):
    """`teacher=resnet56` finding a resnet20 checkpoint at its path: the error names the format and
    what is missing (the old message stopped at 'Error(s) in loading state_dict for CifarResNet:')."""
    official_checkpoint(fixture("resnet20"), tmp_path)
    (tmp_path / "resnet20_vanilla").rename(tmp_path / "resnet56_vanilla")
    monkeypatch.setenv("GENDD_TEACHERS", str(tmp_path))
    cfg = compose(["teacher=resnet56", "data=cifar100"])
    ctx = SimpleNamespace(data=SimpleNamespace(num_classes=100), cfg=cfg)
    with pytest.raises(ConfigError) as err:
        single_teacher(ctx, plain(cfg.teacher))
    first, *detail = str(err.value).splitlines()
    assert first.endswith(
        "do not fit model 'resnet56' (CifarResNet): detected repdistiller format; after conversion "
        "180 missing keys, 0 unexpected keys, 0 shape mismatches"
    )
    entries = "['epoch', 'model', 'accuracy', 'optimizer']"
    assert f"  file: the 'model' entry of a dict with entries {entries}, 128 tensors" in detail


def test_torchvision_state_dict_loads_into_a_tv_model(tmp_path):
    torch.manual_seed(0)
    source = build_model({"name": "tv:resnet18"}, num_classes=10)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "tv.pth"
    )
    loaded = load(tmp_path / "tv.pth", "tv:resnet18", num_classes=10, weights_format="torchvision")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))


def test_timm_state_dict_goes_through_timms_own_filter(tmp_path):
    """A ViT saved at 160 px loads into a 64 px one: timm's checkpoint_filter_fn resamples pos_embed."""
    torch.manual_seed(0)
    source = build_model({"name": "timm:test_vit"}, num_classes=10)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    loaded = load(tmp_path / "vit.pth", "timm:test_vit", num_classes=10, img_size=64)
    assert loaded.pos_embed.shape == (1, 17, 64) and source.pos_embed.shape == (1, 101, 64)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_gendd_train_loads_an_official_teacher_end_to_end(tmp_path):
    """The user's path: `gendd-train teacher=resnet56` with $GENDD_TEACHERS holding the upstream
    `resnet56_vanilla/ckpt_epoch_240.pth`; the teacher stage evaluates the loaded network (its test CE
    equals the one computed here with the oracle-checked weights)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):  # 100 classes: the teacher's CIFAR-100 head
        for c in range(100):
            folder = tmp_path / "data" / split / f"c{c:03d}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    path = official_checkpoint(fixture("resnet56"), tmp_path / "teachers")
    args = [
        str(BIN / "gendd-train"), "stages=[teacher]", "teacher=resnet56", "student=resnet20", "method=ce",
        "data=imagenet", f"data.root={tmp_path / 'data'}", "data.size=32", "data.val_fraction=0.5",
        "data.loader.num_workers=0", "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "GENDD_TEACHERS": str(tmp_path / "teachers"),
        "GENDD_CACHE_DIR": str(tmp_path / "cache"),
    }
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "summary.json").read_text())["teacher"]
    assert record["source"] == str(path)
    model = load(path, "resnet56").eval()
    transform = imagenet_eval(32)
    images = sorted((tmp_path / "data" / "val").glob("*/*.png"))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    y = torch.tensor([int(p.parent.name[1:]) for p in images])
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x), y).item()
    assert record["test"]["ce/teacher"] == pytest.approx(expected, abs=1e-4)
