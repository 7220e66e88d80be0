"""Adversarial, invariance, corruption and calibration probes against independent computations:
FGSM/I-FGSM on logistic regression (closed form), models exactly invariant to a transform and one whose
consistency numpy computes, corruption at strength 0 and scipy's Gaussian filter, numpy reliability
bins and sklearn's confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import confusion_matrix
from torch import nn

from gendd_framework.analysis.probes.adversarial import ifgsm, probe_adversarial
from gendd_framework.analysis.probes.calibration import agreement_matrix, probe_calibration, reliability
from gendd_framework.analysis.probes.common import ProbeUnavailable, probe_data
from gendd_framework.analysis.probes.corruption import gaussian_blur, noisy, probe_corruption
from gendd_framework.analysis.probes.invariance import probe_invariance, shift
from gendd_framework.analysis.probes.settings import (
    AdversarialSettings,
    CalibrationSettings,
    CorruptionSettings,
    InvarianceSettings,
)
from gendd_framework.errors import ConfigError


def linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        model[1].weight.copy_(weight), model[1].bias.copy_(bias)
    return model.eval()


def logistic_case(seed: int = 0, n: int = 400, d: int = 6):
    """A two-class linear teacher and student and inputs away from the float32 decision edges."""
    g = torch.Generator().manual_seed(seed)
    wt, ws = torch.randn(2, d, generator=g), torch.randn(2, d, generator=g)
    bt, bs = torch.randn(2, generator=g), torch.randn(2, generator=g)
    x = torch.randn(n, 1, 1, d, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return linear(wt, bt), linear(ws, bs), x, y


@torch.no_grad()
def closed_form(teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float):
    """FGSM on CE(label) moves x by eps·sign(w)·(1 − 2y), w = w1 − w0: a correct teacher flips exactly
    when its margin is below eps·||w||_1; the student's margin moves by w_s·delta."""
    wt = (teacher[1].weight[1] - teacher[1].weight[0]).detach().double().numpy()
    ws = (student[1].weight[1] - student[1].weight[0]).detach().double().numpy()
    ct = float(teacher[1].bias[1] - teacher[1].bias[0])
    cs = float(student[1].bias[1] - student[1].bias[0])
    xs, ys = x.reshape(len(x), -1).double().numpy(), y.numpy()
    m_t, m_s = xs @ wt + ct, xs @ ws + cs
    delta = eps * np.sign(wt)[None, :] * (1 - 2 * ys)[:, None]
    reach = eps * np.abs(wt).sum()
    flipped_t = np.where(ys == 1, (m_t > 0) & (m_t < reach), (m_t < 0) & (m_t > -reach))
    m_s_adv = m_s + delta @ ws
    flipped_s = np.sign(m_s_adv) != np.sign(m_s)
    safe = (np.abs(np.abs(m_t) - reach) > 1e-3) & (np.abs(m_s_adv) > 1e-3) & (np.abs(m_t) > 1e-3)
    return flipped_t, flipped_s, safe


@pytest.mark.parametrize("steps,step_size", [(1, 0.4), (5, None)])
def test_adversarial_transfer_on_logistic_regression_is_the_closed_form(steps, step_size):
    """One FGSM step of eps, or five I-FGSM steps (the gradient sign of a linear model is constant, so
    they end at the same corner of the eps-ball)."""
    eps = 0.4
    teacher, student, x, y = logistic_case()
    flipped_t, flipped_s, safe = closed_form(teacher, student, x, y, eps)
    keep = torch.from_numpy(safe)
    x, y, flipped_t, flipped_s = x[keep], y[keep], flipped_t[safe], flipped_s[safe]
    assert 20 < flipped_t.sum() < len(y) - 20  # a case with both outcomes
    s = AdversarialSettings(eps=eps, steps=steps, step_size=step_size, clip=False)
    result = probe_adversarial(teacher, student, probe_data(teacher, student, x, y, 64), s)
    m = result.metrics
    assert result.details["kept"] == flipped_t.sum()
    assert m["adversarial/teacher_flipped"] == pytest.approx(100 * flipped_t.mean())
    assert m["adversarial/fooling_rate"] == pytest.approx(100 * flipped_s[flipped_t].mean())
    # two classes: a flipped student lands on the teacher's adversarial class exactly when it had agreed
    agreed = (teacher(x).argmax(1) == student(x).argmax(1)).detach().numpy()
    same = np.where(agreed, flipped_s, ~flipped_s)[flipped_t]
    assert m["adversarial/same_class"] == pytest.approx(100 * same.mean())


