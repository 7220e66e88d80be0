"""WKD-F and projector-ensemble feature distillation: float64 checks of the maths against independent
computations (the general Gaussian W₂ formula via matrix square roots, explicit loops, adaptive
pooling), identities (zero at equal inputs, shift invariance of the spread term, ensemble of one), the
term wrappers against the pure functions, and clear errors for unusable layer/shape choices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

import gendd_framework.components  # noqa: F401  (registrations)
from gendd_framework.context import StepContext
from gendd_framework.errors import ConfigError
from gendd_framework.losses.projector_ensemble import (
    direction_alignment_loss,
    ensemble_projection,
    projector_ensemble_loss,
)
from gendd_framework.losses.wkd_feature import channel_gaussians, diag_gaussian_w2, wkd_feature_terms
from gendd_framework.methods.feature.wkd_f import BottleneckRegressor
from gendd_framework.models import build_model
from gendd_framework.registry import LOSSES, METHODS

CTX = StepContext()


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def cnn(channels, seed=0):
    torch.manual_seed(seed)
    return build_model({"name": "small_cnn", "channels": list(channels)}, num_classes=10)


def batch_of(n=6, seed=3, dtype=torch.float64):
    return {
        "input": rand(n, 1, 8, 8, seed=seed).to(dtype),
        "target": torch.arange(n) % 10,
        "all_labelled": True,
    }


# -- WKD-F maths -------------------------------------------------------------------------------------
def general_w2(mu1, var1, mu2, var2):
    """‖μ₁ − μ₂‖² + tr(S₁ + S₂ − 2 (S₂^½ S₁ S₂^½)^½) with S = diag(var), by matrix square roots."""
    s1, s2 = np.diag(var1), np.diag(var2)
    root2 = sqrtm(s2)
    cross = sqrtm(root2 @ s1 @ root2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(cross)))


def test_diag_gaussian_w2_matches_the_general_formula():
    mu1, mu2 = rand(4, 6, seed=1), rand(4, 6, seed=2)
    std1, std2 = rand(4, 6, seed=3).abs() + 0.1, rand(4, 6, seed=4).abs() + 0.1
    mean_part, std_part = diag_gaussian_w2(mu1, std1, mu2, std2)
    assert torch.equal(mean_part, ((mu1 - mu2) ** 2).sum(1))  # the mean part alone: the μ distance
    got = mean_part + std_part
    for b in range(4):
        expected = general_w2(
            mu1[b].numpy(), std1[b].square().numpy(), mu2[b].numpy(), std2[b].square().numpy()
        )
        assert got[b].item() == pytest.approx(expected, rel=1e-10)
    assert torch.equal(sum(diag_gaussian_w2(mu1, std1, mu1, std1)), torch.zeros(4, dtype=torch.float64))


def test_wkd_feature_terms_at_grid_one_are_the_batch_mean_of_w2_between_channel_gaussians():
    s, t = rand(3, 5, 4, 6, seed=5), rand(3, 5, 4, 6, seed=6, scale=2.0)
    eps = 1e-5
    mean_term, std_term = wkd_feature_terms(s, t, grid=1, eps=eps)
    total = 0.0
    for b in range(3):
        xs, xt = s[b].reshape(5, -1).numpy(), t[b].reshape(5, -1).numpy()
        var_s, var_t = xs.var(axis=1, ddof=1) + eps, xt.var(axis=1, ddof=1) + eps
        total += general_w2(xs.mean(axis=1), var_s, xt.mean(axis=1), var_t)
    assert (mean_term + std_term).item() == pytest.approx(total / 3, rel=1e-10)
    mean_only = sum(float(((s[b].mean((1, 2)) - t[b].mean((1, 2))) ** 2).sum()) for b in range(3)) / 3
    assert mean_term.item() == pytest.approx(mean_only, rel=1e-12)


def loop_terms(s, t, grid, eps):
    """Mean and std terms by explicit loops over samples, channels and adaptive-pooling cells."""
    b_n, c_n, h, w = s.shape
    cells = lambda n: [(math.floor(i * n / grid), math.ceil((i + 1) * n / grid)) for i in range(grid)]  # noqa: E731
    mean_sum = std_sum = 0.0
    for b in range(b_n):
        for c in range(c_n):
            for h0, h1 in cells(h):
                for w0, w1 in cells(w):
                    stats = []
                    for x in (s, t):
                        vals = [x[b, c, i, j].item() for i in range(h0, h1) for j in range(w0, w1)]
                        m = sum(vals) / len(vals)
                        var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
                        stats.append((m, math.sqrt(var + eps)))
                    mean_sum += (stats[0][0] - stats[1][0]) ** 2
                    std_sum += (stats[0][1] - stats[1][1]) ** 2
    return mean_sum / (grid * grid * b_n), std_sum / (grid * grid * b_n)


@pytest.mark.parametrize(("size", "grid"), [((4, 4), 1), ((4, 6), 2), ((7, 7), 3), ((7, 5), 4)])
def test_wkd_feature_terms_match_loops_with_overlapping_cells(size, grid):
    s, t = rand(2, 3, *size, seed=7), rand(2, 3, *size, seed=8)
    mean_term, std_term = wkd_feature_terms(s, t, grid=grid, eps=1e-3)
    expected_mean, expected_std = loop_terms(s, t, grid, 1e-3)
    assert mean_term.item() == pytest.approx(expected_mean, rel=1e-10)
    assert std_term.item() == pytest.approx(expected_std, rel=1e-10)
    # the cell means are exactly adaptive average pooling (an independent route to the cell boundaries)
    mean, _ = channel_gaussians(s, grid)
    assert torch.allclose(mean, torch.nn.functional.adaptive_avg_pool2d(s, grid), rtol=0, atol=1e-12)


def test_wkd_feature_identities_and_gradients():
    x = rand(2, 4, 5, 5, seed=9)
    assert [v.item() for v in wkd_feature_terms(x, x.clone(), grid=2)] == [0.0, 0.0]
    shift = rand(1, 4, 1, 1, seed=10)  # a per-channel shift moves the means only
    t = rand(2, 4, 5, 5, seed=11)
    _, std_a = wkd_feature_terms(x, t)
    mean_b, std_b = wkd_feature_terms(x + shift, t)
    assert std_b.item() == pytest.approx(std_a.item(), rel=1e-12)
    assert mean_b.item() == pytest.approx(
        ((x + shift).mean((2, 3)) - t.mean((2, 3))).square().sum().item() / 2, rel=1e-12
    )
    flat = torch.ones(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)  # zero spread: eps keeps it smooth
    sum(wkd_feature_terms(flat, t)).backward()
    assert torch.isfinite(flat.grad).all() and flat.grad.abs().sum() > 0
    half = wkd_feature_terms(x.to(torch.bfloat16), t.to(torch.bfloat16))
    assert all(v.dtype == torch.float32 for v in half)


# -- WKD-F term and method ---------------------------------------------------------------------------
def test_wkd_f_term_equals_the_pure_function_and_method_sums_ce_and_weighted_term():
    student, teacher = cnn([4, 8]), cnn([8, 16], seed=1)
    method = METHODS.build(
        {"name": "wkd_f", "mean_weight": 3.0, "grid": 2, "feature_weight": 0.5},
        student=student, teacher=teacher, num_classes=10, input_shape=(1, 8, 8),
    )  # fmt: skip
    method.double()
    term = method.terms[1]
    assert len(term.student_taps) == len(term.teacher_taps) == 1  # the last stage map of each side
    batch = batch_of()
    s_out, t_out = method.student(batch["input"]), method.teacher_outputs(batch["input"])
    f_s, f_t = s_out[term.student_taps[0]], t_out[term.teacher_taps[0]]
    assert f_s.shape[1:] == (8, 4, 4) and f_t.shape[1:] == (16, 4, 4)
    method.eval()  # BN in the projector uses running statistics: the same projection twice
    got = term(s_out, t_out, batch, CTX)
    mean_term, std_term = wkd_feature_terms(term.projector(f_s), f_t, grid=2, eps=1e-5)
    assert got["loss"].item() == pytest.approx((3.0 * mean_term + std_term).item(), rel=1e-12)
    assert got["mean"].item() == pytest.approx(mean_term.item(), rel=1e-12)
    out = method.training_step(batch, CTX)
    assert out["loss"].item() == pytest.approx((out["ce"] + 0.5 * out["wkd_f"]).item(), rel=1e-12)


def test_wkd_f_trains_the_projector_and_student():
    method = METHODS.build({"name": "wkd_f"}, student=cnn([4, 8]), teacher=cnn([8, 16], seed=1),
                           num_classes=10, input_shape=(1, 8, 8))  # fmt: skip
    method.training_step(batch_of(dtype=torch.float32), CTX)["loss"].backward()
    projector = method.terms[1].projector
    assert isinstance(projector.conv, torch.nn.Conv2d) and projector.conv.weight.grad.abs().sum() > 0
    assert method.student.model.features[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("s_hw", "t_hw"), [(4, 4), (8, 4), (2, 4)])
def test_bottleneck_regressor_reaches_the_teacher_map_shape(s_hw, t_hw):
    reg = BottleneckRegressor((6, s_hw, s_hw), (5, t_hw, t_hw), hidden=7)
    assert reg(torch.randn(2, 6, s_hw, s_hw)).shape == (2, 5, t_hw, t_hw)
    with pytest.raises(ConfigError, match="bottleneck"):
        BottleneckRegressor((6, 3, 3), (5, 4, 4))


def test_wkd_f_projector_none_and_bad_configs_fail_clearly():
    same = dict(student=cnn([4, 8]), teacher=cnn([4, 8], seed=1), num_classes=10, input_shape=(1, 8, 8))
    method = METHODS.build({"name": "wkd_f", "projector": "none"}, **same)
    batch = batch_of(dtype=torch.float32)
    s_out = method.student(batch["input"])
    term = method.terms[1]
    assert term(s_out, s_out, batch, CTX)["loss"].item() == 0.0  # identity projector, identical maps
    other = dict(same, teacher=cnn([8, 16], seed=1))
    with pytest.raises(ConfigError, match="'none' needs equal maps"):
        METHODS.build({"name": "wkd_f", "projector": "none"}, **other)
    with pytest.raises(ConfigError, match="grid=4 .* lower `grid`"):
        METHODS.build({"name": "wkd_f", "grid": 4}, **other)
    with pytest.raises(ConfigError, match="projector must be one of"):
        LOSSES.build({"name": "wkd_f", "projector": "mlp"})
    with pytest.raises(ConfigError, match="grid must be an integer"):
        LOSSES.build({"name": "wkd_f", "grid": 0})
    with pytest.raises(ConfigError, match="one map per side, but `student_layers`"):
        METHODS.build({"name": "wkd_f", "student_layers": [0, 1]}, **other)
    mlp = build_model({"name": "mlp", "hidden": [16]}, num_classes=10)
    with pytest.raises(ConfigError, match="student_layers"):
        METHODS.build({"name": "wkd_f"}, **dict(other, student=mlp))


# -- projector ensemble ------------------------------------------------------------------------------
def loop_projector_ensemble(f_s, f_t, weights, biases, relu=True):
    """(1/B) Σ_b (1 − cos) with every projection and dot product written out as loops."""
    total = 0.0
    for b in range(f_s.shape[0]):
        fused = []
        for o in range(weights[0].shape[0]):
            acc = 0.0
            for w, bias in zip(weights, biases):
                z = bias[o].item() + sum(w[o, i].item() * f_s[b, i].item() for i in range(f_s.shape[1]))
                acc += max(z, 0.0) if relu else z
            fused.append(acc / len(weights))
        dot = sum(a * c for a, c in zip(fused, f_t[b].tolist()))
        norm_s = math.sqrt(sum(a * a for a in fused))
        norm_t = math.sqrt(sum(c * c for c in f_t[b].tolist()))
        total += 1 - dot / (norm_s * norm_t)
    return total / f_s.shape[0]


@pytest.mark.parametrize("relu", [True, False])
def test_projector_ensemble_loss_matches_loops_with_different_widths(relu):
    f_s, f_t = rand(4, 5, seed=12), rand(4, 3, seed=13).abs()
    weights = [rand(3, 5, seed=20 + k) for k in range(3)]
    biases = [rand(3, seed=30 + k) for k in range(3)]
    got = projector_ensemble_loss(f_s, f_t, weights, biases, relu=relu)
    assert got.item() == pytest.approx(loop_projector_ensemble(f_s, f_t, weights, biases, relu), rel=1e-12)


def test_projector_ensemble_identities():
    f_s, f_t = rand(4, 5, seed=14), rand(4, 3, seed=15)
    w, b = rand(3, 5, seed=16), rand(3, seed=17)
    single = direction_alignment_loss(torch.relu(f_s @ w.T + b), f_t)
    assert projector_ensemble_loss(f_s, f_t, [w], [b]).item() == pytest.approx(single.item(), rel=1e-14)
    assert projector_ensemble_loss(f_s, f_t, [w] * 3, [b] * 3).item() == pytest.approx(
        single.item(), rel=1e-14
    )
    assert direction_alignment_loss(f_t, 2.5 * f_t).item() == pytest.approx(0.0, abs=1e-14)  # direction only
    assert direction_alignment_loss(-f_t, f_t).item() == pytest.approx(2.0, abs=1e-14)
    dead = [w], [torch.full((3,), -1e3, dtype=torch.float64)]  # every ReLU off: a zero projection
    fs = f_s.clone().requires_grad_(True)
    loss = projector_ensemble_loss(fs, f_t, *dead)
    loss.backward()
    assert loss.item() == 1.0 and torch.isfinite(fs.grad).all()
    assert ensemble_projection(f_s, [w, 2 * w], [b, 2 * b], relu=False).allclose(1.5 * (f_s @ w.T + b))


def test_projector_ensemble_term_equals_pure_function_on_different_feature_widths():
    student, teacher = cnn([4, 8]), cnn([8, 64], seed=1)  # pooled features 8 and 64
    method = METHODS.build({"name": "projector_ensemble", "num_projectors": 2}, student=student,
                           teacher=teacher, num_classes=10, input_shape=(1, 8, 8))  # fmt: skip
    method.double()
    term = method.terms[1]
    assert [tuple(p.weight.shape) for p in term.projectors] == [(64, 8), (64, 8)]
    assert not torch.equal(term.projectors[0].weight, term.projectors[1].weight)  # independent inits
    batch = batch_of()
    s_out, t_out = method.student(batch["input"]), method.teacher_outputs(batch["input"])
    expected = projector_ensemble_loss(
        s_out["feature"],
        t_out["feature"],
        [p.weight for p in term.projectors],
        [p.bias for p in term.projectors],
    )
    assert term(s_out, t_out, batch, CTX).item() == pytest.approx(expected.item(), rel=1e-12)
    out = method.training_step(batch, CTX)
    assert out["loss"].item() == pytest.approx(
        (out["ce"] + 25.0 * out["projector_ensemble"]).item(), rel=1e-12
    )
    out["loss"].backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in term.projectors)
    assert method.keys == ["ce", "projector_ensemble"]  # α = 0: no KD term
    with_kd = METHODS.build({"name": "projector_ensemble", "kd_weight": 1.0}, student=cnn([4, 8]),
                            teacher=cnn([8, 64]), num_classes=10, input_shape=(1, 8, 8))  # fmt: skip
    assert with_kd.keys == ["ce", "projector_ensemble", "kd_kl"]


def test_projector_ensemble_bad_configs_fail_clearly():
    with pytest.raises(ConfigError, match="num_projectors must be an integer >= 1"):
        LOSSES.build({"name": "projector_ensemble", "num_projectors": 0})
    with pytest.raises(ConfigError, match="input_shape"):
        METHODS.build(
            {"name": "projector_ensemble"}, student=cnn([4, 8]), teacher=cnn([8, 16]), num_classes=10
        )


def test_recipe_values_reach_the_methods(compose):
    from gendd_framework import config as config_lib

    cfg = config_lib.apply_recipe(compose(["experiment=imagenet/resnet34_resnet18", "method=wkd_f"]))
    assert (cfg.method.projector, cfg.method.grid, cfg.method.feature_weight) == ("bottleneck", 4, 0.02)
    assert cfg.method.decay_from_epoch == 0
    cfg = config_lib.apply_recipe(compose(["experiment=digits/transfer_cnn", "method=wkd_f"]))
    assert cfg.method.decay_from_epoch == 37.5
    cfg = config_lib.apply_recipe(
        compose(["experiment=cifar100/wrn_40_2_shufflev1", "method=projector_ensemble"])
    )
    assert (cfg.method.feature_weight, cfg.method.kd_weight, cfg.method.num_projectors) == (25.0, 0.0, 3)
