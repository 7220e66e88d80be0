"""OFA-KD: the loss against an explicit computation, its ε = 1 identity, exit-branch shapes for CNN and
ViT students, and a CNN teacher -> timm ViT student training run (tiny shapes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, TensorDataset

import gendd_framework.components  # noqa: F401  (registrations)
from gendd_framework.cli import config_dir
from gendd_framework.context import StepContext
from gendd_framework.data.base import BatchDataset
from gendd_framework.engine.trainer import evaluate
from gendd_framework.errors import ConfigError
from gendd_framework.losses.ofa import ofa_loss
from gendd_framework.methods.feature.ofa import PatchMerging, SepConv, TokenBranch, vit_default_layers
from gendd_framework.models import build_model
from gendd_framework.registry import METHODS, OPTIMIZERS

DIGITS = (1, 8, 8)


def reference_ofa(zs, zt, y, eps, temp):
    """−Σ_c [(p_t[c] + 1{c=y})^ε − 1{c=y}] log p_s[c], averaged over rows: explicit Python loops."""
    total = 0.0
    for row_s, row_t, label in zip(zs.tolist(), zt.tolist(), y.tolist()):
        es = [math.exp(v / temp) for v in row_s]
        et = [math.exp(v / temp) for v in row_t]
        ss, st = sum(es), sum(et)
        for c in range(len(row_s)):
            p_t, log_p_s = et[c] / st, math.log(es[c] / ss)
            weight = (1.0 + p_t) ** eps - 1.0 if c == label else p_t**eps
            total -= weight * log_p_s
    return total / len(y)


@pytest.mark.parametrize("eps", [0.5, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_ofa_loss_matches_explicit_formula(eps, temp):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 7, generator=g, dtype=torch.float64), 3 * torch.randn(5, 7, generator=g).double()
    y = torch.randint(0, 7, (5,), generator=g)
    got = ofa_loss(zs, zt, y, eps, temp)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(reference_ofa(zs, zt, y, eps, temp), rel=1e-12, abs=1e-12)


def test_eps_one_is_soft_target_cross_entropy():
    """ε = 1: the weights are p_t itself, so OFA = −Σ p_t log p_s = KL(p_t‖p_s) + H(p_t), for any label."""
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(6, 5, generator=g, dtype=torch.float64)
    p_t = zt.softmax(1)
    kl = F.kl_div(zs.log_softmax(1), p_t, reduction="batchmean")
    entropy = -(p_t * p_t.log()).sum(1).mean()
    losses = [ofa_loss(zs, zt, torch.full((6,), c), 1.0) for c in range(5)]
    for loss in losses:
        assert loss.item() == pytest.approx((kl + entropy).item(), rel=1e-12)
    (grad_ofa,) = torch.autograd.grad(losses[0], zs)
    (grad_kl,) = torch.autograd.grad(kl, zs)
    assert torch.allclose(grad_ofa, grad_kl, atol=1e-14)  # the same gradient as KD without τ²


def test_eps_above_one_enhances_the_target_and_stays_finite():
    zt = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    p = zt.softmax(1)[0]
    for c in range(3):  # one-hot student log-probs pick out each class weight
        zs = torch.full((1, 3), -1e4, dtype=torch.float64)
        zs[0, c] = 0.0  # log p_s ≈ 0 at c, ≈ −1e4 elsewhere: the loss is 1e4 · Σ_{c'≠c} weight[c']
        got = ofa_loss(zs, zt, torch.tensor([0]), 2.0).item()
        weights = [(1 + p[0]) ** 2 - 1, p[1] ** 2, p[2] ** 2]
        expected = 1e4 * sum(w for i, w in enumerate(weights) if i != c)
        assert got == pytest.approx(float(expected), rel=1e-9)
    # far-apart float32 logits: log_softmax keeps the loss finite where log(softmax) would give inf
    far = ofa_loss(torch.tensor([[0.0, 200.0]]), torch.tensor([[5.0, 0.0]]), torch.tensor([0]), 1.5)
    assert torch.isfinite(far)


def test_patch_merging_matches_an_explicit_loop():
    torch.manual_seed(0)
    merge = PatchMerging((4, 4), dim=3, out_dim=5, act=False).double()
    x = torch.randn(2, 16, 3, dtype=torch.float64)
    out = merge(x)
    assert out.shape == (2, 4, 5)
    grid = x.reshape(2, 4, 4, 3)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                quad = [grid[b, 2 * i, 2 * j], grid[b, 2 * i + 1, 2 * j], grid[b, 2 * i, 2 * j + 1]]
                cat = torch.cat([*quad, grid[b, 2 * i + 1, 2 * j + 1]])
                expected = merge.reduction(merge.norm(cat))
                assert torch.allclose(out[b, 2 * i + j], expected, atol=1e-12)


def student_config(name):
    return yaml.safe_load((config_dir() / "student" / f"{name}.yaml").read_text())


def teacher_cnn(width=64):
    torch.manual_seed(1)
    return build_model({"name": "small_cnn", "channels": [8, width]}, num_classes=10).eval()


def build(student, teacher, shape=DIGITS, **kwargs):
    return METHODS.build(
        {"name": "ofa", **kwargs}, student=student, teacher=teacher, num_classes=10, input_shape=shape
    )


def test_cnn_branches_downsample_to_the_deepest_stage():
    student = build_model({"name": "small_cnn", "channels": [16, 32, 64]}, num_classes=10)
    teacher = build_model({"name": "small_cnn", "channels": [32, 64, 128]}, num_classes=10)
    term = build(student, teacher).terms[2]
    assert len(term.layers) == 3
    first, middle, last = term.branches
    seps = [m for m in first if isinstance(m, SepConv)]  # 8x8 -> 2x2: two halvings, 16 -> 32 -> 128
    assert [(s[0].in_channels, s[5].out_channels) for s in seps] == [(16, 32), (32, 128)]
    assert sum(isinstance(m, SepConv) for m in middle) == 1  # 4x4 -> 2x2
    assert isinstance(last[0], torch.nn.Conv2d) and last[0].kernel_size == (1, 1)
    assert last[0].out_channels == 128  # max(D_s = 64, D_t = 128)
    method = build(student, teacher, branch_dim=24)
    assert method.terms[2].branches[2][0].out_channels == 24
    taps = method.student(torch.randn(3, *DIGITS))
    for key, branch in zip(method.terms[2].layers, method.terms[2].branches):
        assert branch(taps[key]).shape == (3, 10)


def test_vit_branches_from_token_features():
    student = build_model(student_config("digits_vit"), num_classes=10)
    term = build(student, teacher_cnn()).terms[2]
    assert term.layers == ["blocks.0", "blocks.1", "blocks.4", "blocks.5"]  # 2, 4, 10, 12 of 12 -> of 6
    assert [len(b.blocks) for b in term.branches] == [3, 2, 1, 1]
    assert all(isinstance(b, TokenBranch) and b.prefix == 1 for b in term.branches)
    assert all(len(b.merge) == 0 for b in term.branches)  # a 4x4 grid is already below 7x7
    twelve = [f"blocks.{i}" for i in range(12)]
    assert vit_default_layers(twelve) == ["blocks.1", "blocks.3", "blocks.9", "blocks.11"]


def test_vit_branch_merges_a_14x14_grid_to_7x7():
    torch.manual_seed(0)
    branch = TokenBranch((197, 16), prefix=1, dim=24, depth=2, heads=4, num_classes=10)
    assert len(branch.merge) == 1 and branch.merge[0].reduction.out_features == 24
    assert isinstance(branch.prefix_proj, torch.nn.Linear)  # the class token follows the width change
    seen = {}
    branch.blocks[0].register_forward_pre_hook(lambda _m, inp: seen.update(tokens=inp[0].shape))
    assert branch(torch.randn(2, 197, 16)).shape == (2, 10)
    assert seen["tokens"] == (2, 50, 24)  # class token + 7x7 merged patches
    no_cls = TokenBranch((196, 16), prefix=0, dim=16, depth=1, heads=4, num_classes=10)
    assert no_cls(torch.randn(2, 196, 16)).shape == (2, 10)
    with pytest.raises(ConfigError, match="even grid"):
        TokenBranch((900, 16), prefix=0, dim=16, depth=1, heads=4, num_classes=10)  # 30 -> 15 -> odd
    with pytest.raises(ConfigError, match="branch_heads"):
        TokenBranch((16, 10), prefix=0, dim=10, depth=1, heads=4, num_classes=10)


def test_cnn_teacher_to_vit_student_trains_and_evaluates(tmp_path):
    torch.manual_seed(0)
    student = build_model(student_config("digits_vit"), num_classes=10)
    teacher = teacher_cnn()
    method = build(student, teacher, eps=[1.0, 1.2, 1.5, 2.0, 1.5])
    term = method.terms[2]
    assert term.eps == [1.0, 1.2, 1.5, 2.0] and method.terms[1].eps == 1.5
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, *DIGITS, generator=g), torch.arange(40) % 10
    target = y.clone()
    target[::4] = -1
    train = BatchDataset(TensorDataset(x, target))
    optimizer = OPTIMIZERS.build({"name": "adamw", "lr": 1e-2}, params=method.param_groups(1e-4))
    branch_params = {id(p) for p in term.branches.parameters()}
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert branch_params <= optimised
    before = [p.detach().clone() for p in term.branches.parameters()]
    method.train()
    for step, batch in enumerate(DataLoader(train, batch_size=20)):
        out = method.training_step(batch, StepContext(step=step, steps_per_epoch=2, total_steps=2))
        assert torch.isfinite(out["loss"]) and {f"ofa/{k}" for k in term.layers} <= set(out)
        optimizer.zero_grad()
        out["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.branches.parameters())
        optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, term.branches.parameters()))
    method.eval()
    predicted = method.predict(x[:5])
    assert set(predicted) == {"student"}
    assert torch.allclose(predicted["student"], student(x[:5]))
    test = DataLoader(BatchDataset(TensorDataset(x, y)), batch_size=12)
    metrics = evaluate(method, test, torch.device("cpu"))
    assert "acc/student" in metrics


def test_method_loss_is_ce_plus_ofa_terms():
    torch.manual_seed(0)
    student = build_model({"name": "small_cnn", "channels": [4, 8]}, num_classes=10)
    teacher = teacher_cnn()
    method = build(student, teacher, eps=[1.5, 2.0, 1.2], label_smoothing=0.0, kd_weight=0.5, ofa_weight=2.0)
    method.eval()  # BN in eval: the re-computation below sees identical activations
    x, y = torch.randn(6, *DIGITS), torch.arange(6)
    batch = {"input": x, "target": y, "index": torch.arange(6), "all_labelled": True}
    out = method.training_step(batch, StepContext())
    taps, z_t = method.student(x), teacher(x)
    branches = method.terms[2]
    expected = F.cross_entropy(taps["logits"], y) + 0.5 * ofa_loss(taps["logits"], z_t, y, 1.2)
    for key, branch, eps in zip(branches.layers, branches.branches, (1.5, 2.0)):
        expected = expected + 2.0 * ofa_loss(branch(taps[key]), z_t, y, eps)
    assert torch.allclose(out["loss"], expected, atol=1e-6)


def test_bad_configs_fail_clearly():
    teacher = teacher_cnn()
    student = build_model({"name": "small_cnn", "channels": [4, 8]}, num_classes=10)
    with pytest.raises(ConfigError, match="one value per branch stage"):
        build(student, teacher, eps=[1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="eps"):
        build(student, teacher, eps=-1.0)
    with pytest.raises(ConfigError, match="branch_dim"):
        build(student, teacher, branch_dim="wide")
    mlp = build_model({"name": "mlp", "in_features": 64, "hidden": [16]}, num_classes=10)
    with pytest.raises(ConfigError, match="student_layers"):
        build(mlp, teacher)
    with pytest.raises(ConfigError, match="input_shape"):
        METHODS.build({"name": "ofa"}, student=student, teacher=teacher, num_classes=10)
