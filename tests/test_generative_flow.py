"""Flow matching objective and ODE samplers, against independent computations.

The sampler tests use a Gaussian toy problem whose flow is known in closed form: x0 ~ N(μ, σ²) per
dimension, ε ~ N(0, 1), x_t = (1 − t)·x0 + t·ε. Then x_t ~ N((1 − t)μ, s²), s² = (1 − t)²σ² + t²,
Cov(x0, x_t) = (1 − t)σ², Cov(ε, x_t) = t, so the marginal velocity E[ε − x0 | x_t = x] is

    v(x, t) = −μ + (t − (1 − t)σ²) / s² · (x − (1 − t)μ),

and the exact ODE map from t = 1 to t = 0 is x0 = μ + σ·x1 (x_t = (1 − t)μ + s(t)·x1 solves it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gendd_framework.errors import ConfigError
from gendd_framework.generative.diffusion import GaussianDiffusion
from gendd_framework.generative.flow import (
    EulerSampler,
    FlowMatching,
    HeunSampler,
    OneStepSampler,
    u_shaped_density,
)
from gendd_framework.generative.samplers import DDIMSampler, DDPMSampler
from gendd_framework.registry import OBJECTIVES, SAMPLERS

MU, SIGMA = 0.7, 0.4
SHAPE = (3, 2, 4, 5)


def test_registered_names_and_alias():
    assert isinstance(OBJECTIVES.build("flow"), FlowMatching)
    assert isinstance(OBJECTIVES.build("flow_matching"), FlowMatching)
    assert isinstance(SAMPLERS.build({"name": "euler", "steps": 3}), EulerSampler)
    assert isinstance(SAMPLERS.build("heun"), HeunSampler)
    one = SAMPLERS.build("one_step")
    assert isinstance(one, OneStepSampler) and one.steps == 1 and one.nfe(None) == 1
    flow = FlowMatching()
    assert (flow.kind, flow.learn_sigma) == ("flow", False)


# -- loss -------------------------------------------------------------------------------------------
def fixed_problem():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    t = torch.rand(2, 3, generator=g, dtype=torch.float64)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    seen = {}

    def model_fn(x_t, t_model):
        seen["x_t"], seen["t"] = x_t, t_model
        return x_t @ a + 0.001 * t_model[..., None]

    return x0, noise, t, a, model_fn, seen


def hand_prediction(x0, noise, t, a):
    """The fake model's velocity and the target, computed row by row in numpy."""
    x0, noise, t, a = (v.numpy() for v in (x0, noise, t, a))
    pred = np.zeros_like(x0)
    for i in range(x0.shape[0]):
        for j in range(x0.shape[1]):
            xt = (1 - t[i, j]) * x0[i, j] + t[i, j] * noise[i, j]
            pred[i, j] = xt @ a + 0.001 * (1000.0 * t[i, j])
    return pred, noise - x0


def test_mse_loss_equals_hand_computation_and_head_sees_scaled_time():
    x0, noise, t, a, model_fn, seen = fixed_problem()
    losses = FlowMatching(loss="mse").training_losses(model_fn, x0, t=t, noise=noise)
    pred, target = hand_prediction(x0, noise, t, a)
    assert set(losses) == {"loss", "mse"}
    np.testing.assert_allclose(losses["loss"].item(), ((pred - target) ** 2).mean(), rtol=1e-12)
    np.testing.assert_allclose(seen["t"].numpy(), 1000.0 * t.numpy())
    np.testing.assert_allclose(seen["x_t"].numpy(), ((1 - t[..., None]) * x0 + t[..., None] * noise).numpy())


