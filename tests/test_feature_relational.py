"""AT, SP, PKT and RKD: float64 checks of the pure losses against loops written from the formulas,
their identities and invariances, the registered terms against the pure functions, and layer handling
(different resolutions, a teacher with more stages, models without maps, bad layer choices)."""

from __future__ import annotations

import inspect
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import gendd_framework.methods  # noqa: F401  (registers the terms and methods)
from gendd_framework.context import StepContext
from gendd_framework.errors import ConfigError
from gendd_framework.losses.attention import at_loss, attention_map
from gendd_framework.losses.pkt import pkt_loss
from gendd_framework.losses.rkd import rkd_angle_loss, rkd_distance_loss, rkd_loss
from gendd_framework.losses.similarity import sp_loss
from gendd_framework.methods.feature.at import as_map
from gendd_framework.models import build_model
from gendd_framework.registry import LOSSES, METHODS

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
D = torch.float64


def rand(*shape, seed=0, scale=1.0, relu=False):
    x = scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)
    return x.clamp_min(0) if relu else x


def np_(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy()


def close(a, b, rtol=1e-12):
    a, b = (float(v.detach()) if torch.is_tensor(v) else float(v) for v in (a, b))
    return np.allclose(a, b, rtol=rtol, atol=1e-15)


# ----------------------------------------------------------------------------------------------- AT
def at_reference(s: np.ndarray, t: np.ndarray, p: float, mode: str) -> float:
    """Loop over samples: q = mean_c |A|^p over positions, divided by its L2 norm; code = mean of the
    squared differences over samples and positions, paper = mean over samples of the L2 distance."""
    batch = s.shape[0]
    dists = []
    for b in range(batch):
        qs = [np.mean(np.abs(s[b, :, i, j]) ** p) for i in range(s.shape[2]) for j in range(s.shape[3])]
        qt = [np.mean(np.abs(t[b, :, i, j]) ** p) for i in range(t.shape[2]) for j in range(t.shape[3])]
        qs = np.array(qs) / math.sqrt(sum(v * v for v in qs))
        qt = np.array(qt) / math.sqrt(sum(v * v for v in qt))
        dists.append(sum((a - c) ** 2 for a, c in zip(qs, qt)))
    if mode == "code":
        return sum(dists) / (batch * s.shape[2] * s.shape[3])
    return sum(math.sqrt(d) for d in dists) / batch


@pytest.mark.parametrize("p", [2.0, 1.0, 3.5])
@pytest.mark.parametrize("mode", ["code", "paper"])
def test_at_matches_the_formula(p, mode):
    s, t = rand(3, 4, 5, 3, seed=1), rand(3, 7, 5, 3, seed=2)  # different channel counts, non-square map
    assert close(at_loss(s, t, p, mode), at_reference(np_(s), np_(t), p, mode))


def test_at_identities_and_invariances():
    s, t = rand(4, 6, 4, 4, seed=3, relu=True), rand(4, 9, 4, 4, seed=4, relu=True)
    assert float(at_loss(s, s.clone())) == 0.0
    leaf = s.clone().requires_grad_(True)
    zero = at_loss(leaf, s, mode="paper")  # the L2 distance at 0: a zero, finite gradient
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.isfinite(leaf.grad).all()
    base = at_loss(s, t)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    assert close(at_loss(s[:, perm], t), base)  # channel permutation
    assert close(at_loss(s, t[:, torch.arange(8, -1, -1)]), base)
    assert close(at_loss(3.7 * s, 0.2 * t), base)  # a positive rescaling of a map
    # with p = 2, |A|^2 = A^2: the official A.pow(p) on signed maps gives the same map
    signed = rand(2, 3, 4, 4, seed=5)
    official = F.normalize(signed.pow(2).mean(1).flatten(1), dim=1)
    assert torch.allclose(attention_map(signed, 2.0), official, rtol=1e-13)
    # the code reduction is the batch mean of the squared L2 distance divided by H*W
    paper_sq = (attention_map(s) - attention_map(t)).norm(dim=1).pow(2).mean()
    assert close(base, paper_sq / 16)


def test_at_bad_input():
    with pytest.raises(ConfigError, match="equal spatial size"):
        at_loss(rand(2, 3, 4, 4), rand(2, 3, 2, 2))
    with pytest.raises(ConfigError, match="mode"):
        at_loss(rand(2, 3, 4, 4), rand(2, 3, 4, 4), mode="sum")
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\)"):
        at_loss(rand(2, 3), rand(2, 3))


