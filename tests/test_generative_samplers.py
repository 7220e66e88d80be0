"""DDPM/DDIM samplers: exact-ε oracle for a Gaussian target, determinism, and classifier-free guidance.

For x0 ~ N(μ, σ²) per channel and x_t = a·x0 + s·ε (a² = ᾱ_t, s² = 1 − ᾱ_t), x_t ~ N(aμ, a²σ² + s²) and
the optimal ε-predictor is E[ε | x_t] = Cov(ε, x_t)/Var(x_t)·(x_t − aμ) = s/(a²σ² + s²)·(x_t − aμ).
The exact reverse transition of the (respaced) chain is Gaussian with variance
β̃_j + c1_j²·Var(x0 | x_t), Var(x0 | x_t) = σ²s²/(a²σ² + s²), c1_j = β_j·√ᾱ_{j−1}/(1 − ᾱ_j); we express it
as the learned-range output v to test the whole DDPM path.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gendd_framework.errors import ConfigError
from gendd_framework.generative.diffusion import GaussianDiffusion
from gendd_framework.generative.samplers import DDIMSampler, DDPMSampler, guided_model_output
from gendd_framework.registry import SAMPLERS

MU = torch.tensor([1.5, -0.5, 0.2, 3.0], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=torch.float64)


def _alphas_cumprod_np(T: int = 1000) -> np.ndarray:
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.cumprod([1 - min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])


def gaussian_oracle(steps: int, learn_sigma: bool):
    """model_fn(x, t_orig) returning the exact ε (and exact variance as v) for N(MU, SIGMA²) data."""
    ac = _alphas_cumprod_np()
    kept = [round(i * 999 / (steps - 1)) for i in range(steps)]
    ack = ac[kept]
    acp = np.concatenate([[1.0], ack[:-1]])
    beta = 1 - ack / acp
    post = beta * (1 - acp) / (1 - ack)
    post_clip = np.concatenate([[post[1]], post[1:]])
    chain_index = {orig: j for j, orig in enumerate(kept)}
    mu, sig2 = MU.numpy(), SIGMA.numpy() ** 2

    def model_fn(x, t):
        t_orig = int(t.reshape(-1)[0])
        assert bool((t == t_orig).all())
        a2 = ac[t_orig]
        total = a2 * sig2 + (1 - a2)
        eps = math.sqrt(1 - a2) / total * (x.numpy() - math.sqrt(a2) * mu)
        if not learn_sigma:
            return torch.from_numpy(eps)
        j = chain_index[t_orig]
        var_x0 = sig2 * (1 - a2) / total
        c1 = beta[j] * math.sqrt(acp[j]) / (1 - ack[j])
        exact = post[j] + c1**2 * var_x0
        frac = (np.log(exact) - np.log(post_clip[j])) / (np.log(beta[j]) - np.log(post_clip[j]))
        v = np.broadcast_to(2 * frac - 1 if j > 0 else np.zeros_like(frac), eps.shape)
        return torch.from_numpy(np.concatenate([eps, v], axis=-1))

    return model_fn


def test_registered():
    assert isinstance(SAMPLERS.build({"name": "ddpm", "steps": 10}), DDPMSampler)
    assert isinstance(SAMPLERS.build({"name": "ddim", "steps": 10, "eta": 0.5}), DDIMSampler)


def test_ddpm_with_exact_model_recovers_gaussian_mean_and_variance():
    N, steps = 20000, 50
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x = DDPMSampler(steps=steps).sample(
        d, gaussian_oracle(steps, True), (N, 4), generator=g, dtype=torch.float64
    )
    # tolerance: 5 standard errors of the mean, and 5% on the variance (its standard error is √(2/N) ≈ 1%)
    assert torch.all((x.mean(0) - MU).abs() < 5 * SIGMA / math.sqrt(N))
    ratio = x.var(0) / SIGMA**2
    assert torch.all((ratio - 1).abs() < 0.05), ratio


def test_ddim_eta0_deterministic_and_recovers_mean():
    N, steps = 20000, 50
    d = GaussianDiffusion(learn_sigma=False)
    model_fn = gaussian_oracle(steps, False)
    noise = torch.randn(N, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sampler = DDIMSampler(steps=steps, eta=0.0)
    a = sampler.sample(d, model_fn, (N, 4), noise=noise, generator=torch.Generator().manual_seed(2))
    b = sampler.sample(d, model_fn, (N, 4), noise=noise, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.all((a.mean(0) - MU).abs() < 5 * SIGMA / math.sqrt(N))
    # With exact ε each deterministic DDIM step can only shrink the variance (Cauchy–Schwarz), so at
    # 50 steps the spread is somewhat too small (worst for the narrowest channel), never too large.
    ratio = a.var(0) / SIGMA**2
    assert torch.all(ratio > 0.7) and torch.all(ratio < 1 + 5 * math.sqrt(2 / N)), ratio
    # eta > 0 injects generator noise: different generators, different samples; same seed, same sample
    s = DDIMSampler(steps=steps, eta=1.0)
    c = s.sample(d, model_fn, (N, 4), noise=noise, generator=torch.Generator().manual_seed(2))
    e = s.sample(d, model_fn, (N, 4), noise=noise, generator=torch.Generator().manual_seed(2))
    f = s.sample(d, model_fn, (N, 4), noise=noise, generator=torch.Generator().manual_seed(3))
    assert torch.equal(c, e) and not torch.equal(c, f)


def test_ddpm_seeded_and_uses_original_indices_and_temperature():
    d = GaussianDiffusion()
    seen = []

    def model_fn(x, t):
        seen.append(int(t.reshape(-1)[0]))
        assert t.shape == (1, 1)  # broadcastable timestep, one per step
        return torch.zeros(*x.shape[:-1], 2 * x.shape[-1])

    a = DDPMSampler(steps=10).sample(d, model_fn, (3, 5, 2), generator=torch.Generator().manual_seed(0))
    assert seen == [round(i * 999 / 9) for i in range(10)][::-1]
    b = DDPMSampler(steps=10).sample(d, model_fn, (3, 5, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (3, 5, 2) and a.dtype == torch.float32
    # temperature 0: only the initial noise is random, so it equals a run from the same x_T
    noise = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(4))
    c = DDPMSampler(steps=10, temperature=0.0).sample(d, model_fn, (3, 5, 2), noise=noise)
    e = DDPMSampler(steps=10, temperature=0.0).sample(
        d, model_fn, (3, 5, 2), noise=noise, generator=torch.Generator()
    )
    assert torch.equal(c, e)


class _ToyCond:
    """A conditional/unconditional pair of bounded toy models with the guided contract; counts calls."""

    def __init__(self, k: int):
        g = torch.Generator().manual_seed(7)
        self.Wc, self.Wu = torch.randn(k, 2 * k, generator=g), torch.randn(k, 2 * k, generator=g)
        self.calls = {"cond": 0, "guided": 0}

    def cond(self, x, t):
        return torch.tanh(x @ self.Wc) + 0.001 * t

    def __call__(self, x, t, guided=False):
        if not guided:
            self.calls["cond"] += 1
            return self.cond(x, t)
        self.calls["guided"] += 1
        return self.cond(x, t), torch.tanh(x @ self.Wu) - 0.002 * t


@pytest.mark.parametrize("sampler", [DDPMSampler(steps=8), DDIMSampler(steps=8, eta=0.3)])
def test_guidance_scale_one_equals_conditional_model(sampler):
    d = GaussianDiffusion()
    toy = _ToyCond(3)
    a = sampler.sample(d, toy, (4, 3), guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    b = sampler.sample(d, toy.cond, (4, 3), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert toy.calls == {"cond": 8, "guided": 0}  # the unconditional branch never ran


def test_guided_output_and_one_step_guidance_match_manual():
    k, s = 3, 2.5
    toy = _ToyCond(k)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(1))
    t = torch.full((1,), 17)
    out = guided_model_output(toy, x, t, s)
    oc, ou = toy.cond(x, t), torch.tanh(x @ toy.Wu) - 0.002 * t
    assert torch.allclose(out[:, :k], ou[:, :k] + s * (oc[:, :k] - ou[:, :k]))
    assert torch.equal(out[:, k:], oc[:, k:])  # variance channels from the conditional half
    # one whole sampler step (the 1-step chain is t=0): x0 = (x − √(1−ᾱ_0)·ε)/√ᾱ_0, no noise
    a0 = _alphas_cumprod_np()[0]
    t0 = torch.zeros(1, dtype=torch.long)
    oc, ou = toy.cond(x, t0), torch.tanh(x @ toy.Wu)
    eps = (ou[:, :k] + s * (oc[:, :k] - ou[:, :k])).double()
    expected = (x.double() - math.sqrt(1 - a0) * eps) / math.sqrt(a0)
    d = GaussianDiffusion()
    for sampler in (DDPMSampler(steps=1), DDIMSampler(steps=1)):
        got = sampler.sample(d, toy, (4, k), guidance_scale=s, noise=x)
        assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_guidance_requires_guided_model_fn():
    d = GaussianDiffusion()
    with pytest.raises(ConfigError, match="guided"):
        DDPMSampler(steps=2).sample(d, lambda x, t: torch.cat([x, x], -1), (2, 3), guidance_scale=2.0)