def test_pseudo_huber_loss_equals_hand_computation():
    x0, noise, t, a, model_fn, _ = fixed_problem()
    pred, target = hand_prediction(x0, noise, t, a)
    c_default = 0.00054 * math.sqrt(4)
    for c in (None, 0.3):
        flow = FlowMatching(loss="pseudo_huber", huber_c=c)
        losses = flow.training_losses(model_fn, x0, t=t, noise=noise)
        cc = c_default if c is None else c
        rows = np.sqrt(((pred - target) ** 2).sum(-1) + cc**2) - cc
        np.testing.assert_allclose(losses["loss"].item(), rows.mean(), rtol=1e-12)
        np.testing.assert_allclose(losses["pseudo_huber"].item(), rows.mean(), rtol=1e-12)
        np.testing.assert_allclose(losses["mse"].item(), ((pred - target) ** 2).mean(), rtol=1e-12)
    per_row = flow.training_losses(model_fn, x0, t=t, noise=noise, reduction="none")
    assert per_row["loss"].shape == (2, 3)


def test_seeded_draws_and_fixed_noise_coupling():
    x0 = torch.randn(4, 3, 2)
    flow = FlowMatching()

    def model_fn(x_t, t):
        return torch.zeros_like(x_t)

    l1 = flow.training_losses(model_fn, x0, torch.Generator().manual_seed(1))
    l2 = flow.training_losses(model_fn, x0, torch.Generator().manual_seed(1))
    assert torch.equal(l1["loss"], l2["loss"])
    noise = torch.randn(4, 3, 2)
    fixed = flow.training_losses(model_fn, x0, noise=noise)  # zero model: loss = mean (ε − x0)²
    torch.testing.assert_close(fixed["loss"], (noise - x0).pow(2).mean())


def test_head_with_variance_channels_is_refused():
    with pytest.raises(ConfigError, match="learn_sigma"):
        FlowMatching().training_losses(lambda x, t: torch.cat([x, x], -1), torch.zeros(2, 3))


@pytest.mark.parametrize(
    "kwargs", [{"time_sampling": "beta"}, {"loss": "l1"}, {"logit_std": 0.0}, {"huber_c": -1.0}]
)
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        FlowMatching(**kwargs)


# -- time sampling -----------------------------------------------------------------------------------
def draw(flow, n=200_000):
    return flow.sample_time((n,), torch.Generator().manual_seed(0), dtype=torch.float64).numpy()


def test_uniform_time_moments():
    t = draw(FlowMatching(time_sampling="uniform"))
    assert t.min() >= 0 and t.max() <= 1
    assert abs(t.mean() - 0.5) < 3e-3 and abs(t.var() - 1 / 12) < 2e-3


def test_logit_normal_time_moments():
    t = draw(FlowMatching(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8))
    logit = np.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 1e-2 and abs(logit.std() - 0.8) < 1e-2


@pytest.mark.parametrize("a", [4.0, 1.5])
def test_u_shaped_histogram_matches_density(a):
    t = draw(FlowMatching(time_sampling="u_shaped", u_shape_a=a))
    assert t.min() >= 0 and t.max() <= 1
    counts, edges = np.histogram(t, bins=20, range=(0, 1))
    # expected mass per bin from the closed-form CDF (independent of the sampler's inverse CDF)
    cdf = (np.sinh(a * (edges - 0.5)) + np.sinh(a / 2)) / (2 * np.sinh(a / 2))
    expected = np.diff(cdf) * len(t)
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
    # and the density integrates to one / matches the histogram height at the bin centres
    centres = torch.tensor((edges[:-1] + edges[1:]) / 2)
    density = u_shaped_density(centres, a).numpy()
    np.testing.assert_allclose(counts / len(t) / 0.05, density, rtol=0.05)
    assert counts[0] > counts[10] and counts[-1] > counts[10]  # U-shaped


# -- samplers on the analytic Gaussian flow ---------------------------------------------------------
def exact_velocity(x, t_model):
    t = t_model / 1000.0
    s2 = (1 - t) ** 2 * SIGMA**2 + t**2
    return -MU + (t - (1 - t) * SIGMA**2) / s2 * (x - (1 - t) * MU)


def x1():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def error(sampler):
    noise = x1()
    out = sampler.sample(FlowMatching(), exact_velocity, SHAPE, noise=noise)
    return (out - (MU + SIGMA * noise)).abs().max().item()


def test_euler_converges_to_the_exact_map_and_error_decreases():
    errors = [error(EulerSampler(steps=n)) for n in (2, 8, 32, 256, 1024)]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 3e-3 and errors[-2] / errors[-1] > 3  # first order: 4x the steps, ~1/4 the error


