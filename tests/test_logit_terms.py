"""The registered logit terms are thin wrappers: each equals its pure function (float64) on the tensors
it picks, and terms that decompose around a class use the teacher's prediction for hidden labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gendd_framework.components  # noqa: F401  (registrations)
from gendd_framework.context import StepContext
from gendd_framework.losses.dkd import dkd_terms
from gendd_framework.losses.kd import kd_kl_loss, soft_cross_entropy
from gendd_framework.losses.pld import pld_loss
from gendd_framework.losses.wkd import wkd_logit_terms
from gendd_framework.registry import LOSSES

CTX = StepContext()


def logits(seed, b=6, c=5):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(b, c, generator=g, dtype=torch.float64)


def sides(seed=0):
    s, t = logits(seed), logits(seed + 1)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    return {"logits": s}, {"logits": t}, {"input": None, "target": y}


def test_wrappers_equal_their_pure_functions():
    s, t, batch = sides()
    y = batch["target"]
    kd = LOSSES.build({"name": "kd_kl", "temperature": 2.0, "standardize": True})
    expected = kd_kl_loss(s["logits"], t["logits"], 2.0, standardize=True)
    assert kd(s, t, batch, CTX).double().item() == pytest.approx(expected.item(), rel=1e-6)
    dkd = LOSSES.build({"name": "dkd", "alpha": 2.0, "beta": 3.0, "temperature": 4.0})(s, t, batch, CTX)
    tckd, nckd = dkd_terms(s["logits"], t["logits"], y, 4.0)
    assert dkd["tckd"].item() == pytest.approx(tckd.item(), rel=1e-5)
    assert dkd["loss"].item() == pytest.approx((2 * tckd + 3 * nckd).item(), rel=1e-5)
    pld = LOSSES.build({"name": "pld", "temperature": 1.0})(s, t, batch, CTX)
    assert pld.item() == pytest.approx(pld_loss(s["logits"], t["logits"], y, 1.0).item(), rel=1e-5)
    soft = LOSSES.build("soft_ce")(s, t, batch, CTX)
    assert soft.item() == pytest.approx(
        soft_cross_entropy(s["logits"], t["logits"].softmax(1)).item(), rel=1e-5
    )
    target_term = LOSSES.build("wkd_target")(s, t, batch, CTX)
    expected, _ = wkd_logit_terms(s["logits"], t["logits"], y, torch.ones(5, 5, dtype=torch.float64))
    assert target_term.item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_cross_entropy_is_kl_plus_teacher_entropy():
    s, t, batch = sides(3)
    p = t["logits"].softmax(1)
    entropy = -(p * p.log()).sum(1).mean()
    soft = soft_cross_entropy(s["logits"], p)
    assert soft.item() == pytest.approx(
        (kd_kl_loss(s["logits"], t["logits"], 1.0) + entropy).item(), rel=1e-12
    )


@pytest.mark.parametrize("name", ["dkd", "pld", "wkd_target"])
def test_hidden_labels_are_replaced_by_the_teacher_prediction(name):
    s, t, batch = sides(5)
    hidden = {**batch, "target": torch.tensor([0, -1, 2, -1, 4, -1])}
    filled = {**batch, "target": torch.where(hidden["target"] < 0, t["logits"].argmax(1), hidden["target"])}
    term = LOSSES.build(name)
    a, b = term(s, t, hidden, CTX), term(s, t, filled, CTX)
    a, b = (a["loss"], b["loss"]) if isinstance(a, dict) else (a, b)
    assert a.item() == b.item()


def test_output_discriminator_is_bce_on_centred_logits_and_reaches_the_student():
    term = LOSSES.build({"name": "output_discriminator", "hidden": [], "final_relu": False})
    term.setup({"student": {"logits": (5,)}, "teacher": {"logits": (5,)}})
    s, t, batch = sides(7)
    s["logits"].requires_grad_(True)
    value = term(s, t, batch, CTX)
    linear = term.net[0]
    centred = torch.cat([s["logits"], t["logits"]]).float()  # the term computes in float32
    centred = centred - centred.mean(1, keepdim=True)
    labels = torch.zeros(12, 2)
    labels[:6, 0], labels[6:, 1] = 1, 1
    expected = F.binary_cross_entropy_with_logits(linear(centred), labels)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert s["logits"].grad is not None and s["logits"].grad.abs().sum() > 0
