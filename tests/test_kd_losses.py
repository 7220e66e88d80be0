"""KD loss against an independent float64 computation and the TCKD/NCKD identity."""

import math

import pytest
import torch

from gendd_framework.context import StepContext
from gendd_framework.losses.kd import kd_kl_loss


def hand_kd(ls, lt, tau):
    """Plain-Python τ²·mean_b Σ_c p_t log(p_t/p_s) with softmax written out."""
    total = 0.0
    for s_row, t_row in zip(ls.tolist(), lt.tolist()):
        zs = [v / tau for v in s_row]
        zt = [v / tau for v in t_row]
        ms, mt = max(zs), max(zt)
        ns = sum(math.exp(v - ms) for v in zs)
        nt = sum(math.exp(v - mt) for v in zt)
        ps = [math.exp(v - ms) / ns for v in zs]
        pt = [math.exp(v - mt) / nt for v in zt]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return tau**2 * total / len(ls)


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("classes", [2, 10, 100])
def test_kd_matches_float64_hand_computation(tau, classes):
    g = torch.Generator().manual_seed(classes)
    ls = 3 * torch.randn(8, classes, generator=g, dtype=torch.float64)
    lt = 3 * torch.randn(8, classes, generator=g, dtype=torch.float64)
    got = kd_kl_loss(ls, lt, tau).item()
    assert got == pytest.approx(hand_kd(ls, lt, tau), rel=1e-12)
    got32 = kd_kl_loss(ls.float(), lt.float(), tau).item()
    assert got32 == pytest.approx(hand_kd(ls, lt, tau), rel=1e-5)


def test_kd_is_zero_for_identical_logits_and_positive_otherwise():
    x = torch.randn(4, 10, dtype=torch.float64)
    assert kd_kl_loss(x, x, 4.0).item() == pytest.approx(0.0, abs=1e-14)
    assert kd_kl_loss(x, x.flip(1), 4.0).item() > 0


def test_kl_decomposes_into_target_and_non_target_parts():
    """Per sample KL(p_t||p_s) = TCKD + (1 - p_t[gt]) * NCKD (the DKD identity)."""
    g = torch.Generator().manual_seed(0)
    ls, lt = (
        torch.randn(6, 5, generator=g, dtype=torch.float64),
        torch.randn(6, 5, generator=g, dtype=torch.float64),
    )
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    ps, pt = ls.softmax(1), lt.softmax(1)
    for i in range(6):
        gt = y[i]
        bs = torch.stack([ps[i, gt], 1 - ps[i, gt]])
        bt = torch.stack([pt[i, gt], 1 - pt[i, gt]])
        tckd = (bt * (bt / bs).log()).sum()
        mask = torch.arange(5) != gt
        qs, qt = ls[i, mask].softmax(0), lt[i, mask].softmax(0)
        nckd = (qt * (qt / qs).log()).sum()
        kl = kd_kl_loss(ls[i : i + 1], lt[i : i + 1], 1.0)
        assert kl.item() == pytest.approx((tckd + (1 - pt[i, gt]) * nckd).item(), rel=1e-12)


def test_kd_method_combines_terms_with_weights():
    """loss = α·CE + β·τ²·KL at the configured α, β, τ, recomputed from the two models' logits alone."""
    import torch.nn.functional as F

    from gendd_framework.models import build_model
    from gendd_framework.registry import METHODS

    torch.manual_seed(0)
    student = build_model({"name": "mlp", "hidden": [8]}, num_classes=10)
    teacher = build_model({"name": "mlp", "hidden": [16]}, num_classes=10)
    method = METHODS.build(
        {"name": "kd", "alpha": 0.3, "beta": 0.7, "temperature": 2.0}, student=student, teacher=teacher
    )
    method.train()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    out = method.training_step({"input": x, "target": y}, StepContext())
    with torch.no_grad():
        zs, zt = student(x).double(), teacher(x).double()  # no dropout; BN on batch statistics again
    ce = F.cross_entropy(zs, y).item()
    kd = hand_kd(zs, zt, 2.0)  # τ² included
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["kd_kl"].item() == pytest.approx(kd, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.3 * ce + 0.7 * kd, rel=1e-5)
    assert kd != pytest.approx(hand_kd(zs, zt, 1.0), rel=1e-2)  # τ matters for these logits
    assert not teacher.training, "the teacher must stay in eval mode"
    assert all(not p.requires_grad for p in teacher.parameters())


def test_feature_mse_matches_manual_mean_and_rejects_shape_mismatch_at_build():
    from gendd_framework.errors import ConfigError
    from gendd_framework.models import build_model
    from gendd_framework.registry import LOSSES, METHODS

    term = LOSSES.build("feature_mse")
    fs, ft = torch.arange(6.0).view(2, 3), torch.ones(2, 3)
    expected = sum((a - 1.0) ** 2 for a in range(6)) / 6
    assert term({"feature": fs}, {"feature": ft}, {}, StepContext()).item() == pytest.approx(expected)
    student = build_model({"name": "mlp", "hidden": [8]}, num_classes=10)
    teacher = build_model({"name": "mlp", "hidden": [16]}, num_classes=10)
    spec = {"name": "distill", "losses": [{"name": "feature_mse"}]}
    # the build-time probe names both shapes before any training step
    with pytest.raises(ConfigError, match=r"student \(8,\) and teacher \(16,\)"):
        METHODS.build(spec, student=student, teacher=teacher, input_shape=(1, 8, 8))
