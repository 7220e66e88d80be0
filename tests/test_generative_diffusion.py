"""GaussianDiffusion against closed forms written independently here (numpy/math, float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gendd_framework.errors import ConfigError
from gendd_framework.generative.diffusion import GaussianDiffusion
from gendd_framework.registry import OBJECTIVES

T = 1000


def np_schedule(T: int = T):
    """Independent cosine schedule: betas, ᾱ, ᾱ_prev as numpy float64."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    ac = np.cumprod(1 - betas)
    return betas, ac, np.concatenate([[1.0], ac[:-1]])


def np_posterior(t: int, x0: np.ndarray, xt: np.ndarray):
    betas, ac, acp = np_schedule()
    var = betas[t] * (1 - acp[t]) / (1 - ac[t])
    mean = (math.sqrt(acp[t]) * betas[t] / (1 - ac[t])) * x0 + (
        math.sqrt(1 - betas[t]) * (1 - acp[t]) / (1 - ac[t])
    ) * xt
    return mean, var


def _ts(*vals):
    return torch.tensor(vals, dtype=torch.long)


def test_registered_and_builds():
    d = OBJECTIVES.build({"name": "gaussian_diffusion", "num_timesteps": 50, "schedule": "linear"})
    assert isinstance(d, GaussianDiffusion) and d.num_timesteps == 50
    with pytest.raises(ConfigError):
        GaussianDiffusion(decoder_nll="bernoulli")
    with pytest.raises(ConfigError):
        GaussianDiffusion(predict="v")


def test_q_sample_and_q_mean_variance_closed_form():
    d = GaussianDiffusion()
    _, ac, _ = np_schedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([[0, 1, 500], [999, 7, 123], [42, 42, 42], [998, 0, 300]])
    xt = d.q_sample(x0, t, noise)
    mean, var, logvar = d.q_mean_variance(x0, t)
    for idx in np.ndindex(4, 3):
        a = ac[t[idx].item()]
        np.testing.assert_allclose(
            xt[idx].numpy(),
            math.sqrt(a) * x0[idx].numpy() + math.sqrt(1 - a) * noise[idx].numpy(),
            rtol=1e-12,
            atol=1e-14,
        )
        np.testing.assert_allclose(mean[idx].numpy(), math.sqrt(a) * x0[idx].numpy(), rtol=1e-12)
        np.testing.assert_allclose(var[idx].numpy(), 1 - a, rtol=1e-12)
        np.testing.assert_allclose(logvar[idx].numpy(), math.log(1 - a), rtol=1e-12)