# ----------------------------------------------------------------------------------------------- SP
def sp_reference(s: np.ndarray, t: np.ndarray) -> float:
    batch = s.shape[0]
    fs, ft = s.reshape(batch, -1), t.reshape(batch, -1)
    total = 0.0
    for i in range(batch):
        gs = np.array([sum(fs[i, k] * fs[j, k] for k in range(fs.shape[1])) for j in range(batch)])
        gt = np.array([sum(ft[i, k] * ft[j, k] for k in range(ft.shape[1])) for j in range(batch)])
        gs, gt = gs / math.sqrt(sum(gs**2)), gt / math.sqrt(sum(gt**2))
        total += sum((gt - gs) ** 2)
    return total / batch**2


def test_sp_matches_the_formula():
    s, t = rand(5, 3, 2, 2, seed=6), rand(5, 11, seed=7)  # a map and a vector: only B x B matters
    assert close(sp_loss(s, t), sp_reference(np_(s), np_(t)))


def test_sp_identities_and_invariances():
    s, t = rand(6, 8, seed=8), rand(6, 5, seed=9)
    base = sp_loss(s, t)
    assert float(sp_loss(s, s.clone())) == 0.0
    assert close(sp_loss(4.0 * s, 0.01 * t), base)  # global rescaling of either side
    q, _ = torch.linalg.qr(rand(8, 8, seed=10))
    assert close(sp_loss(s @ q, t), base, rtol=1e-10)  # any rotation of the feature space
    assert close(sp_loss(s[:, torch.randperm(8)], t), base)
    # per-sample rescaling is not an invariance of SP (column scales survive the row normalisation)
    assert not close(sp_loss(s * torch.linspace(0.5, 2.0, 6, dtype=D)[:, None], t), base, rtol=1e-3)
    with pytest.raises(ConfigError, match="same batch size"):
        sp_loss(rand(4, 3), rand(5, 3))


# ---------------------------------------------------------------------------------------------- PKT
def pkt_reference(s: np.ndarray, t: np.ndarray, eps: float) -> float:
    batch = s.shape[0]

    def probs(x):
        x = x.reshape(batch, -1)
        unit = [row / (math.sqrt(sum(row**2)) + eps) for row in x]
        k = np.array([[(float(np.dot(a, b)) + 1) / 2 for b in unit] for a in unit])
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = probs(s), probs(t)
    pairs = itertools.product(range(batch), repeat=2)
    return sum(pt[i, j] * math.log((pt[i, j] + eps) / (ps[i, j] + eps)) for i, j in pairs) / batch**2


@pytest.mark.parametrize("eps", [1e-7, 0.0])
def test_pkt_matches_the_formula(eps):
    s, t = rand(6, 9, seed=11), rand(6, 4, 2, 2, seed=12, relu=True)
    assert close(pkt_loss(s, t, eps), pkt_reference(np_(s), np_(t), eps))


