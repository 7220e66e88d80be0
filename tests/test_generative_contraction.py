"""Split tokenization, Distribution Contraction (incl. the section-E gradient identity) and feature mixup."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from gendd_framework.errors import ConfigError
from gendd_framework.generative.contraction import contract, feature_mixup, sample_beta, sample_mixup
from gendd_framework.generative.diffusion import GaussianDiffusion
from gendd_framework.generative.tokenizers import IdentityTokenizer, SplitTokenizer
from gendd_framework.registry import TOKENIZERS


# -- tokenizers ---------------------------------------------------------------------------------------
def test_split_tokenizer_round_trip_and_chunk_order():
    tok = SplitTokenizer(feature_dim=512, token_dim=64)
    assert tok.num_tokens == 8
    f = torch.randn(3, 512)
    tokens = tok.tokenize(f)
    assert tokens.shape == (3, 8, 64)
    for j in range(8):
        assert torch.equal(tokens[:, j], f[:, 64 * j : 64 * (j + 1)])
    assert torch.equal(tok.detokenize(tokens), f)
    samples = torch.randn(5, 3, 8, 64)  # (NS, B, n, k) from a sampler
    assert tok.detokenize(samples).shape == (5, 3, 512)


def test_split_tokenizer_divisibility_error_names_both_numbers():
    with pytest.raises(ConfigError) as info:
        SplitTokenizer(feature_dim=100, token_dim=64)
    assert "64" in str(info.value) and "100" in str(info.value)
    with pytest.raises(ConfigError, match="feature_dim=512"):
        SplitTokenizer(512, 64).tokenize(torch.zeros(2, 256))


def test_identity_tokenizer_single_token_and_registry():
    tok = TOKENIZERS.build({"name": "identity"}, feature_dim=96)
    assert isinstance(tok, IdentityTokenizer) and tok.num_tokens == 1 and tok.token_dim == 96
    f = torch.randn(4, 96)
    assert tok.tokenize(f).shape == (4, 1, 96) and torch.equal(tok.detokenize(tok.tokenize(f)), f)
    assert TOKENIZERS.build({"name": "split", "token_dim": 32}, feature_dim=96).num_tokens == 3


# -- contraction ---------------------------------------------------------------------------------------
def test_contract_hard_and_soft_labels_vs_manual():
    g = torch.Generator().manual_seed(0)
    f, W = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g)
    y = torch.tensor([0, 3, 3, 4])
    out = contract(f, y, W, 0.7)
    for b in range(4):
        assert torch.allclose(out[b], 0.3 * f[b] + 0.7 * W[y[b]])
    soft = torch.softmax(torch.randn(4, 5, generator=g), -1)
    out = contract(f, soft, W, 0.9)
    for b in range(4):
        centre = sum(soft[b, c] * W[c] for c in range(5))
        assert torch.allclose(out[b], 0.1 * f[b] + 0.9 * centre, atol=1e-6)
    one_hot = torch.nn.functional.one_hot(y, 5).float()
    assert torch.allclose(contract(f, one_hot, W, 0.7), contract(f, y, W, 0.7))
    assert contract(f, None, W, 0.0) is f  # unsupervised: λ = 0, no labels
    with pytest.raises(ConfigError):
        contract(f, y, W, 1.5)
    with pytest.raises(ConfigError):
        contract(f, y.float(), W, 0.5)


def test_distribution_contraction_gradient_identity():
    """Spec E: ∇L_DC = (1−λ)∇L_KD + λ∇L_CLS at the same (x_t, t), by autograd and finite differences."""
    torch.manual_seed(0)
    B, D, C, Dz, lam = 6, 4, 3, 5, 0.7
    f = torch.randn(B, D, dtype=torch.float64)
    W = torch.randn(C, D, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    h = torch.randn(B, Dz, dtype=torch.float64)
    d = GaussianDiffusion(learn_sigma=False)
    t = torch.tensor([3, 50, 200, 500, 800, 990])
    noise = torch.randn(B, D, dtype=torch.float64)
    # toy model: student projection S (z = h S) and a linear denoiser ε̂ = x_t A + z C + (t/1000) b
    params = [
        torch.randn(Dz, Dz, dtype=torch.float64) * 0.3,
        torch.randn(D, D, dtype=torch.float64) * 0.3,
        torch.randn(Dz, D, dtype=torch.float64) * 0.3,
        torch.randn(D, dtype=torch.float64),
    ]

    def denoiser(ps, x_t, t_model):
        S, A, Cm, b = ps
        return x_t @ A + (h @ S) @ Cm + (t_model.double() / 1000)[:, None] * b

    x0 = contract(f, y, W, lam)
    x_t = d.q_sample(x0, t, noise)  # the SAME noisy input for all three losses
    ac = d.alphas_cumprod[t][:, None]
    a, s = ac.sqrt(), (1 - ac).sqrt()
    eps_f = (x_t - a * f) / s  # noise that explains x_t from the teacher feature
    eps_w = (x_t - a * W[y]) / s  # ... and from the class centre

    def losses(ps):
        l_dc = d.training_losses(lambda xt, tm: denoiser(ps, xt, tm), x0, t=t, noise=noise)["mse"]
        e = denoiser(ps, x_t, t)
        l_kd = ((e - eps_f) ** 2).mean()
        l_cls = ((e - eps_w) ** 2).mean()
        return l_dc, l_kd, l_cls

    ps = [p.clone().requires_grad_(True) for p in params]
    l_dc, l_kd, l_cls = losses(ps)
    g_dc = torch.autograd.grad(l_dc, ps, retain_graph=True)
    g_kd = torch.autograd.grad(l_kd, ps, retain_graph=True)
    g_cls = torch.autograd.grad(l_cls, ps)
    for gd, gk, gc in zip(g_dc, g_kd, g_cls):
        assert torch.allclose(gd, (1 - lam) * gk + lam * gc, rtol=1e-10, atol=1e-10)
    # the remainder is the parameter-free −λ(1−λ)·(a/s)²‖f − w_y‖² (mean over rows and dims)
    const = -lam * (1 - lam) * ((a / s) ** 2 * (f - W[y]) ** 2).mean()
    assert (l_dc - (1 - lam) * l_kd - lam * l_cls).item() == pytest.approx(const.item(), rel=1e-9)

    # finite differences along random directions, no autograd involved
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        dirs = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        step = 1e-6
        plus = losses([p + step * v for p, v in zip(params, dirs)])
        minus = losses([p - step * v for p, v in zip(params, dirs)])
        fd = [(lp - lm).item() / (2 * step) for lp, lm in zip(plus, minus)]
        auto = sum((gd * v).sum() for gd, v in zip(g_dc, dirs)).item()
        assert fd[0] == pytest.approx((1 - lam) * fd[1] + lam * fd[2], rel=1e-6, abs=1e-8)
        assert fd[0] == pytest.approx(auto, rel=1e-6, abs=1e-8)


# -- mixup ---------------------------------------------------------------------------------------------
def test_mixup_beta_zero_is_identity_and_seeded_mixup_is_reproducible():
    z, x0 = torch.randn(8, 3), torch.randn(8, 5)
    zc, xc = feature_mixup(z, x0, 0.0, torch.Generator().manual_seed(0))
    assert zc is z and xc is x0
    a = feature_mixup(z, x0, 1.0, torch.Generator().manual_seed(5))
    b = feature_mixup(z, x0, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    m, perm = sample_mixup(8, 1.0, torch.Generator().manual_seed(5))
    assert sorted(perm.tolist()) == list(range(8)) and 0.0 <= m <= 1.0
    assert torch.allclose(a[0], m * z + (1 - m) * z[perm]) and torch.allclose(
        a[1], m * x0 + (1 - m) * x0[perm]
    )
    with pytest.raises(ConfigError):
        feature_mixup(z, x0, -1.0)


def test_mixup_gradient_flows_through_both_terms():
    z = torch.randn(6, 3, requires_grad=True)
    zc, _ = feature_mixup(z, torch.randn(6, 2), 1.0, torch.Generator().manual_seed(2))
    zc.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # m + (1 − m) per element


@pytest.mark.parametrize("beta", [0.2, 1.0, 4.0])
def test_beta_sampler_moments(beta):
    g = torch.Generator().manual_seed(int(beta * 10))
    xs = [sample_beta(beta, beta, g) for _ in range(4000)]
    var = 1 / (4 * (2 * beta + 1))  # Var Beta(β, β)
    assert abs(statistics.fmean(xs) - 0.5) < 4 * math.sqrt(var / 4000)
    assert abs(statistics.pvariance(xs) / var - 1) < 0.1