def test_ifgsm_stays_in_the_ball_and_the_value_range():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,))
    adv = ifgsm(model, x, y, eps=0.3, step_size=0.2, steps=4, value_range=(0.0, 1.0))
    assert float((adv - x).abs().max()) <= 0.3 + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    torch.testing.assert_close(adv, ifgsm(model, x, y, 0.3, 0.2, 4, (0.0, 1.0)))  # deterministic


def test_shift_replicates_the_edge_like_numpy():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    for dy, dx in [(1, 0), (-1, 0), (0, 2), (0, -1), (1, -2)]:
        padded = np.pad(x.numpy(), ((0, 0), (0, 0), (abs(dy),) * 2, (abs(dx),) * 2), mode="edge")
        top, left = abs(dy) - dy, abs(dx) - dx
        expected = padded[:, :, top : top + 4, left : left + 5]
        np.testing.assert_array_equal(shift(x, dy, dx).numpy(), expected)


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def centred_linear(seed: int) -> nn.Module:
    """logits = W·(x − mean(x)), no bias: unchanged by brightness, scaled by c > 0 under contrast."""
    w = torch.randn(64, 5, generator=torch.Generator().manual_seed(seed))
    return Fn(lambda x: (x - x.mean(dim=(1, 2, 3), keepdim=True)).flatten(1) @ w)


def test_invariance_of_exactly_invariant_and_of_sensitive_models():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(300, 1, 8, 8)
    x[:, :, 1:-1, 1:-1] = torch.randn(300, 1, 6, 6, generator=g)  # a zero border: shifts keep the mass
    y = torch.randint(0, 5, (300,), generator=g)
    summed = Fn(lambda x: torch.stack([x.sum((1, 2, 3)), torch.zeros(len(x))], 1))  # shift-invariant
    mean_sign = Fn(lambda x: torch.stack([x.mean((1, 2, 3)), torch.zeros(len(x))], 1))
    s = InvarianceSettings(shift=[1], contrast=[0.5, 2.0], brightness=[0.3], saturation=[])
    inv = centred_linear(1)
    only = InvarianceSettings(shift=[], brightness=[0.3], contrast=[0.5, 2.0])
    m = probe_invariance(inv, inv, probe_data(inv, inv, x, y, 64), only).metrics
    assert m["invariance/contrast/teacher"] == 100.0 and m["invariance/brightness/student"] == 100.0
    m = probe_invariance(summed, summed, probe_data(summed, summed, x, y, 64), s).metrics
    assert m["invariance/shift/teacher"] == 100.0
    # the mean-sign model under +0.3 std brightness: numpy says which images keep their class
    result = probe_invariance(mean_sign, summed, probe_data(mean_sign, summed, x, y, 64), s)
    mean = x.double().mean((1, 2, 3)).numpy()
    bright = mean + 0.3 * float(x.double().std())
    expected = 100 * np.mean((mean > 0) == (bright > 0))
    per = result.details["per_transform"]["brightness_+0.3"]
    assert expected < 100 and per["teacher"] == pytest.approx(expected)
    assert per["relative"] == pytest.approx(per["student"] / expected)
    assert "saturation_0.5" not in result.details["per_transform"]  # one channel: no saturation