def test_pkt_identities_and_invariances():
    s, t = rand(5, 7, seed=13), rand(5, 3, seed=14)
    assert float(pkt_loss(s, s.clone())) == 0.0
    base = pkt_loss(s, t, eps=0.0)
    scales = torch.tensor([0.1, 2.0, 5.0, 1.0, 30.0], dtype=D)[:, None]
    assert close(pkt_loss(s * scales, t * scales.flip(0), eps=0.0), base)  # per-sample positive rescaling
    q, _ = torch.linalg.qr(rand(7, 7, seed=15))
    assert close(pkt_loss(s @ q, t, eps=0.0), base, rtol=1e-10)
    # a zero feature row stays zero (kernel 1/2 to everyone) with a finite gradient
    z = s.clone().requires_grad_(True)
    zeroed = z * torch.tensor([0.0, 1, 1, 1, 1], dtype=D)[:, None]
    loss = pkt_loss(zeroed, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert close(loss, pkt_reference(np_(zeroed), np_(t), 1e-7))


# ---------------------------------------------------------------------------------------------- RKD
def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def rkd_reference(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """(distance, angle) from explicit loops over pairs and triplets."""
    batch = s.shape[0]
    s, t = s.reshape(batch, -1), t.reshape(batch, -1)

    def dists(x):
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(batch)] for i in range(batch)])
        return d / (d.sum() / (batch * (batch - 1)))

    def cosines(x):
        out = np.zeros((batch, batch, batch))
        for i, j, k in itertools.product(range(batch), repeat=3):
            if i not in (j, k):
                a, b = x[j] - x[i], x[k] - x[i]
                out[i, j, k] = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
        return out

    ds, dt = dists(s), dists(t)
    distance = sum(huber(a - b) for a, b in zip(ds.ravel(), dt.ravel())) / batch**2
    cs, ct = cosines(s), cosines(t)
    angle = sum(huber(a - b) for a, b in zip(cs.ravel(), ct.ravel())) / batch**3
    return distance, angle


def test_rkd_matches_the_formula():
    s, t = rand(5, 6, seed=16, scale=3.0), rand(5, 2, 2, 2, seed=17, scale=0.3)  # Huber on both branches
    distance, angle = rkd_reference(np_(s), np_(t))
    assert close(rkd_distance_loss(s, t), distance)
    assert close(rkd_angle_loss(s, t), angle)
    assert close(rkd_loss(s, t, 25.0, 50.0)["loss"], 25 * distance + 50 * angle)
    assert rkd_loss(s, t, 2.0, 0.0).keys() == {"loss", "distance"}  # a zero-weight part is skipped
    assert close(rkd_loss(s, t, 2.0, 0.0)["loss"], 2 * distance)
    assert close(rkd_loss(s, t, 0.0, 3.0)["loss"], 3 * angle)
    assert abs(rkd_distance_loss(s, t) - rkd_distance_loss(s + 100.0, t)) < 1e-10  # centring is exact


def test_rkd_identities_and_invariances():
    s, t = rand(6, 5, seed=18), rand(6, 9, seed=19)

    def rkd(*pair):
        return rkd_loss(*pair, 25.0, 50.0)["loss"]

    assert float(rkd(s, s.clone())) == 0.0
    base = rkd(s, t)
    q, _ = torch.linalg.qr(rand(5, 5, seed=20))
    assert close(rkd(2.5 * s @ q + 7.0, t), base, rtol=1e-9)  # similarity transforms of a side
    assert close(rkd(s, 0.1 * t - 3.0), base, rtol=1e-9)
    one = rand(1, 5, seed=21).requires_grad_(True)
    value = rkd(one, rand(1, 3))
    value.backward()
    assert float(value.detach()) == 0.0 and torch.isfinite(one.grad).all()  # no relations in a batch of one
    duplicate = torch.cat([s[:1], s[:1], s[1:]]).requires_grad_(True)  # coincident samples
    loss = rkd(duplicate, rand(7, 9, seed=22))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(duplicate.grad).all()


# ------------------------------------------------------------------------------- terms and layers
def cnn(channels, classes=10):
    torch.manual_seed(len(channels) * 100 + channels[-1])
    return build_model({"name": "small_cnn", "channels": channels}, num_classes=classes)


def build(name, student, teacher, **kwargs):
    return METHODS.build(
        {"name": name, **kwargs}, student=student, teacher=teacher, num_classes=10, input_shape=(1, 8, 8)
    )


def outputs(method, seed=23):
    """Student and teacher taps in float64 (the models go back to float32 for the next build)."""
    method.double()
    x = rand(6, 1, 8, 8, seed=seed)
    out = method.student(x), method.teacher_outputs(x)
    method.float()
    return out


