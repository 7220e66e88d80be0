"""Noise schedules and respacing against hand computations in float64 (math.cos, round)."""

from __future__ import annotations

import math

import pytest
import torch

from gendd_framework.errors import ConfigError
from gendd_framework.generative.schedules import (
    cosine_betas,
    linear_betas,
    make_betas,
    respace_betas,
    space_timesteps,
)


def _f(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def test_cosine_alphas_cumprod_matches_hand_computation():
    T = 1000
    betas = cosine_betas(T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    ac = torch.cumprod(1 - betas, 0)
    # Without clipping, the product telescopes: ᾱ_i = f((i+1)/T) / f(0).
    for i in (0, 1, 10, 250, 500, 900, 990):
        assert ac[i].item() == pytest.approx(_f((i + 1) / T) / _f(0.0), rel=1e-12)
    assert betas[0].item() == pytest.approx(1 - _f(1 / T) / _f(0.0), rel=1e-12)
    assert betas[-1].item() == 0.999  # f(1) ≈ 0: clipped
    assert bool((betas[:-1] < 0.999).all())


def test_linear_schedule_endpoints_scale_with_T():
    b = linear_betas(1000)
    assert b.dtype == torch.float64
    assert b[0].item() == pytest.approx(1e-4, rel=1e-12) and b[-1].item() == pytest.approx(0.02, rel=1e-12)
    b = linear_betas(250)  # scale 4
    assert b[0].item() == pytest.approx(4e-4, rel=1e-12) and b[-1].item() == pytest.approx(0.08, rel=1e-12)
    diffs = b[1:] - b[:-1]
    assert torch.allclose(diffs, torch.full_like(diffs, (0.08 - 4e-4) / 249), rtol=1e-9)


def test_make_betas_unknown_schedule():
    with pytest.raises(ConfigError, match="cosine"):
        make_betas("sigmoid", 10)


@pytest.mark.parametrize("steps", [100, "100", 64, "64", 2, 1000])
def test_space_timesteps_even_rounded_with_ends(steps):
    kept = space_timesteps(1000, steps)
    S = int(steps)
    assert len(kept) == S and kept[0] == 0 and kept[-1] == 999
    stride = 999 / (S - 1)
    assert kept == [round(i * stride) for i in range(S)]
    gaps = {b - a for a, b in zip(kept, kept[1:])}
    assert gaps <= {math.floor(stride), math.ceil(stride)}


def test_space_timesteps_sections_and_errors():
    # sections [0, 50) and [50, 100): 2 and 3 evenly spaced steps (round(24.5) = 24, Python rounding)
    assert space_timesteps(100, "2,3") == [0, 49, 50, 74, 99]
    assert space_timesteps(10, 1) == [0]
    with pytest.raises(ConfigError):
        space_timesteps(10, 11)
    with pytest.raises(ConfigError):
        space_timesteps(10, "ten")


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("steps", ["100", "64", "7"])
def test_respacing_keeps_alphas_cumprod(schedule, steps):
    betas = make_betas(schedule, 1000)
    kept = space_timesteps(1000, steps)
    new_betas, tmap = respace_betas(betas, kept)
    assert tmap.tolist() == kept
    original = torch.cumprod(1 - betas, 0)
    # atol: the last ᾱ is ~1e-9, and 1 − β' cancels there in float64
    assert torch.allclose(torch.cumprod(1 - new_betas, 0), original[tmap], rtol=1e-12, atol=1e-15)
