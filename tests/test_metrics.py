"""engine/metrics.py against independent float64 numpy computations written from the definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gendd_framework.engine.metrics import (
    MetricAccumulator,
    calibration_bins,
    expected_calibration_error,
)

BINS = 15


# -- reference implementations (float64, plain loops) -----------------------------------------------
def np_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_bin_of(confidence: float, bins: int) -> int:
    """The k with k/bins < confidence <= (k+1)/bins (confidence > 0 always for a softmax)."""
    for k in range(bins):
        if k / bins < confidence <= (k + 1) / bins:
            return k
    raise AssertionError(f"confidence {confidence} is outside (0, 1]")


def np_ece(logits: np.ndarray, target: np.ndarray, bins: int = BINS) -> float:
    """Σ_b (n_b/N)·|acc_b − conf_b| in %, one sample at a time."""
    probs = np_softmax(logits.astype(np.float64))
    count, conf, correct = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    for p, y in zip(probs, target):
        k = np_bin_of(float(p.max()), bins)
        count[k] += 1
        conf[k] += p.max()
        correct[k] += float(int(p.argmax()) == int(y))
    total = 0.0
    for k in range(bins):
        if count[k]:
            total += count[k] / len(target) * abs(correct[k] / count[k] - conf[k] / count[k])
    return 100.0 * total


def np_metrics(logits: np.ndarray, target: np.ndarray, teacher: np.ndarray | None) -> dict[str, float]:
    logits = logits.astype(np.float64)
    log_p = np_log_softmax(logits)
    out = {
        "acc": 100.0 * np.mean(logits.argmax(1) == target),
        "ce": float(np.mean([-log_p[i, y] for i, y in enumerate(target)])),
        "ece": np_ece(logits, target),
    }
    if teacher is not None:
        log_q = np_log_softmax(teacher.astype(np.float64))
        kl = [float(np.sum(np.exp(log_q[i]) * (log_q[i] - log_p[i]))) for i in range(len(target))]
        out["agree"] = 100.0 * np.mean(logits.argmax(1) == teacher.argmax(1))
        out["kl"] = float(np.mean(kl))
    return out


def two_class_logits(confidences: list[float], correct: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose max-softmax is `confidence` on class 0; the target is 0 when `correct`, else 1."""
    logits = torch.tensor([[math.log(c), math.log(1.0 - c)] for c in confidences])
    target = torch.tensor([0 if ok else 1 for ok in correct])
    return logits, target