def test_terms_equal_the_pure_functions_at_the_default_layers():
    student, teacher = cnn([4, 8]), cnn([8, 16, 32])  # (4,8,8) (8,4,4) vs (8,8,8) (16,4,4) (32,2,2)
    at = build("at", student, teacher)
    term = at.terms[-1]
    assert term.pairs == [("features.2", "features.6"), ("features.6", "features.10")]  # paired by depth
    s, t = outputs(at)
    pooled = [F.adaptive_avg_pool2d(s["features.2"], (4, 4)), F.adaptive_avg_pool2d(s["features.6"], (2, 2))]
    expected = [at_loss(pooled[0], t["features.6"]), at_loss(pooled[1], t["features.10"])]
    value = term(s, t, {}, StepContext())
    assert value["loss"].dtype == D
    assert close(value["loss"], sum(expected)) and close(value["pair0"], expected[0])

    sp = build("sp", student, teacher)
    assert sp.terms[-1].pairs == [("features.6", "features.10")]  # the deepest stage maps
    s, t = outputs(sp)
    assert close(sp.terms[-1](s, t, {}, StepContext()), sp_loss(s["features.6"], t["features.10"]))

    pkt = build("pkt", student, teacher, eps=1e-5)
    assert pkt.terms[-1].pairs == [("feature", "feature")]
    s, t = outputs(pkt)
    assert close(pkt.terms[-1](s, t, {}, StepContext()), pkt_loss(s["feature"], t["feature"], 1e-5))

    rkd = build("rkd", student, teacher, distance_weight=2.0, angle_weight=3.0)
    s, t = outputs(rkd)
    value = rkd.terms[-1](s, t, {}, StepContext())
    distance, angle = rkd_reference(np_(s["feature"]), np_(t["feature"]))  # the weights reach the term
    assert close(value["distance"], distance) and close(value["angle"], angle)
    assert close(value["loss"], 2.0 * distance + 3.0 * angle)


def test_explicit_layers_indices_paths_and_lengths():
    student, teacher = cnn([4, 8]), cnn([8, 16, 32])
    term = build("at", student, teacher, student_layers=[0], teacher_layers=["features.2"]).terms[-1]
    assert term.pairs == [("features.2", "features.2")]
    term = build("sp", student, teacher, student_layers="features.2", teacher_layers=-2).terms[-1]
    assert term.pairs == [("features.2", "features.6")]
    # explicit lists of different length are ambiguous; `auto` on one side pairs by depth
    with pytest.raises(ConfigError, match="student_layers.*teacher_layers.*same length"):
        build("at", student, teacher, student_layers=[0, 1], teacher_layers=[2])
    term = build("at", student, teacher, teacher_layers=[1, 2]).terms[-1]
    assert term.pairs == [("features.2", "features.6"), ("features.6", "features.10")]
    # SP/PKT/RKD on several pairs: summed and logged per pair
    pkt = build("pkt", student, teacher, student_layers=["feature", 1], teacher_layers=["feature", 2])
    s, t = outputs(pkt)
    value = pkt.terms[-1](s, t, {}, StepContext())
    parts = [pkt_loss(s["feature"], t["feature"]), pkt_loss(s["features.6"], t["features.10"])]
    assert close(value["loss"], sum(parts)) and close(value["pair1"], parts[1])


def test_models_without_maps_and_bad_layers():
    mlp, teacher = build_model({"name": "mlp", "hidden": [8]}, num_classes=10), cnn([8, 16])
    for name in ("at", "sp"):
        with pytest.raises(ConfigError, match="student_layers"):
            build(name, mlp, teacher)
    x, y = rand(5, 1, 8, 8, seed=24).float(), torch.tensor([0, 1, 2, -1, 3])
    batch = {"input": x, "target": y, "index": torch.arange(5), "all_labelled": False}
    for name in ("pkt", "rkd"):
        method = build(name, mlp, teacher)
        out = method.training_step(batch, StepContext())
        assert torch.isfinite(out["loss"]) and name in out
    with pytest.raises(ConfigError, match="student_layers.*feature.*\\(8,\\)"):
        build("at", cnn([4, 8]), teacher, student_layers="feature")
    with pytest.raises(ConfigError, match="index 5 is out of range"):
        build("sp", cnn([4, 8]), teacher, teacher_layers=5)
    with pytest.raises(ConfigError, match="mode"):
        LOSSES.build({"name": "at", "mode": "sum"})
    with pytest.raises(ConfigError, match="not both 0"):
        LOSSES.build({"name": "rkd", "distance_weight": 0, "angle_weight": 0})


