"""The CIFAR zoo reproduces the reference (RepDistiller/CRD) sizes and honours the model contract.

That the zoo computes the official functions (logits, stage maps) is checked against the upstream code
in test_cifar_official.py; here, sizes and the model contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import gendd_framework.models.cifar_zoo  # noqa: F401  (registers the zoo)
from gendd_framework.registry import MODELS

# name -> (trainable parameters at num_classes=100, pooled feature dim feeding the classifier)
REFERENCE: dict[str, tuple[int, int]] = {
    "resnet8": (83_892, 64),
    "resnet14": (181_108, 64),
    "resnet20": (278_324, 64),
    "resnet32": (472_756, 64),
    "resnet44": (667_188, 64),
    "resnet56": (861_620, 64),
    "resnet110": (1_736_564, 64),
    "resnet8x4": (1_233_540, 256),
    "resnet32x4": (7_433_860, 256),
    "wrn_16_1": (180_916, 64),
    "wrn_16_2": (703_284, 128),
    "wrn_40_1": (569_780, 64),
    "wrn_40_2": (2_255_156, 128),
    "vgg8": (3_965_028, 512),
    "vgg11": (9_277_284, 512),
    "vgg13": (9_462_180, 512),
    "vgg16": (14_774_436, 512),
    "vgg19": (20_086_692, 512),
    "mobile_half": (812_836, 1280),
    "ShuffleV1": (949_258, 960),
    "ShuffleV2": (1_355_528, 1024),
    "ResNet50": (23_705_252, 2048),
    "ResNet18": (11_220_132, 512),  # mdistiller's CIFAR model dict
    "ResNet34": (21_328_292, 512),  # both upstreams' resnetv2.py
}

ALIASES = {
    "mobile_half": "mobilenetv2_cifar",
    "MobileNetV2": "mobilenetv2_cifar",
    "ShuffleV1": "shufflev1",
    "ShuffleV2": "shufflev2",
    "ResNet50": "resnet50_cifar",
    "ResNet18": "resnet18_cifar",
    "ResNet34": "resnet34_cifar",
}


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears, "model has no nn.Linear classifier"
    return linears[-1]


@pytest.mark.parametrize("name", list(REFERENCE))
def test_size_forward_and_feature(name: str) -> None:
    params, feat_dim = REFERENCE[name]
    torch.manual_seed(0)
    model = MODELS.get(name)(num_classes=100)
    assert n_trainable(model) == params

    head = last_linear(model)
    assert type(head) is nn.Linear
    assert head.in_features == feat_dim and head.out_features == 100

    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    handle.remove()

    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 100)
    assert torch.isfinite(logits).all()
    assert len(seen) == 1 and seen[0].shape == (2, feat_dim)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_num_classes_changes_only_the_classifier(name: str) -> None:
    params, feat_dim = REFERENCE[name]
    model = MODELS.get(name)(num_classes=10)
    assert params - n_trainable(model) == (100 - 10) * (feat_dim + 1)


@pytest.mark.parametrize(("alias", "canonical"), list(ALIASES.items()))
def test_aliases_resolve_to_the_same_factory(alias: str, canonical: str) -> None:
    assert alias in MODELS and canonical in MODELS
    assert MODELS.get(alias) is MODELS.get(canonical)
    assert alias in MODELS.aliases_of(canonical)


def test_factories_are_documented_and_typed() -> None:
    for name in {*REFERENCE, *ALIASES.values()}:
        factory = MODELS.get(name)
        assert (factory.__doc__ or "").strip(), f"{name} has no docstring"
        assert "num_classes" in factory.__annotations__, f"{name} lacks a typed num_classes"


def test_every_official_cifar_state_dict_has_the_zoo_size() -> None:
    """The oracle fixtures hold the upstream state-dict shapes: their parameter counts are the zoo's."""
    stats = ("running_mean", "running_var", "num_batches_tracked")
    for path in sorted((Path(__file__).parent / "fixtures" / "cifar_official").glob("*.json")):
        fx = json.loads(path.read_text())
        official = sum(math.prod(shape) for key, shape in fx["state_dict"] if not key.endswith(stats))
        spec = dict(fx["zoo_model"])
        model = MODELS.get(spec.pop("name"))(num_classes=100, **spec)
        assert n_trainable(model) == official, fx["arch"]
        if fx["arch"] in REFERENCE:
            assert REFERENCE[fx["arch"]][0] == official