def test_image_probes_refuse_flat_inputs_in_one_line():
    model = nn.Linear(4, 3)
    data = probe_data(model, model, torch.randn(6, 4), torch.zeros(6, dtype=torch.long), 8)
    with pytest.raises(ProbeUnavailable, match="not \\(C, H, W\\)"):
        probe_invariance(model, model, data, InvarianceSettings())


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).eval()


def test_corruption_at_strength_zero_is_the_clean_agreement():
    t, s = small_cnn(0), small_cnn(1)
    x, y = torch.randn(50, 1, 8, 8), torch.randint(0, 10, (50,))
    data = probe_data(t, s, x, y, 16)
    m = probe_corruption(t, s, data, CorruptionSettings(noise=[0.0], blur=[0.0])).metrics
    clean = 100 * float((data.student_pred == data.teacher_pred).double().mean())
    assert m["corruption/noise_0/agree"] == m["corruption/blur_0/agree"] == pytest.approx(clean)
    assert m["corruption/noise_0/student_acc"] == pytest.approx(
        100 * float((data.student_pred == y).double().mean())
    )
    again = probe_corruption(t, s, data, CorruptionSettings(noise=[0.5], blur=[]), seed=3).metrics
    assert again == probe_corruption(t, s, data, CorruptionSettings(noise=[0.5], blur=[]), seed=3).metrics


def test_blur_is_scipys_gaussian_filter_and_noise_has_its_std():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for sigma in (0.5, 1.0):
        expected = gaussian_filter(x.double().numpy(), (0, 0, sigma, sigma), mode="mirror", truncate=3.0)
        np.testing.assert_allclose(gaussian_blur(x, sigma).numpy(), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="corruption.blur"):
        gaussian_blur(x, 3.0)
    big = torch.zeros(200, 1, 16, 16)
    assert float(noisy(big, 0.5, seed=0).std()) == pytest.approx(0.5, rel=0.02)
    torch.testing.assert_close(noisy(big, 0.5, seed=0), noisy(big, 0.5, seed=0))


def test_reliability_bins_and_agreement_matrix_match_numpy_and_sklearn():
    g = torch.Generator().manual_seed(0)
    logits, targets = 3 * torch.randn(500, 7, generator=g), torch.randint(0, 7, (500,), generator=g)
    bins = 10
    rel = reliability(logits, targets, bins)
    probs = torch.softmax(logits.double(), 1).numpy()
    conf, pred = probs.max(1), probs.argmax(1)
    correct = pred == targets.numpy()
    for b in range(bins):
        inside = (conf > b / bins) & (conf <= (b + 1) / bins)
        assert rel["count"][b] == inside.sum()
        if inside.any():
            assert rel["confidence"][b] == pytest.approx(conf[inside].mean())
            assert rel["accuracy"][b] == pytest.approx(correct[inside].mean())
    ece = 100 * sum(
        abs(correct[i].mean() - conf[i].mean()) * i.sum() / len(conf)
        for i in [(conf > b / bins) & (conf <= (b + 1) / bins) for b in range(bins)]
        if i.any()
    )
    assert rel["ece"] == pytest.approx(ece)
    student = torch.randint(0, 7, (500,), generator=g)
    matrix = agreement_matrix(pred_t := torch.from_numpy(pred), student, 7)
    np.testing.assert_array_equal(matrix.numpy(), confusion_matrix(pred_t, student, labels=range(7)))


def test_calibration_probe_per_class_agreement():
    t, s = small_cnn(0), small_cnn(1)
    x, y = torch.randn(80, 1, 8, 8), torch.randint(0, 10, (80,))
    data = probe_data(t, s, x, y, 32)
    result = probe_calibration(data, CalibrationSettings(bins=5))
    tp, sp = data.teacher_pred.numpy(), data.student_pred.numpy()
    rates = [100 * np.mean(sp[tp == k] == k) for k in range(10) if (tp == k).any()]
    assert result.metrics["calibration/min_class_agree"] == pytest.approx(min(rates))
    assert result.metrics["calibration/agree"] == pytest.approx(100 * np.mean(tp == sp))
    assert len(result.details["reliability_student"]["count"]) == 5