def test_terms_run_in_full_precision_under_autocast():
    method = build("sp", cnn([4, 8]), cnn([8, 64]))
    x = rand(4, 1, 8, 8, seed=25).float()
    s, t = method.student(x), method.teacher_outputs(x)
    half = {k: v.bfloat16() for k, v in s.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = method.terms[-1](half, t, {}, StepContext())
    assert value.dtype == torch.float32
    assert close(value, sp_loss(half["features.6"].float(), t["features.6"]), rtol=1e-6)


def test_heterogeneous_cifar_pair_builds_and_steps():
    teacher = build_model({"name": "resnet8x4"}, num_classes=100)
    student = build_model({"name": "shufflev2"}, num_classes=100)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    batch = {"input": x, "target": y, "index": torch.arange(2), "all_labelled": True}
    for name in ("at", "sp"):  # PKT/RKD read the pooled feature, which every classifier has
        method = METHODS.build({"name": name}, student=student, teacher=teacher, input_shape=(3, 32, 32))
        assert torch.isfinite(method.training_step(batch, StepContext())["loss"])
        if name == "at":  # shufflev2 stages are at 16, 8, 4; resnet8x4's at 32, 16, 8: AT pools the teacher
            pairs = [("units.3", "layers.0"), ("units.11", "layers.1"), ("units.15", "layers.2")]
            assert method.terms[-1].pairs == pairs


def test_at_reads_vit_tokens_on_their_patch_grid():
    x = torch.arange(2 * 5 * 3, dtype=D).reshape(2, 5, 3)  # a class token + a 2x2 grid of 3-d tokens
    grid = as_map(x, prefix=1)
    assert grid.shape == (2, 3, 2, 2)
    for b, k, c in itertools.product(range(2), range(4), range(3)):  # timm patches are row-major
        assert grid[b, c, k // 2, k % 2] == x[b, 1 + k, c]
    vit = build_model(
        {"name": "timm:vit_tiny_patch16_224", "img_size": 8, "patch_size": 2, "depth": 2, "embed_dim": 8,
         "num_heads": 2, "in_chans": 1},
        num_classes=10,
    )  # fmt: skip
    method = build("at", vit, cnn([8, 16]))
    term = method.terms[-1]
    assert term.pairs == [("blocks.0", "features.2"), ("blocks.1", "features.6")] and term.prefix == (1, 0)
    s, t = outputs(method)
    expected = at_loss(F.adaptive_avg_pool2d(t["features.2"], (4, 4)), as_map(s["blocks.0"], 1))
    expected = expected + at_loss(as_map(s["blocks.1"], 1), t["features.6"])
    assert close(term(s, t, {}, StepContext())["loss"], expected)
    with pytest.raises(ConfigError, match="square patch grid"):
        term.check_pair("blocks.0", (6, 8), "features.2", (8, 8, 8))


@pytest.mark.parametrize(
    "name,term,weight",
    [("at", "at", 1000.0), ("sp", "sp", 3000.0), ("pkt", "pkt", 30000.0), ("rkd", "rkd", 1.0)],
)
def test_methods_defaults_and_configs(name, term, weight):
    student, teacher = cnn([4, 8]), cnn([8, 64])
    method = build(name, student, teacher)
    assert method.keys == ["ce", term] and method.weights == [1.0, weight]
    with_kd = build(name, student, teacher, kd_weight=0.9, temperature=2.0)
    assert with_kd.keys == ["ce", "kd_kl", term] and with_kd.weights == [1.0, 0.9, weight]
    assert with_kd.terms[1].temperature == 2.0
    # the YAML lists every factory argument with the factory's default
    config = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    config.pop("per_recipe", None)
    params = inspect.signature(METHODS.get(name)).parameters
    runtime = {"student", "teacher", "input_shape", "num_samples"}
    assert config.pop("name") == name
    assert set(config) == set(params) - runtime
    for key, value in config.items():
        assert value == params[key].default, key
    if name == "rkd":
        rkd = method.terms[-1]
        assert (rkd.distance_weight, rkd.angle_weight, rkd.eps) == (25.0, 50.0, 1e-12)
