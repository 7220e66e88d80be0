"""MLPAdaLNHead: zero init, shapes, embedding granularity/caching, null condition, guided model_fn."""

from __future__ import annotations

import math

import pytest
import torch

from gendd_framework.errors import ConfigError
from gendd_framework.generative.head import MLPAdaLNHead, timestep_embedding
from gendd_framework.registry import HEADS


def _randomise(head: MLPAdaLNHead, seed: int = 0) -> MLPAdaLNHead:
    """Perturb every parameter so the zero-initialised paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return head


def _inputs(R, B, n, k, cond_dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, B, n, k, generator=g)
    t = torch.randint(0, 1000, (R, B, n), generator=g)
    z = torch.randn(B, cond_dim, generator=g)
    return x, t, z


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32])
def test_zero_init_outputs_exact_zeros_and_shapes(n):
    k, cond_dim = 4, 6
    head = MLPAdaLNHead(token_dim=k, cond_dim=cond_dim, num_positions=n, width=32, depth=2)
    x, t, z = _inputs(3, 5, n, k, cond_dim)
    out = head(x, t, z)
    assert out.shape == (3, 5, n, 2 * k)
    assert torch.equal(out, torch.zeros_like(out))
    small = MLPAdaLNHead(
        token_dim=k, cond_dim=cond_dim, num_positions=n, width=32, depth=1, learn_sigma=False
    )
    assert _randomise(small)(x[0], t[0], z).shape == (5, n, k)  # no replica dim is fine too


def test_init_statistics_and_official_parameter_count():
    head = MLPAdaLNHead(token_dim=64, cond_dim=512, num_positions=8)  # ResNet-34 -> ResNet-18 head
    W = 1024
    expected = (
        (256 * W + W)
        + (W * W + W)  # timestep MLP
        + (512 * W + W)  # cond_embed
        + 8 * W  # pos_embed
        + (64 * W + W)  # input_proj
        + 3 * (2 * W + 2 * (W * W + W) + (W * 3 * W + 3 * W))  # ResBlocks: LN affine, MLP, adaLN
        + (W * 2 * W + 2 * W)
        + (W * 128 + 128)  # final adaLN + linear
    )
    assert sum(p.numel() for p in head.parameters()) == expected == 19_893_376  # the GenDD paper: 19.89 M
    assert abs(head.time_embed.mlp[0].weight.std().item() - 0.02) < 0.002
    assert abs(head.pos_embed.weight.std().item() - 1.0) < 0.05
    bound = math.sqrt(6 / (512 + W))  # Xavier-uniform bound of cond_embed
    assert (
        head.cond_embed.weight.abs().max().item() <= bound and head.cond_embed.weight.std().item() > bound / 3
    )
    assert torch.all(head.cond_embed.bias == 0)
    for layer in [b.modulation[-1] for b in head.blocks] + [head.final.modulation[-1], head.final.linear]:
        assert torch.all(layer.weight == 0) and torch.all(layer.bias == 0)


def test_timestep_embedding_cos_first_raw_index():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 256)
    freqs = [math.exp(-math.log(10000) * i / 128) for i in range(128)]
    for r, tv in enumerate(t.tolist()):
        assert emb[r, :128].tolist() == pytest.approx([math.cos(tv * f) for f in freqs], abs=1e-4)
        assert emb[r, 128:].tolist() == pytest.approx([math.sin(tv * f) for f in freqs], abs=1e-4)


def test_cached_context_equals_uncached_and_model_fn():
    k, n, cond_dim = 4, 8, 6
    head = _randomise(MLPAdaLNHead(token_dim=k, cond_dim=cond_dim, num_positions=n, width=32, depth=2))
    x, t, z = _inputs(3, 5, n, k, cond_dim)
    plain = head(x, t, z)
    ctx = head.embed_context(z)
    assert ctx.shape == (5, n, 32)
    assert torch.allclose(ctx, head.embed_condition(z)[:, None] + head.position_embedding()[None])
    assert torch.equal(head(x, t, context=ctx), plain)
    assert torch.equal(head.make_model_fn(z)(x, t), plain)
    # per-row reference: every row computed alone with its own (z_b, position j, t)
    r, b, j = 2, 3, 5
    y = head.time_embed(t[r, b, j]) + head.cond_embed(z[b]) + head.pos_embed.weight[j]
    assert torch.allclose(head.denoise(x[r, b, j], y), plain[r, b, j], atol=1e-6)


def test_condition_embedded_once_per_image_and_cached_across_calls():
    k, n, cond_dim, B = 4, 8, 6, 5
    head = _randomise(MLPAdaLNHead(token_dim=k, cond_dim=cond_dim, num_positions=n, width=32, depth=1))
    shapes = []
    head.cond_embed.register_forward_hook(lambda m, inp, out: shapes.append(tuple(inp[0].shape)))
    x, t, z = _inputs(10, B, n, k, cond_dim)
    head(x, t, z)
    assert shapes == [(B, cond_dim)]  # not (10·B·n, cond_dim)
    fn = head.make_model_fn(z)
    for step in range(4):
        fn(x, torch.full((1, 1, 1), step))
        fn(x, torch.full((1, 1, 1), step), guided=True)
    assert shapes == [(B, cond_dim)] * 2  # one more call for make_model_fn, none per step


def test_condition_dropout_rows_use_bias_null_condition():
    k, n, cond_dim = 4, 2, 6
    head = _randomise(MLPAdaLNHead(token_dim=k, cond_dim=cond_dim, num_positions=n, width=32, depth=2))
    x, t, z = _inputs(3, 4, n, k, cond_dim)
    drop = torch.rand(3, 4, n, generator=torch.Generator().manual_seed(3)) < 0.5
    assert drop.any() and (~drop).any()
    out = head(x, t, z, drop=drop)
    with_null = head(x, t, torch.zeros_like(z))
    assert torch.allclose(out[drop], with_null[drop], atol=1e-6)
    assert torch.allclose(out[~drop], head(x, t, z)[~drop], atol=1e-6)
    assert torch.allclose(head.null_context(), head.cond_embed.bias + head.pos_embed.weight)
    assert torch.equal(head.embed_context(torch.zeros(1, cond_dim))[0], head.null_context())
    # gradients: dropped rows reach the bias but not z
    zg = z.clone().requires_grad_(True)
    all_dropped = torch.ones(3, 4, n, dtype=torch.bool)
    head(x, t, zg, drop=all_dropped).sum().backward()
    assert torch.all(zg.grad == 0) and head.cond_embed.bias.grad.abs().sum() > 0


def test_guided_model_fn_returns_cond_and_null_outputs():
    k, n, cond_dim = 4, 4, 6
    head = _randomise(MLPAdaLNHead(token_dim=k, cond_dim=cond_dim, num_positions=n, width=32, depth=2))
    x, _, z = _inputs(3, 5, n, k, cond_dim)
    t = torch.full((1, 1, 1), 321)
    out_c, out_u = head.make_model_fn(z)(x, t, guided=True)
    assert out_c.shape == out_u.shape == (3, 5, n, 2 * k)
    assert torch.allclose(out_c, head(x, t, z), atol=1e-6)
    assert torch.allclose(out_u, head(x, t, torch.zeros_like(z)), atol=1e-6)


def test_gradient_checkpointing_matches():
    k, n, cond_dim = 4, 2, 6
    a = _randomise(MLPAdaLNHead(token_dim=k, cond_dim=cond_dim, num_positions=n, width=32, depth=2))
    b = MLPAdaLNHead(
        token_dim=k, cond_dim=cond_dim, num_positions=n, width=32, depth=2, grad_checkpointing=True
    )
    b.load_state_dict(a.state_dict())
    x, t, z = _inputs(2, 3, n, k, cond_dim)
    a(x, t, z).square().sum().backward()
    b(x, t, z).square().sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5)


def test_registry_and_shape_errors():
    head = HEADS.build(
        {"name": "mlp_adaln", "width": 16, "depth": 1}, token_dim=4, cond_dim=3, num_positions=2
    )
    assert isinstance(head, MLPAdaLNHead)
    with pytest.raises(ConfigError, match="n=2"):
        head(torch.zeros(1, 5, 3, 4), torch.zeros(1, 5, 3, dtype=torch.long), torch.zeros(5, 3))
    with pytest.raises(ConfigError, match="condition"):
        head(torch.zeros(1, 5, 2, 4), torch.zeros(1, 5, 2, dtype=torch.long), torch.zeros(5, 7))
    with pytest.raises(ConfigError, match="width"):
        MLPAdaLNHead(token_dim=4, cond_dim=3, width=0)
