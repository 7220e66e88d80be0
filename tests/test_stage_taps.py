"""Stage and pre-activation taps outside the CIFAR zoo (whose lists are checked against the upstream
code in test_cifar_official.py), the `:input` tap of in-place modules, and which maps each feature
method reads by default."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gendd_framework.components  # noqa: F401  (registers every built-in component)
from gendd_framework.errors import ConfigError
from gendd_framework.methods.feature.layers import resolve_layers
from gendd_framework.models import FeatureTap, build_model
from gendd_framework.models.feature_stages import feature_stages, preact_stages
from gendd_framework.registry import METHODS


def test_input_tap_of_an_inplace_module_is_read_before_it_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 36, 2))
    x = torch.randn(2, 3, 8, 8)
    out = FeatureTap(model, ["0", "1:input", "1"])(x)
    conv = model[0](x)
    assert torch.equal(out["1:input"], conv) and (out["1:input"] < 0).any()
    assert torch.equal(out["1"], conv.clamp_min(0))


def test_torchvision_resnet_preact_taps_are_the_residual_sums():
    torch.manual_seed(0)
    model = build_model({"name": "tv:resnet18"}, num_classes=10).eval()
    stages = feature_stages(model, (3, 64, 64))
    preact = feature_stages(model, (3, 64, 64), preact=True)
    assert stages == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]  # each stage's last block
    assert preact == [
        "layer1.1.relu:input",
        "layer2.1.relu:input",
        "layer3.1.relu:input",
        "layer4.1.relu:input",
    ]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = FeatureTap(model, [*stages, *preact])(x)
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for i in range(1, 5):
            layer = getattr(model, f"layer{i}")
            h = layer[0](h)
            last = layer[1]  # the last block by hand: its sum before the final ReLU
            expected = last.bn2(last.conv2(F.relu(last.bn1(last.conv1(h))))) + h
            torch.testing.assert_close(out[f"layer{i}.1.relu:input"], expected)
            h = layer[1](h)
            torch.testing.assert_close(out[f"layer{i}.1"], h)
            assert (out[f"layer{i}.1.relu:input"] < 0).any() and (out[f"layer{i}.1"] >= 0).all()


def test_probed_families_read_preact_at_the_stage_ending_relu():
    torch.manual_seed(0)
    model = build_model({"name": "small_cnn", "in_channels": 1, "channels": [4, 8]}, num_classes=10).eval()
    assert feature_stages(model, (1, 8, 8)) == ["features.2", "features.6"]
    assert feature_stages(model, (1, 8, 8), preact=True) == ["features.2:input", "features.6:input"]
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = FeatureTap(model, ["features.2:input", "features.2"])(x)
        bn = model.features[1](model.features[0](x))  # the stage's BN output, before its in-place ReLU
    assert torch.equal(out["features.2:input"], bn) and (bn < 0).any()
    assert torch.equal(out["features.2"], bn.clamp_min(0))


def test_a_family_without_preact_maps_says_so():
    model = build_model({"name": "tv:mobilenet_v3_small"}, num_classes=10)
    assert preact_stages(model, (3, 64, 64)) is None
    with pytest.raises(
        ConfigError, match="MobileNetV3 has no known pre-activation stage maps: set `k` to module"
    ):
        feature_stages(model, (3, 64, 64), keys="`k`", preact=True)
    # a term whose default is the preact list falls back to the stage maps
    assert resolve_layers(model, "auto", (3, 64, 64), "k", preact=True) == feature_stages(model, (3, 64, 64))


def test_layer_keywords_and_indices():
    model = build_model({"name": "resnet20"}, num_classes=100)
    stages = ["layers.2", "layers.5", "layers.8"]
    preact = [f"{s}.relu:input" for s in stages]
    assert resolve_layers(model, "stages", None, "k", preact=True) == stages
    assert resolve_layers(model, "preact", None, "k") == preact
    assert resolve_layers(model, [0, -1], None, "k") == [stages[0], stages[-1]]
    assert resolve_layers(model, [0, -1], None, "k", preact=True) == [preact[0], preact[-1]]
    assert resolve_layers(model, "layers.4", None, "k") == ["layers.4"]


def test_reviewkd_regresses_the_teachers_preact_maps_from_the_students_stage_maps():
    """As the authors' CIFAR code and mdistiller: student `is_feat` maps, teacher `preact=True` maps."""
    teacher = build_model({"name": "wrn_40_2"}, num_classes=100)
    student = build_model({"name": "resnet8x4"}, num_classes=100)
    method = METHODS.build({"name": "reviewkd"}, student=student, teacher=teacher, input_shape=(3, 32, 32))
    term = method.terms[-1]
    assert term.student_maps == ["layers.0", "layers.1", "layers.2"]
    assert term.teacher_maps == ["blocks.6.bn1", "blocks.12.bn1", "bn"]
    method = METHODS.build(
        {"name": "reviewkd", "student_layers": "preact", "teacher_layers": "stages"},
        student=student,
        teacher=teacher,
        input_shape=(3, 32, 32),
    )
    term = method.terms[-1]
    assert term.student_maps == ["layers.0.relu:input", "layers.1.relu:input", "layers.2.relu:input"]
    assert term.teacher_maps == ["blocks.5", "blocks.11", "blocks.17"]


@pytest.mark.parametrize("name", ["at", "vid", "sp", "wkd_f", "fitnet"])
def test_other_feature_methods_read_the_post_relu_stage_maps(name):
    """AT, VID, SP, WKD-F and FitNet read the official post-ReLU `is_feat` maps, as their authors do."""
    teacher = build_model({"name": "resnet32x4"}, num_classes=100)
    student = build_model({"name": "shufflev2"}, num_classes=100)
    method = METHODS.build({"name": name}, student=student, teacher=teacher, input_shape=(3, 32, 32))
    term = next(t for t in method.terms if getattr(t, "teacher_taps", None))
    taps = [*term.student_taps, *term.teacher_taps]
    assert taps and not any(t.endswith(":input") for t in taps), taps
    assert set(term.student_taps) <= {"units.3", "units.11", "units.15"}
    assert set(term.teacher_taps) <= {"layers.4", "layers.9", "layers.14"}