def test_posterior_mean_variance_closed_form():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    xt = torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = _ts(0, 1, 2, 400, 998, 999)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    for r in range(6):
        m, v = np_posterior(t[r].item(), x0[r].numpy(), xt[r].numpy())
        np.testing.assert_allclose(mean[r].numpy(), m, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(var[r].numpy(), v, rtol=1e-10, atol=1e-300)
    # β̃_0 = 0, so the clipped log-variance uses β̃_1 at t = 0
    _, v1 = np_posterior(1, x0[0].numpy(), xt[0].numpy())
    np.testing.assert_allclose(logvar[0].numpy(), math.log(v1), rtol=1e-12)
    np.testing.assert_allclose(
        logvar[3].numpy(), math.log(np_posterior(400, x0[0].numpy(), xt[0].numpy())[1]), rtol=1e-12
    )


def test_p_mean_variance_learned_range_and_fixed():
    betas, ac, _ = np_schedule()
    g = torch.Generator().manual_seed(2)
    k = 3
    xt = torch.randn(4, k, generator=g, dtype=torch.float64)
    out = torch.randn(4, 2 * k, generator=g, dtype=torch.float64)
    t = _ts(0, 5, 600, 999)
    d = GaussianDiffusion()
    p = d.p_mean_variance(out, xt, t)
    for r in range(4):
        tr = t[r].item()
        eps, v = out[r, :k].numpy(), out[r, k:].numpy()
        x0 = (xt[r].numpy() - math.sqrt(1 - ac[tr]) * eps) / math.sqrt(ac[tr])
        m, post_var = np_posterior(tr, x0, xt[r].numpy())
        post_var_clip = np_posterior(1, x0, xt[r].numpy())[1] if tr == 0 else post_var
        frac = (v + 1) / 2
        logvar = frac * math.log(betas[tr]) + (1 - frac) * math.log(post_var_clip)
        np.testing.assert_allclose(p["pred_xstart"][r].numpy(), x0, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(p["mean"][r].numpy(), m, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(p["log_variance"][r].numpy(), logvar, rtol=1e-10)
    # fixed variances: 'large' = β_t (β̃_1 at t=0), 'small' = clipped β̃_t
    large = GaussianDiffusion(learn_sigma=False).p_mean_variance(out[:, :k], xt, t)
    small = GaussianDiffusion(learn_sigma=False, fixed_variance="small").p_mean_variance(out[:, :k], xt, t)
    b1 = np_posterior(1, 0.0, 0.0)[1]
    np.testing.assert_allclose(
        large["variance"][:, 0].numpy(), [b1, betas[5], betas[600], betas[999]], rtol=1e-10
    )
    expected_small = [b1] + [np_posterior(s, 0.0, 0.0)[1] for s in (5, 600, 999)]
    np.testing.assert_allclose(small["variance"][:, 0].numpy(), expected_small, rtol=1e-10)
    np.testing.assert_allclose(large["mean"].numpy(), p["mean"].numpy(), rtol=1e-12)


def test_x0_parameterisation_matches_epsilon():
    g = torch.Generator().manual_seed(3)
    xt = torch.randn(5, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = _ts(1, 10, 300, 700, 999)
    de, dx = GaussianDiffusion(learn_sigma=False), GaussianDiffusion(learn_sigma=False, predict="x0")
    pe = de.p_mean_variance(eps, xt, t)
    px = dx.p_mean_variance(pe["pred_xstart"], xt, t)
    assert torch.allclose(px["eps"], eps, rtol=1e-8, atol=1e-8)
    assert torch.allclose(px["mean"], pe["mean"], rtol=1e-10, atol=1e-10)


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _decoder_nll_bits(x0: np.ndarray, mean: np.ndarray, logvar: np.ndarray) -> float:
    """Independent discretised-Gaussian NLL: 1/255 half-bins, open tails beyond ±0.999, floor 1e-12."""
    total = 0.0
    for x, m, lv in zip(x0, mean, logvar):
        s = math.exp(0.5 * lv)
        if x < -0.999:
            p = _phi((x + 1 / 255 - m) / s)
        elif x > 0.999:
            p = 1 - _phi((x - 1 / 255 - m) / s)
        else:
            p = _phi((x + 1 / 255 - m) / s) - _phi((x - 1 / 255 - m) / s)
        total += -math.log(max(p, 1e-12))
    return total / len(x0) / math.log(2)


def _kl_bits(m1, lv1, m2, lv2) -> float:
    kl = 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))
    return float(kl.mean() / math.log(2))


def test_vb_terms_t0_discretized_and_t_positive_kl():
    d = GaussianDiffusion()
    k = 6
    g = torch.Generator().manual_seed(4)
    # x0 covers the left tail, the interior and the right tail of the 8-bit decoder
    x0 = torch.tensor([[-1.5, -0.9995, -0.3, 0.0, 0.9991, 2.5]] * 3, dtype=torch.float64)
    xt = x0 + 0.01 * torch.randn(3, k, generator=g, dtype=torch.float64)
    out = 0.05 * torch.randn(3, 2 * k, generator=g, dtype=torch.float64)
    t = _ts(0, 1, 250)
    vb = d.vb_terms_bpd(out, x0, xt, t)
    p = d.p_mean_variance(out, xt, t)
    mean, logvar = p["mean"].numpy(), p["log_variance"].numpy()
    assert vb[0].item() == pytest.approx(_decoder_nll_bits(x0[0].numpy(), mean[0], logvar[0]), rel=1e-7)
    for r in (1, 2):
        tm, tv = np_posterior(t[r].item(), x0[r].numpy(), xt[r].numpy())
        assert vb[r].item() == pytest.approx(_kl_bits(tm, math.log(tv), mean[r], logvar[r]), rel=1e-8)
    # plain Gaussian NLL ablation at t = 0
    dg = GaussianDiffusion(decoder_nll="gaussian")
    nll = 0.5 * (math.log(2 * math.pi) + logvar[0] + (x0[0].numpy() - mean[0]) ** 2 / np.exp(logvar[0]))
    assert dg.vb_terms_bpd(out, x0, xt, t)[0].item() == pytest.approx(nll.mean() / math.log(2), rel=1e-9)


def test_training_losses_mse_vb_and_stop_gradient():
    d = GaussianDiffusion()
    k = 4
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 3, k, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 3, k, generator=g, dtype=torch.float64)
    t = torch.tensor([[0, 10, 999], [3, 500, 0]])
    out = torch.randn(2, 3, 2 * k, generator=g, dtype=torch.float64, requires_grad=True)
    seen = {}

    def model_fn(x_t, t_model):
        seen["x_t"], seen["t"] = x_t, t_model
        return out

    losses = d.training_losses(model_fn, x0, t=t, noise=noise, reduction="none")
    assert torch.equal(seen["t"], t)  # not respaced: the model sees t itself
    assert torch.allclose(seen["x_t"], d.q_sample(x0, t, noise))
    mse = ((noise - out[..., :k]) ** 2).mean(-1)
    assert torch.allclose(losses["mse"], mse)
    assert torch.allclose(losses["vb"], d.vb_terms_bpd(out, x0, seen["x_t"], t))
    assert torch.allclose(losses["loss"], losses["mse"] + losses["vb"])
    (grad,) = torch.autograd.grad(losses["vb"].sum(), out)
    assert torch.all(grad[..., :k] == 0) and grad[..., k:].abs().sum() > 0
    mean = d.training_losses(model_fn, x0, t=t, noise=noise)
    assert mean["loss"].item() == pytest.approx(losses["loss"].mean().item())
    # vb_weight scales the VB term; learn_sigma=False drops it
    d2 = GaussianDiffusion(vb_weight=0.5)
    l2 = d2.training_losses(model_fn, x0, t=t, noise=noise, reduction="none")
    assert torch.allclose(l2["loss"], l2["mse"] + 0.5 * l2["vb"])
    d3 = GaussianDiffusion(learn_sigma=False)
    l3 = d3.training_losses(lambda x, s: out[..., :k], x0, t=t, noise=noise, reduction="none")
    assert torch.allclose(l3["loss"], mse) and torch.all(l3["vb"] == 0)


def test_training_losses_draws_per_row_and_is_seeded():
    d = GaussianDiffusion()
    x0 = torch.zeros(5, 7, 3, 2)
    seen = []

    def model_fn(x_t, t_model):
        seen.append(t_model)
        return torch.zeros(*x_t.shape[:-1], 4)

    a = d.training_losses(model_fn, x0, torch.Generator().manual_seed(9))
    b = d.training_losses(model_fn, x0, torch.Generator().manual_seed(9))
    assert seen[0].shape == (5, 7, 3) and torch.equal(seen[0], seen[1])
    assert len(seen[0].unique()) > 50  # independent t per row
    assert torch.equal(a["loss"], b["loss"])


def test_channel_mismatch_is_config_error():
    d = GaussianDiffusion(learn_sigma=True)
    with pytest.raises(ConfigError, match="learn_sigma"):
        d.training_losses(lambda x, t: x, torch.zeros(2, 4), torch.Generator().manual_seed(0))


def test_respace_keeps_alphas_and_maps_to_original_index():
    d = GaussianDiffusion()
    r = d.respace("64")
    assert r.num_timesteps == 64 and r.original_num_timesteps == 1000
    tmap = r.timestep_map
    assert tmap[0].item() == 0 and tmap[-1].item() == 999
    _, ac, _ = np_schedule()
    np.testing.assert_allclose(r.alphas_cumprod.numpy(), ac[tmap.numpy()], rtol=1e-9, atol=1e-15)
    assert torch.equal(r.model_timesteps(torch.tensor([0, 1, 63])), tmap[[0, 1, 63]])
    # respacing a respaced chain composes the maps
    rr = r.respace(4)
    assert rr.timestep_map.tolist() == [tmap[i].item() for i in (0, 21, 42, 63)]
    np.testing.assert_allclose(rr.alphas_cumprod.numpy(), ac[rr.timestep_map.numpy()], rtol=1e-9, atol=1e-15)
    assert d.num_timesteps == 1000  # the original is untouched


def test_working_dtype_float32_and_bf16_upcast():
    d = GaussianDiffusion()
    x0 = torch.randn(3, 4)
    t = _ts(1, 2, 3)
    assert d.q_sample(x0, t, torch.randn(3, 4)).dtype == torch.float32
    assert d.q_sample(x0.bfloat16(), t, torch.randn(3, 4)).dtype == torch.float32