def random_case(seed: int, n: int = 500, classes: int = 10, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=gen) * scale
    teacher = logits + torch.randn(n, classes, generator=gen) * 1.5  # mostly agrees, not always
    target = torch.randint(0, classes, (n,), generator=gen)
    target[: n // 2] = teacher[: n // 2].argmax(1)  # better than chance, so bins hold both outcomes
    return logits, teacher, target


def ece_of(logits: torch.Tensor, target: torch.Tensor, bins: int = BINS) -> float:
    return expected_calibration_error(*calibration_bins(logits, target, bins))


# -- ECE --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_numpy_on_random_logits(seed):
    logits, _, target = random_case(seed)
    assert ece_of(logits, target) == pytest.approx(np_ece(logits.numpy(), target.numpy()), abs=1e-4)


def test_ece_hand_derived_four_samples():
    # 0.9 ∈ (13/15, 14/15]: 1 of 2 right → |0.5 − 0.9| = 0.4, weight 2/4
    # 0.7 ∈ (10/15, 11/15]: 2 of 2 right → |1.0 − 0.7| = 0.3, weight 2/4  → ECE = 0.2 + 0.15 = 35 %
    logits, target = two_class_logits([0.9, 0.9, 0.7, 0.7], [True, False, True, True])
    count, conf_sum, acc_sum = calibration_bins(logits, target)
    expected_count = torch.zeros(BINS)
    expected_count[13], expected_count[10] = 2, 2
    assert torch.equal(count, expected_count)
    assert conf_sum[13].item() == pytest.approx(1.8, abs=1e-6)
    assert acc_sum[13].item() == 1 and acc_sum[10].item() == 2
    assert ece_of(logits, target) == pytest.approx(35.0, abs=1e-4)


def test_bin_edges_are_right_closed():
    """A confidence exactly on k/n belongs to (k−1/n, k/n], never to the next bin."""
    # 1.0 exactly (the other class underflows) → the last bin, not an out-of-range 16th
    count, *_ = calibration_bins(torch.tensor([[100.0, 0.0]]), torch.tensor([0]))
    assert count.nonzero().flatten().tolist() == [BINS - 1]
    # just below / just above 6/15 = 0.4 (float64 logits): (5/15, 6/15] is index 5, above it index 6
    for conf, k in [(0.4 - 1e-9, 5), (0.4 + 1e-9, 6)]:
        rest = (1 - conf) / 2
        logits = torch.tensor([[conf, rest, rest]], dtype=torch.float64).log()
        count, *_ = calibration_bins(logits, torch.tensor([0]))
        assert count.nonzero().flatten().tolist() == [k] == [np_bin_of(conf, BINS)]
    # exactly representable edges with 4 bins: 0.25 → (0, 1/4], 0.5 → (1/4, 2/4]
    count, *_ = calibration_bins(torch.zeros(2, 4), torch.tensor([0, 1]), bins=4)
    assert count.tolist() == [2, 0, 0, 0]
    count, *_ = calibration_bins(torch.zeros(3, 2), torch.tensor([0, 1, 0]), bins=4)
    assert count.tolist() == [0, 3, 0, 0]
    for conf, k in [(0.25, 0), (0.5, 1)]:
        assert np_bin_of(conf, 4) == k  # the reference agrees on the convention


def test_perfectly_calibrated_gives_zero_ece():
    # 10 samples at 0.7 with 7 right, 10 at 0.9 with 9 right: every bin's accuracy equals its confidence
    confidences = [0.7] * 10 + [0.9] * 10
    correct = [i < 7 for i in range(10)] + [i < 9 for i in range(10)]
    logits, target = two_class_logits(confidences, correct)
    assert ece_of(logits, target) == pytest.approx(0.0, abs=1e-4)


def test_overconfident_gives_the_gap():
    # all at 0.95 confidence, 60 % right → ECE = |0.60 − 0.95| = 35 %
    logits, target = two_class_logits([0.95] * 20, [i < 12 for i in range(20)])
    assert ece_of(logits, target) == pytest.approx(35.0, abs=1e-4)
    assert np_ece(logits.numpy(), target.numpy()) == pytest.approx(35.0, abs=1e-4)


def test_empty_bins_give_zero_not_nan():
    assert expected_calibration_error(torch.zeros(BINS), torch.zeros(BINS), torch.zeros(BINS)) == 0.0


# -- the accumulator --------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 3])
def test_accumulator_matches_numpy_with_teacher(seed):
    logits, teacher, target = random_case(seed)
    acc = MetricAccumulator()
    acc.update({"student": logits}, target, teacher)
    got = acc.result()
    ref = np_metrics(logits.numpy(), target.numpy(), teacher.numpy())
    assert set(got) == {f"{m}/student" for m in ("acc", "ce", "ece", "agree", "kl")}
    for metric, value in ref.items():
        assert got[f"{metric}/student"] == pytest.approx(value, abs=1e-4), metric
    assert 0 < got["agree/student"] < 100 and got["kl/student"] > 0  # the case is not degenerate


def test_accumulator_without_teacher_has_no_agreement_or_kl():
    logits, _, target = random_case(4)
    acc = MetricAccumulator()
    acc.update({"student": logits, "generative": logits * 0.5}, target)
    got = acc.result()
    assert set(got) == {f"{m}/{o}" for m in ("acc", "ce", "ece") for o in ("student", "generative")}
    ref = np_metrics(logits.numpy() * 0.5, target.numpy(), None)
    for metric, value in ref.items():
        assert got[f"{metric}/generative"] == pytest.approx(value, abs=1e-4), metric


def test_batches_accumulate_like_one_big_batch():
    logits, teacher, target = random_case(5, n=403)
    outputs = {"student": logits, "generative": logits.flip(1)}
    whole = MetricAccumulator()
    whole.update(outputs, target, teacher)
    parts = MetricAccumulator()
    for chunk in torch.arange(len(target)).split(64):  # uneven last batch
        parts.update({k: v[chunk] for k, v in outputs.items()}, target[chunk], teacher[chunk])
    expected, got = whole.result(), parts.result()
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-4), key
    ref = np_metrics(logits.flip(1).numpy(), target.numpy(), teacher.numpy())
    for metric, value in ref.items():
        assert got[f"{metric}/generative"] == pytest.approx(value, abs=1e-4), metric


def test_identical_teacher_agrees_fully_with_zero_kl():
    logits, _, target = random_case(6)
    acc = MetricAccumulator()
    acc.update({"student": logits}, target, logits.clone())
    got = acc.result()
    assert got["agree/student"] == 100.0
    assert got["kl/student"] == pytest.approx(0.0, abs=1e-6)


# -- through trainer.evaluate -----------------------------------------------------------------------
def test_evaluate_with_the_student_as_teacher():
    import gendd_framework.components  # noqa: F401  (registers every method and loss)
    from gendd_framework.data.base import BatchDataset
    from gendd_framework.engine.trainer import evaluate
    from gendd_framework.registry import METHODS

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    method = METHODS.build({"name": "ce"}, student=model)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 6, generator=gen), torch.randint(0, 4, (50,), generator=gen)
    loader = DataLoader(BatchDataset(TensorDataset(x, y)), batch_size=16)

    got = evaluate(method, loader, torch.device("cpu"), teacher=model)
    assert got["agree/student"] == 100.0
    assert got["kl/student"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        ref = np_metrics(model(x).numpy(), y.numpy(), None)
    for metric, value in ref.items():
        assert got[f"{metric}/student"] == pytest.approx(value, abs=1e-4), metric

    plain = evaluate(method, loader, torch.device("cpu"))
    assert not any(k.startswith(("agree/", "kl/")) for k in plain)
    assert plain["acc/student"] == got["acc/student"]
