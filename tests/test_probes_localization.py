"""Localization probe: Grad-CAM against models whose class maps are known in closed form (GAP conv net:
Grad-CAM = CAM = ReLU(sum_c v_kc A_c)/HW; a token model with mean pooling), the ViT layer rule, and
the overlap measures against hand-computed values and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from gendd_framework.analysis.probes.common import ProbeUnavailable, probe_data
from gendd_framework.analysis.probes.gradcam import CamLayer, cam_layer, grad_cam
from gendd_framework.analysis.probes.localization import (
    average_ranks,
    probe_localization,
    spearman,
    topk_iou,
    topk_mask,
    win_rate,
)
from gendd_framework.analysis.probes.settings import LocalizationSettings
from gendd_framework.models import build_model


class GapNet(nn.Module):
    """conv -> ReLU (-> optional 2x2 max-pool) -> global average pool -> linear: a CAM network."""

    feature_trunk = ("features",)

    def __init__(self, channels: int = 5, classes: int = 4, pool: bool = False) -> None:
        super().__init__()
        layers = [nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(inplace=True)]
        if pool:
            layers += [nn.MaxPool2d(2), nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.features[:-2](x)


def closed_form_cam(model: GapNet, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """CAM of Zhou et al.: for a GAP + linear head, dy_k/dA_c,p = v_kc/P, so Grad-CAM = ReLU(v_k·A)/P."""
    with torch.no_grad():
        a = model.maps(x).double()
    v = model.fc.weight.double()[classes]  # (B, C)
    return F.relu(torch.einsum("bc,bchw->bhw", v, a)) / (a.shape[2] * a.shape[3])


def test_grad_cam_equals_the_closed_form_cam_of_a_gap_network():
    torch.manual_seed(0)
    model = GapNet().eval()
    x = torch.randn(6, 1, 8, 8)
    classes = torch.tensor([0, 1, 2, 3, 0, 1])
    layer = cam_layer(model, (1, 8, 8))
    assert layer == CamLayer("features.1")  # the stage end: ReLU(inplace) output
    cam = grad_cam(model, layer, x, classes, batch_size=4)  # two batches
    torch.testing.assert_close(cam.double(), closed_form_cam(model, x, classes), rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_of_a_coarser_map_is_its_bilinear_upsampling():
    torch.manual_seed(1)
    model = GapNet(pool=True).eval()
    x = torch.randn(3, 1, 8, 8)
    classes = torch.tensor([2, 0, 1])
    cam = grad_cam(model, cam_layer(model, (1, 8, 8)), x, classes)
    expected = F.interpolate(closed_form_cam(model, x, classes)[:, None], size=(8, 8), mode="bilinear")[:, 0]
    assert cam.shape == (3, 8, 8)
    torch.testing.assert_close(cam.double(), expected, rtol=1e-5, atol=1e-7)


class TokenNet(nn.Module):
    """A ViT-shaped model: 2x2 patches of a 4x6 image -> 2x3 grid, a class token in front, one block,
    mean pooling over the patch tokens, linear head (timm's attribute names)."""

    num_prefix_tokens = 1
    global_pool = "avg"

    def __init__(self, dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, 2, stride=2)
        self.patch_embed.grid_size = (2, 3)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(nn.Linear(dim, dim))
        self.head = nn.Linear(dim, classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.blocks(torch.cat([self.cls.expand(len(x), -1, -1), t], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(x)[:, 1:].mean(1))


def test_grad_cam_on_tokens_drops_the_class_token_and_uses_the_patch_grid():
    torch.manual_seed(2)
    model = TokenNet().eval()
    x = torch.randn(4, 1, 4, 6)
    classes = torch.tensor([0, 1, 2, 1])
    layer = cam_layer(model, (1, 4, 6), path="blocks.0")
    assert (layer.prefix_tokens, layer.grid) == (1, (2, 3))
    cam = grad_cam(model, layer, x, classes)
    with torch.no_grad():
        patches = model.tokens(x)[:, 1:].double()  # (B, 6, C), row-major over the 2x3 grid
    v = model.head.weight.double()[classes]
    expected = (F.relu(torch.einsum("bc,bpc->bp", v, patches)) / 6).reshape(4, 2, 3)
    expected = F.interpolate(expected[:, None], size=(4, 6), mode="bilinear")[:, 0]
    torch.testing.assert_close(cam.double(), expected, rtol=1e-5, atol=1e-7)


def test_class_token_vit_is_read_at_its_last_block_input():
    """timm ViT reading its class token: the last block's patch outputs never reach the logits, so
    Grad-CAM there is all zeros; its input (the tokens the last attention mixes) is not."""
    torch.manual_seed(3)
    spec = {"name": "timm:vit_tiny_patch16_224", "img_size": 8, "patch_size": 2, "in_chans": 1,
            "embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0}  # fmt: skip
    vit = build_model(spec, num_classes=10).eval()
    x = torch.randn(5, 1, 8, 8)
    classes = torch.arange(5)
    layer = cam_layer(vit, (1, 8, 8))
    assert layer.describe() == "blocks.1:input" and layer.grid == (4, 4) and layer.prefix_tokens == 1
    cam = grad_cam(vit, layer, x, classes)
    assert cam.shape == (5, 8, 8) and bool((cam.flatten(1).std(1) > 0).all())
    at_output = grad_cam(vit, cam_layer(vit, (1, 8, 8), path="blocks.1"), x, classes)
    assert bool((at_output == 0).all())


def test_mlp_has_no_map_and_says_so_in_one_line():
    mlp = build_model({"name": "mlp", "in_features": 64, "hidden": [8]}, num_classes=10)
    with pytest.raises(ProbeUnavailable) as info:
        cam_layer(mlp, (1, 8, 8))
    assert "\n" not in str(info.value) and "MLP" in str(info.value)


def test_topk_iou_by_hand():
    a = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 3)
    b = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [4.0, 2.0, 3.0, 1.0]])
    torch.testing.assert_close(topk_iou(a, b, 0.5), torch.tensor([1.0, 0.0, 1 / 3], dtype=torch.float64))
    # ceil(0.3 * 4) = 2 pixels; ties resolved toward the lower index
    assert topk_mask(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 0.3).tolist() == [[True, True, False, False]]


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(20, 64)).astype(float)  # many ties
    b = a + rng.normal(0, 2, size=a.shape)
    ours = spearman(torch.tensor(a), torch.tensor(b)).numpy()
    expected = [spearmanr(a[i], b[i]).statistic for i in range(len(a))]
    np.testing.assert_allclose(ours, expected, rtol=1e-10)
    assert average_ranks(torch.tensor([[10.0, 20.0, 10.0, 30.0]])).tolist() == [[1.5, 3.0, 1.5, 4.0]]


