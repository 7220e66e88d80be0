"""The self-distillation family's pure maths (mean teacher / DINO, DML, CTKD, SimKD) in float64 against
independent computations: explicit loops over plain Python floats, closed forms, finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from gendd_framework.losses.ctkd import cosine_lambda, learned_temperature, scale_gradient
from gendd_framework.losses.dml import mean_probability_logits, mutual_kl
from gendd_framework.losses.kd import kd_kl_loss
from gendd_framework.losses.mean_teacher import (
    cosine_momentum,
    dino_loss,
    ema_update_,
    sigmoid_rampup,
    softmax_kl,
    softmax_mse,
    updated_center,
    warmup_decay,
)
from gendd_framework.losses.simkd import align_maps, pooled_size, reused_classifier_logits, simkd_loss

F64 = torch.float64


def rand(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=F64)


def softmax_row(row, tau=1.0):
    z = [v / tau for v in row]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def kl_row(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# -- mean teacher and DINO ---------------------------------------------------------------------------
def test_ema_warmup_decay_is_a_running_mean_first_then_alpha():
    # after n updates the decay is n/(n+1): the EMA is the plain mean of the n + 1 weight vectors seen
    assert [warmup_decay(n, 0.99) for n in (1, 2, 3)] == [0.5, pytest.approx(2 / 3), 0.75]
    assert warmup_decay(99, 0.99) == pytest.approx(0.99) and warmup_decay(10_000, 0.99) == 0.99
    weights = [rand(5, seed=k) for k in range(4)]
    ema = [weights[0].clone()]
    for n, w in enumerate(weights[1:], start=1):
        ema_update_(ema, [w], warmup_decay(n, 0.99))
    assert torch.allclose(ema[0], torch.stack(weights).mean(0), atol=1e-12)


def test_ema_update_and_cosine_momentum_match_their_formulas():
    a, b = rand(3, 4, seed=1), rand(3, 4, seed=2)
    expected = 0.9 * a + 0.1 * b
    ema_update_([a], [b], 0.9)
    assert torch.allclose(a, expected, atol=1e-14)
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(1 - 0.004 / 2)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 5) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(2.5, 5) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(5, 5) == 1.0 and sigmoid_rampup(9, 5) == 1.0 and sigmoid_rampup(3, 0) == 1.0


def test_consistency_costs_match_loops_and_leave_the_teacher_alone():
    s, t = rand(6, 5, seed=3), rand(6, 5, seed=4)
    rows = list(zip(s.tolist(), t.tolist()))
    mse = sum(sum((a - b) ** 2 for a, b in zip(softmax_row(x), softmax_row(y))) / 5 for x, y in rows) / 6
    kl = sum(kl_row(softmax_row(y), softmax_row(x)) for x, y in rows) / 6  # KL(p_t ‖ p_s)
    t.requires_grad_(True)
    assert softmax_mse(s, t).item() == pytest.approx(mse, rel=1e-12)
    value = softmax_kl(s, t)
    assert value.item() == pytest.approx(kl, rel=1e-12)
    assert softmax_kl(t.detach(), s).item() != pytest.approx(kl, rel=1e-3)  # the direction matters
    assert not value.requires_grad  # the teacher side is a target: no gradient reaches it


def test_dino_loss_centres_and_sharpens_the_teacher():
    s, t, c = rand(4, 6, seed=5), rand(4, 6, seed=6), rand(6, seed=7, scale=0.5)
    expected = 0.0
    for x, y in zip(s.tolist(), t.tolist()):
        target = softmax_row([v - ci for v, ci in zip(y, c.tolist())], 0.04)
        log_p = [math.log(p) for p in softmax_row(x, 0.1)]
        expected -= sum(a * b for a, b in zip(target, log_p))
    assert dino_loss(s, t, c, 0.1, 0.04).item() == pytest.approx(expected / 4, rel=1e-12)
    center = updated_center(c, t, 0.9)
    assert torch.allclose(center, 0.9 * c + 0.1 * t.mean(0), atol=1e-14)


# -- deep mutual learning ----------------------------------------------------------------------------
@pytest.mark.parametrize("peers", [2, 3])
def test_mutual_kl_is_kl_from_each_other_peer_to_self_averaged(peers):
    logits = [rand(5, 4, seed=10 + k).requires_grad_(True) for k in range(peers)]
    probs = [[softmax_row(r) for r in z.tolist()] for z in logits]
    losses = mutual_kl(logits)
    for k in range(peers):
        others = [l for l in range(peers) if l != k]
        # KL(p_peer ‖ p_self): the peer's prediction is the target distribution
        want = sum(sum(kl_row(probs[l][b], probs[k][b]) for b in range(5)) / 5 for l in others) / len(others)
        assert losses[k].item() == pytest.approx(want, rel=1e-12)
    reverse = sum(kl_row(probs[0][b], probs[1][b]) for b in range(5)) / 5  # KL(p_self ‖ p_peer), peer 0
    assert peers > 2 or losses[0].item() != pytest.approx(reverse, rel=1e-3)  # the direction matters
    # each loss moves only its own peer: the others are detached targets
    grads = torch.autograd.grad(losses[0], logits, allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert all(g is None for g in grads[1:])


def test_mean_probability_logits_give_the_averaged_distribution():
    logits = [rand(3, 4, seed=20 + k) for k in range(3)]
    mean = torch.stack([z.softmax(1) for z in logits]).mean(0)
    assert torch.allclose(mean_probability_logits(logits).softmax(1), mean, atol=1e-14)
    assert torch.allclose(mean_probability_logits(logits).exp().sum(1), torch.ones(3, dtype=F64))


# -- CTKD ------------------------------------------------------------------------------------------------
def test_ctkd_curriculum_values():
    lam = [cosine_lambda(e, 10) for e in (1, 5, 10, 15)]
    assert lam[0] == pytest.approx((math.cos(math.pi / 10) + 1) / 2 - 1) and round(lam[0], 3) == -0.024
    assert lam[1:] == [pytest.approx(-0.5), -1.0, -1.0]
    assert cosine_lambda(0, 10) == 0.0
    assert cosine_lambda(5, 10, lam_max=0.5, lam_min=-0.5) == pytest.approx(0.0)


def test_gradient_reversal_is_identity_forward_and_scales_the_gradient():
    x = torch.tensor([0.3, -1.2], dtype=F64, requires_grad=True)
    y = scale_gradient(x, -0.5)
    assert torch.equal(y, x) and y is not x
    (g,) = torch.autograd.grad((y * torch.tensor([2.0, 3.0], dtype=F64)).sum(), x)
    assert torch.equal(g, torch.tensor([-1.0, -1.5], dtype=F64))


def test_learned_temperature_and_its_reversed_gradient():
    raw = torch.tensor(1.0, dtype=F64, requires_grad=True)
    assert learned_temperature(raw, 1.0, 20.0).item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))  # 15.62
    s, t = rand(8, 5, seed=30), rand(8, 5, seed=31)

    def kd_at(r: float) -> float:
        return kd_kl_loss(s, t, learned_temperature(torch.tensor(r, dtype=F64), 1.0, 20.0)).item()

    lam = -0.7
    loss = kd_kl_loss(s, t, learned_temperature(scale_gradient(raw, lam), 1.0, 20.0))
    (grad,) = torch.autograd.grad(loss, raw)
    h = 1e-6
    numeric = (kd_at(1.0 + h) - kd_at(1.0 - h)) / (2 * h)  # dL/dr by finite differences
    assert grad.item() == pytest.approx(lam * numeric, rel=1e-6)
    # a descent step on the reversed gradient is an ascent step on the loss: T makes KD harder
    assert kd_at(1.0 - 0.1 * grad.item()) > kd_at(1.0)


# -- SimKD -------------------------------------------------------------------------------------------------
def avg_pool_2x2(x):
    b, c, h, w = x.shape
    return torch.tensor(
        [[[[sum(x[i, j, 2 * p + dp, 2 * q + dq].item() for dp in (0, 1) for dq in (0, 1)) / 4
            for q in range(w // 2)] for p in range(h // 2)] for j in range(c)] for i in range(b)],
        dtype=F64,
    )  # fmt: skip


def test_simkd_aligns_the_larger_map_by_average_pooling():
    big, small = rand(2, 3, 4, 4, seed=40), rand(2, 5, 2, 2, seed=41)
    s, t = align_maps(big, small)  # student larger: the student is pooled
    assert torch.allclose(s, avg_pool_2x2(big), atol=1e-14) and t is small
    s, t = align_maps(small, big)  # teacher larger: the teacher is pooled
    assert s is small and torch.allclose(t, avg_pool_2x2(big), atol=1e-14)
    assert pooled_size((4, 4), (2, 2)) == (2, 2) and pooled_size((2, 2), (4, 4)) is None
    assert pooled_size((3, 3), (3, 3)) is None
    with pytest.raises(ValueError, match="neither contains the other"):
        pooled_size((4, 2), (2, 4))


def test_simkd_loss_and_the_reused_classifier():
    p, t = rand(2, 3, 2, 2, seed=42), rand(2, 3, 2, 2, seed=43)
    flat = [(a - b) ** 2 for a, b in zip(p.flatten().tolist(), t.flatten().tolist())]
    assert simkd_loss(p, t).item() == pytest.approx(sum(flat) / len(flat), rel=1e-12)
    w, bias = rand(4, 3, seed=44), rand(4, seed=45)
    logits = reused_classifier_logits(p, w, bias)
    for i in range(2):
        pooled = [p[i, c].mean().item() for c in range(3)]
        for k in range(4):
            want = sum(w[k, c].item() * pooled[c] for c in range(3)) + bias[k].item()
            assert logits[i, k].item() == pytest.approx(want, rel=1e-12)
