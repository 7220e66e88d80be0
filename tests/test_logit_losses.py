"""Pure logit-distillation losses against independent float64 computations (loops, numpy, identities)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gendd_framework.losses.dist import dist_loss, pearson_correlation
from gendd_framework.losses.dkd import dkd_loss, dkd_terms
from gendd_framework.losses.kd import (
    kd_kl_loss,
    kl_divergence_per_sample,
    soft_cross_entropy,
    standardize_logits,
)
from gendd_framework.losses.pld import pld_loss, teacher_permutation
from gendd_framework.losses.wkd import fc_cosine_cost, linear_cka_cost, sinkhorn_plan, wkd_logit_terms

F64 = torch.float64


def make(batch: int, classes: int, seed: int, scale: float = 3.0):
    """Seeded peaked float64 logits (randn·scale) for student and teacher, and integer targets."""
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(batch, classes, generator=g, dtype=F64)
    t = scale * torch.randn(batch, classes, generator=g, dtype=F64)
    y = torch.randint(0, classes, (batch,), generator=g)
    return s, t, y


def softmax_list(row, tau=1.0):
    z = [v / tau for v in row]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    total = sum(e)
    return [v / total for v in e]


def kl_list(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def zscore(x: torch.Tensor, eps=1e-7) -> torch.Tensor:
    a = x.numpy()
    return torch.from_numpy((a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + eps))


def loop_kd(s, t, tau):
    rows = [kl_list(softmax_list(b, tau), softmax_list(a, tau)) for a, b in zip(s.tolist(), t.tolist())]
    return tau**2 * sum(rows) / len(rows)


# ---------------------------------------------------------------- KD family


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("classes", [2, 10, 100])
def test_kd_matches_loop(tau, classes):
    s, t, _ = make(8, classes, seed=classes)
    assert kd_kl_loss(s, t, tau).item() == pytest.approx(loop_kd(s, t, tau), rel=1e-12)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_standardize_matches_manual_zscore(tau):
    s, t, _ = make(12, 10, seed=1)
    s, t = 2.0 * s + 5.0, 0.3 * t - 1.0  # scale/offset that standardisation must remove
    assert torch.allclose(standardize_logits(s), zscore(s), rtol=1e-12, atol=1e-12)
    expected = loop_kd(zscore(s), zscore(t), tau)
    assert kd_kl_loss(s, t, tau, standardize=True).item() == pytest.approx(expected, rel=1e-12)


def test_soft_cross_entropy_matches_loop():
    s, t1, _ = make(8, 10, seed=2)
    _, t2, _ = make(8, 10, seed=3)
    p_bar = 0.5 * (t1.softmax(1) + t2.softmax(1))
    expected = 0.0
    for z, p in zip(s.tolist(), p_bar.tolist()):
        log_q = [math.log(v) for v in softmax_list(z)]
        expected -= sum(a * b for a, b in zip(p, log_q))
    assert soft_cross_entropy(s, p_bar).item() == pytest.approx(expected / len(s), rel=1e-12)


def test_kl_per_sample_matches_loop():
    s, t, _ = make(8, 10, seed=4)
    got = kl_divergence_per_sample(t, s)
    assert got.shape == (8,)
    for i in range(8):
        expected = kl_list(softmax_list(t[i].tolist()), softmax_list(s[i].tolist()))
        assert got[i].item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- DKD


def loop_dkd(s, t, y, tau):
    """Per-sample (TCKD, NCKD)·τ² with the target column deleted explicitly (numpy)."""
    tck, nck = [], []
    for zs, zt, label in zip(s.numpy(), t.numpy(), y.tolist()):
        ps, pt = np.array(softmax_list(zs, tau)), np.array(softmax_list(zt, tau))
        bs, bt = np.array([ps[label], 1 - ps[label]]), np.array([pt[label], 1 - pt[label]])
        tck.append(float((bt * np.log(bt / bs)).sum()))
        qs = np.array(softmax_list(np.delete(zs, label), tau))
        qt = np.array(softmax_list(np.delete(zt, label), tau))
        nck.append(float((qt * np.log(qt / qs)).sum()))
    return np.array(tck) * tau**2, np.array(nck) * tau**2


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("classes", [2, 10, 100])
def test_dkd_decomposition_identity_per_sample(tau, classes):
    """KL(p_t‖p_s) = TCKD + (1 - p_t(y))·NCKD, per sample (B=1 calls)."""
    s, t, y = make(8, classes, seed=10 + classes)
    for i in range(8):
        si, ti, yi = s[i : i + 1], t[i : i + 1], y[i : i + 1]
        tckd, nckd = dkd_terms(si, ti, yi, tau)
        not_y = 1 - (ti / tau).softmax(1)[0, yi].item()
        assert kd_kl_loss(si, ti, tau).item() == pytest.approx((tckd + not_y * nckd).item(), rel=1e-10)


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (1.0, 2.0), (1.0, 0.5)])
def test_dkd_matches_column_deleted_loop(tau, alpha, beta):
    s, t, y = make(16, 10, seed=20)
    tck, nck = loop_dkd(s, t, y, tau)
    tckd, nckd = dkd_terms(s, t, y, tau)
    assert tckd.item() == pytest.approx(tck.mean(), rel=1e-10)
    assert nckd.item() == pytest.approx(nck.mean(), rel=1e-10)
    got = dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=tau)
    assert got["loss"].item() == pytest.approx(alpha * tck.mean() + beta * nck.mean(), rel=1e-10)
    assert (got["tckd"].item(), got["nckd"].item()) == pytest.approx((tck.mean(), nck.mean()), rel=1e-10)


def test_dkd_standardize_uses_zscored_logits():
    s, t, y = make(8, 10, seed=21)
    tck, nck = loop_dkd(zscore(s), zscore(t), y, 4.0)
    tckd, nckd = dkd_terms(s, t, y, 4.0, standardize=True)
    assert (tckd.item(), nckd.item()) == pytest.approx((tck.mean(), nck.mean()), rel=1e-10)


def test_dkd_two_classes_nckd_exactly_zero():
    s, t, y = make(8, 2, seed=22)
    s.requires_grad_(True)
    tckd, nckd = dkd_terms(s, t, y, 4.0)
    assert torch.isfinite(tckd) and nckd.item() == 0.0
    dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0)["loss"].backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16])
def test_dkd_peaked_logits_finite(dtype):
    s, t, y = make(8, 100, seed=23, scale=150.0)  # randn·3·50
    s = s.to(dtype).requires_grad_(True)
    for tau in (1.0, 4.0):
        tckd, nckd = dkd_terms(s, t.to(dtype), y, tau)
        assert torch.isfinite(tckd) and torch.isfinite(nckd)
        (tckd + nckd).backward()
        assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_pure_distillation_terms_vanish_when_student_equals_teacher(tau):
    _, t, y = make(8, 10, seed=24)
    tckd, nckd = dkd_terms(t.clone(), t, y, tau)
    assert abs(kd_kl_loss(t.clone(), t, tau).item()) < 1e-13
    assert abs(tckd.item()) < 1e-13 and abs(nckd.item()) < 1e-13
    assert abs(dist_loss(t.clone(), t, temperature=tau).item()) < 1e-12


# ---------------------------------------------------------------- DIST


def numpy_pearson_rows(a, b, eps):
    out = []
    for u, v in zip(a, b):
        u, v = u - u.mean(), v - v.mean()
        norms = max(np.sqrt((u * u).sum()), eps) * max(np.sqrt((v * v).sum()), eps)
        out.append(float((u * v).sum() / norms))
    return np.array(out)


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("beta,gamma", [(1.0, 1.0), (2.0, 0.5)])
def test_dist_matches_numpy(tau, beta, gamma):
    s, t, _ = make(12, 10, seed=30)
    ys = np.array([softmax_list(r, tau) for r in s.tolist()])
    yt = np.array([softmax_list(r, tau) for r in t.tolist()])
    for eps in (1e-8, 0.0):
        inter = 1 - numpy_pearson_rows(ys, yt, eps).mean()
        intra = 1 - numpy_pearson_rows(ys.T, yt.T, eps).mean()
        expected = tau**2 * (beta * inter + gamma * intra)
        got = dist_loss(s, t, beta=beta, gamma=gamma, temperature=tau, eps=eps)
        assert got.item() == pytest.approx(expected, rel=1e-10)
    # eps = 0 is the textbook Pearson correlation.
    rho = pearson_correlation(torch.from_numpy(ys), torch.from_numpy(yt), dim=1, eps=0.0)
    assert np.allclose(rho.numpy(), [np.corrcoef(u, v)[0, 1] for u, v in zip(ys, yt)], rtol=1e-12)


def test_dist_standardize():
    s, t, _ = make(12, 10, seed=31)
    assert dist_loss(s, t, standardize=True).item() == pytest.approx(dist_loss(zscore(s), zscore(t)).item())


# ---------------------------------------------------------------- PLD


def loop_pld(s, t, y, tau):
    total = 0.0
    for zs, zt, label in zip(s.tolist(), t.tolist(), y.tolist()):
        others = sorted((c for c in range(len(zt)) if c != label), key=lambda c: (-zt[c], c))
        perm = [label, *others]
        pt = softmax_list(zt, tau)
        for k in range(len(perm)):
            tail = [zs[perm[m]] for m in range(k, len(perm))]
            mx = max(tail)
            lse = mx + math.log(sum(math.exp(v - mx) for v in tail))
            total += pt[perm[k]] * (lse - zs[perm[k]])
    return total / len(s)


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("classes", [2, 10, 100])
def test_pld_matches_loop(tau, classes):
    s, t, y = make(8, classes, seed=40 + classes)
    assert pld_loss(s, t, y, temperature=tau).item() == pytest.approx(loop_pld(s, t, y, tau), rel=1e-10)


def test_pld_ties_broken_by_class_index():
    s, _, y = make(8, 10, seed=41)
    t = torch.randint(0, 3, (8, 10)).to(F64)  # many ties
    perm = teacher_permutation(t, y)
    for row, label, tr in zip(perm.tolist(), y.tolist(), t.tolist()):
        assert row == [label, *sorted((c for c in range(10) if c != label), key=lambda c: (-tr[c], c))]
    assert pld_loss(s, t, y).item() == pytest.approx(loop_pld(s, t, y, 1.0), rel=1e-10)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_pld_two_classes_is_weighted_cross_entropy(tau):
    """For C=2 only the k=1 term survives: p_t^τ(y)·CE(z_s, y)."""
    s, t, y = make(8, 2, seed=42)
    weight = (t / tau).softmax(1).gather(1, y.view(-1, 1)).squeeze(1)
    ce = torch.nn.functional.cross_entropy(s, y, reduction="none")
    assert pld_loss(s, t, y, tau).item() == pytest.approx((weight * ce).mean().item(), rel=1e-12)


def test_pld_translation_invariant_in_student():
    s, t, y = make(8, 10, seed=43)
    shift = 7.0 * torch.randn(8, 1, dtype=F64)
    assert pld_loss(s + shift, t, y).item() == pytest.approx(pld_loss(s, t, y).item(), rel=1e-12)


# ---------------------------------------------------------------- WKD


def random_simplex(batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(batch, n, generator=g, dtype=F64), dim=1)


def loop_sinkhorn(p, q, cost, reg, iters):
    n = len(p)
    k = np.exp(-cost / reg)
    u = np.full(n, 1.0 / n)
    v = np.ones(n)
    for _ in range(iters):
        v = np.array([q[j] / (sum(k[i, j] * u[i] for i in range(n)) + 1e-8) for j in range(n)])
        u = np.array([p[i] / (sum(k[i, j] * v[j] for j in range(n)) + 1e-8) for i in range(n)])
    return np.array([[u[i] * k[i, j] * v[j] for j in range(n)] for i in range(n)])


def test_sinkhorn_marginals():
    p, q = random_simplex(8, 6, 50), random_simplex(8, 6, 51)
    cost = torch.rand(6, 6, generator=torch.Generator().manual_seed(52), dtype=F64)
    plan = sinkhorn_plan(p, q, cost, reg=0.5, iters=200)
    assert plan.shape == (8, 6, 6)
    assert torch.allclose(plan.sum(2), p, atol=1e-6)
    assert torch.allclose(plan.sum(1), q, atol=1e-6)


@pytest.mark.parametrize("batched_cost", [False, True])
def test_sinkhorn_matches_loop(batched_cost):
    p, q = random_simplex(4, 5, 53), random_simplex(4, 5, 54)
    g = torch.Generator().manual_seed(55)
    cost = torch.rand(4, 5, 5, generator=g, dtype=F64) if batched_cost else torch.rand(5, 5, generator=g)
    cost = cost.to(F64)
    plan = sinkhorn_plan(p, q, cost, reg=0.1, iters=3)
    for b in range(4):
        c = (cost[b] if batched_cost else cost).numpy()
        assert np.allclose(plan[b].numpy(), loop_sinkhorn(p[b].numpy(), q[b].numpy(), c, 0.1, 3), rtol=1e-12)


def symmetric_cost(classes, seed):
    a = torch.rand(classes, classes, generator=torch.Generator().manual_seed(seed), dtype=F64)
    c = 0.5 * (a + a.T)
    return c.fill_diagonal_(0)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_wkd_terms_match_loop(tau):
    s, t, y = make(8, 10, seed=60)
    cost = symmetric_cost(10, 61) - 0.2  # negatives exercise the relu
    target_term, w = wkd_logit_terms(s, t, y, cost, temperature=tau, reg=0.1, iters=5)
    exp_target, exp_w = 0.0, 0.0
    for zs, zt, label in zip(s.numpy(), t.numpy(), y.tolist()):
        exp_target -= softmax_list(zt)[label] * math.log(softmax_list(zs)[label])
        qs = np.array(softmax_list(np.delete(zs, label), tau))
        qt = np.array(softmax_list(np.delete(zt, label), tau))
        c = np.maximum(np.delete(np.delete(cost.numpy(), label, 0), label, 1), 0) + 1e-8
        exp_w += float((loop_sinkhorn(qs, qt, c, 0.1, 5) * c).sum())
    assert target_term.item() == pytest.approx(exp_target / 8, rel=1e-12)
    assert w.item() == pytest.approx(exp_w / 8, rel=1e-10)


def test_wkd_ignores_target_row_and_column_of_cost():
    s, t, _ = make(8, 10, seed=62)
    cost = symmetric_cost(10, 63)
    changed = cost.clone()
    changed[3, :] = changed[:, 3] = 5.0  # only class 3's row/column differ
    same_target = torch.full((8,), 3)
    args = dict(temperature=4.0, reg=0.1, iters=10)
    w_a = wkd_logit_terms(s, t, same_target, cost, **args)[1]
    w_b = wkd_logit_terms(s, t, same_target, changed, **args)[1]
    assert w_a.item() == pytest.approx(w_b.item(), rel=1e-12)
    other_target = torch.full((8,), 4)  # now class 3 is a non-target class, so its cost matters
    w_c = wkd_logit_terms(s, t, other_target, cost, **args)[1]
    w_d = wkd_logit_terms(s, t, other_target, changed, **args)[1]
    assert abs(w_c.item() - w_d.item()) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_wkd_dtype_and_gradient(dtype):
    s, t, y = make(8, 10, seed=64)
    s = s.to(dtype).requires_grad_(True)
    target_term, w = wkd_logit_terms(s, t.to(dtype), y, symmetric_cost(10, 65))
    assert w.dtype == (F64 if dtype == F64 else torch.float32)
    (target_term + w).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_gradients_reach_student_logits():
    s, t, y = make(8, 10, seed=66)
    for fn in (
        lambda z: kd_kl_loss(z, t, 4.0),
        lambda z: dkd_loss(z, t, y, alpha=1.0, beta=8.0, temperature=4.0)["loss"],
        lambda z: dist_loss(z, t),
        lambda z: pld_loss(z, t, y),
        lambda z: sum(wkd_logit_terms(z, t, y, symmetric_cost(10, 67))),
    ):
        z = s.clone().requires_grad_(True)
        fn(z).backward()
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# ---------------------------------------------------------------- class-similarity costs


def direct_cka_cost(feats):
    n = min(f.shape[0] for f in feats)
    xs = [f[:n].numpy() - f[:n].numpy().mean(0) for f in feats]
    out = np.zeros((len(xs), len(xs)))
    for i, xi in enumerate(xs):
        for j, xj in enumerate(xs):
            num = np.linalg.norm(xj.T @ xi) ** 2
            out[i, j] = 1 - num / (np.linalg.norm(xi.T @ xi) * np.linalg.norm(xj.T @ xj))
    return out


@pytest.mark.parametrize("n_small", [True, False])
def test_cka_cost_routes_match_direct(n_small):
    g = torch.Generator().manual_seed(70)
    d = 16
    sizes = [6, 9, 7, 8, 12] if n_small else [40, 45, 50, 41, 60]
    base = torch.randn(60, d, generator=g, dtype=F64)
    feats = [base[:n] + 0.7 * torch.randn(n, d, generator=g, dtype=F64) for n in sizes]
    expected = direct_cka_cost(feats)
    for route in ("auto", "gram", "feature"):
        got = linear_cka_cost(feats, route=route)
        assert np.allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
        assert torch.equal(got, got.T) and torch.all(got.diagonal() == 0)
    sharp = linear_cka_cost(feats, sharpen=3.0)
    assert np.allclose(sharp.numpy(), 1 - np.exp(-3.0 * expected), rtol=1e-10, atol=1e-12)


def test_fc_cosine_cost_matches_loop():
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(71), dtype=F64)
    got = fc_cosine_cost(w)
    for i in range(6):
        for j in range(6):
            a, b = w[i].numpy(), w[j].numpy()
            assert got[i, j].item() == pytest.approx(
                1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-12
            )