def test_win_rate_counts_closer_maps_and_half_ties():
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[1.0, 0.1], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0]])
    c = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    # image 0: student closer; 1: control closer; 2: tie; 3: student closer -> (1 + 0 + 0.5 + 1) / 4
    assert win_rate(t, s, c) == pytest.approx(62.5)


def test_probe_identical_student_agrees_fully_and_is_deterministic():
    torch.manual_seed(4)
    teacher, other = GapNet().eval(), GapNet().eval()
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 4, (10,))
    same = probe_localization(teacher, teacher, probe_data(teacher, teacher, x, y, 4), LocalizationSettings())
    m = same.metrics
    kept = 100 - m["localization/flat_maps"]
    assert kept > 0 and m["localization/iou_top20"] == pytest.approx(1.0)
    assert m["localization/spearman"] == pytest.approx(1.0) and m["localization/cosine"] == pytest.approx(1.0)
    data = probe_data(teacher, other, x, y, 4)
    first = probe_localization(teacher, other, data, LocalizationSettings(), control=teacher)
    again = probe_localization(teacher, other, data, LocalizationSettings(), control=teacher)
    assert first.metrics == again.metrics
    # the control *is* the teacher: its map is never farther than the student's
    assert first.metrics["localization/win_rate_vs_control"] <= 50.0