def test_heun_is_second_order():
    errors = [error(HeunSampler(steps=n)) for n in (8, 16, 32)]
    assert errors[0] / errors[1] > 3 and errors[1] / errors[2] > 3
    assert errors[-1] < errors[0] and error(HeunSampler(steps=32)) < error(EulerSampler(steps=64))


def test_one_euler_step_equals_hand_computation_and_one_step_sampler():
    noise = x1()
    by_hand = noise - 1.0 * exact_velocity(noise, torch.tensor(1000.0, dtype=torch.float64))
    assert torch.allclose(by_hand, torch.full_like(noise, MU))  # v(x, 1) = x − μ
    for sampler in (EulerSampler(steps=1), OneStepSampler()):
        out = sampler.sample(FlowMatching(), exact_velocity, SHAPE, noise=noise)
        torch.testing.assert_close(out, by_hand, rtol=0, atol=1e-12)


def test_nfe_counts_model_calls():
    calls = []

    def model_fn(x, t):
        calls.append(t.shape)
        return torch.zeros_like(x)

    for sampler, nfe in ((EulerSampler(5), 5), (HeunSampler(3), 5), (HeunSampler(3, True), 6)):
        calls.clear()
        sampler.sample(FlowMatching(), model_fn, (2, 3, 4), generator=torch.Generator())
        assert len(calls) == sampler.nfe(FlowMatching()) == nfe
        assert all(shape == (1, 1) for shape in calls)  # t embedded once per call


def test_initial_noise_comes_from_the_generator():
    sampler, flow = OneStepSampler(), FlowMatching()

    def zero(x, t):
        return torch.zeros_like(x)

    a = sampler.sample(flow, zero, (4, 3), generator=torch.Generator().manual_seed(5))
    b = sampler.sample(flow, zero, (4, 3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(a, torch.randn(4, 3, generator=torch.Generator().manual_seed(5)))


# -- classifier-free guidance -------------------------------------------------------------------------
class TwoBranch:
    """v_c = x·2 + 1, v_u = −x; counts calls of each branch."""

    def __init__(self):
        self.guided_calls = self.plain_calls = 0

    def __call__(self, x, t, guided=False):
        if not guided:
            self.plain_calls += 1
            return 2 * x + 1
        self.guided_calls += 1
        return 2 * x + 1, -x


def test_guidance_one_never_calls_the_unconditional_branch():
    model = TwoBranch()
    noise = x1()
    out = EulerSampler(steps=3).sample(FlowMatching(), model, SHAPE, noise=noise, guidance_scale=1.0)
    assert model.guided_calls == 0 and model.plain_calls == 3
    x = noise.clone()
    for h in (-1 / 3, -1 / 3, -1 / 3):
        x = x + h * (2 * x + 1)
    torch.testing.assert_close(out, x)


def test_guided_velocity_combines_branches():
    model, s = TwoBranch(), 3.0
    noise = x1()
    out = OneStepSampler().sample(FlowMatching(), model, SHAPE, noise=noise, guidance_scale=s)
    assert model.guided_calls == 1 and model.plain_calls == 0
    v = -noise + s * ((2 * noise + 1) - (-noise))
    torch.testing.assert_close(out, noise - v)


# -- kind checks ---------------------------------------------------------------------------------------
def test_flow_samplers_refuse_diffusion_and_diffusion_samplers_refuse_flow():
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    for sampler in (EulerSampler(), HeunSampler(), OneStepSampler()):
        with pytest.raises(ConfigError, match="ddpm"):
            sampler.sample(GaussianDiffusion(num_timesteps=10), zero, (2, 3))
    for sampler in (DDPMSampler(steps=5), DDIMSampler(steps=5)):
        with pytest.raises(ConfigError, match="euler"):
            sampler.sample(FlowMatching(), zero, (2, 3))


def test_bad_steps_are_config_errors():
    for steps in (0, -1, 2.5, True):
        with pytest.raises(ConfigError):
            EulerSampler(steps=steps)
