"""ReviewKD (ABF + HCL) and ND: float64 maths against independent computations, HCL parity with
torchdistill, ABF shapes on heterogeneous pairs, ND class centres from the prepare hook, and every
config (standalone and YAML compositions) composing and training one step with tiny CNNs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

import gendd_framework.components  # noqa: F401  (registrations)
from gendd_framework import config as config_lib
from gendd_framework.cli import config_dir
from gendd_framework.context import StepContext
from gendd_framework.data.base import BatchDataset
from gendd_framework.engine.statistics import TeacherStatistics
from gendd_framework.errors import ConfigError
from gendd_framework.losses.nd import nd_loss
from gendd_framework.losses.review import AttentionFusion, hcl_level, hcl_levels, resize_to, review_fuse
from gendd_framework.models import build_model
from gendd_framework.models.tap import FeatureTap
from gendd_framework.registry import METHODS, split_spec

CONFIGS = ["reviewkd", "nd", "nd_dkd", "nd_dist", "reviewkd_nd", "reviewkd_dkd"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: on a shared 2-core box intra-op thread barriers cost more than the work."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def cnn(channels, seed=0, classes=10):
    torch.manual_seed(seed)
    return build_model({"name": "small_cnn", "channels": list(channels)}, num_classes=classes)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- HCL ------------------------------------------------------------------------------------------------
def pool_loops(x: np.ndarray, k: int) -> np.ndarray:
    """Adaptive average pooling by explicit loops: cell i spans [floor(i*H/k), ceil((i+1)*H/k))."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, k, k))
    for i in range(k):
        for j in range(k):
            r0, r1 = math.floor(i * h / k), math.ceil((i + 1) * h / k)
            c0, c1 = math.floor(j * w / k), math.ceil((j + 1) * w / k)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


def hcl_reference(fs: np.ndarray, ft: np.ndarray, sizes=(4, 2, 1)) -> float:
    terms, weights = [((fs - ft) ** 2).mean()], [1.0]
    for k in sizes:
        if k < min(fs.shape[2:]):
            weights.append(weights[-1] / 2)
            terms.append(((pool_loops(fs, k) - pool_loops(ft, k)) ** 2).mean())
    return sum(w * t for w, t in zip(weights, terms)) / sum(weights)


@pytest.mark.parametrize("hw", [(8, 8), (7, 7), (4, 4), (3, 5), (2, 2), (1, 1)])
def test_hcl_matches_an_explicit_pyramid_in_float64(hw):
    fs, ft = rand(2, 3, *hw, seed=1), rand(2, 3, *hw, seed=2)
    expected = hcl_reference(fs.numpy(), ft.numpy())
    assert hcl_level(fs, ft).item() == pytest.approx(expected, rel=1e-12)
    # weights for an 8x8 map: 1 (full), 1/2 (4x4), 1/4 (2x2), 1/8 (1x1); a 4x4 map skips the 4x4 pool
    if hw == (8, 8):
        fs_np, ft_np = fs.numpy(), ft.numpy()
        by_hand = sum(
            w * ((pool_loops(fs_np, k) - pool_loops(ft_np, k)) ** 2).mean()
            for w, k in [(0.5, 4), (0.25, 2), (0.125, 1)]
        )
        assert hcl_level(fs, ft).item() == pytest.approx((((fs_np - ft_np) ** 2).mean() + by_hand) / 1.875)


def test_hcl_identities():
    fs, ft = rand(2, 4, 6, 6, seed=3), rand(2, 4, 6, 6, seed=4)
    assert hcl_level(fs, fs).item() == 0.0
    assert hcl_level(3 * fs, 3 * ft).item() == pytest.approx(9 * hcl_level(fs, ft).item(), rel=1e-12)
    assert hcl_level(fs, ft).item() == pytest.approx(hcl_level(ft, fs).item(), rel=1e-12)
    levels = hcl_levels([fs, fs[:, :, :2, :2]], [ft, ft[:, :, :2, :2]])
    assert levels[1].item() == pytest.approx(
        hcl_reference(fs[:, :, :2, :2].numpy(), ft[:, :, :2, :2].numpy())
    )
    with pytest.raises(ValueError, match="equal shapes"):
        hcl_level(fs, ft[:, :2])


@pytest.mark.parametrize("hw", [(56, 56), (14, 14), (7, 7), (8, 8), (4, 4), (2, 2), (1, 1)])
def test_hcl_equals_torchdistill_hierarchical_context_loss(hw):
    from torchdistill.losses.mid_level import HierarchicalContextLoss

    oracle = HierarchicalContextLoss(
        "abf.0", "output", "layer1", "output", reduction="mean", output_sizes=[4, 2, 1]
    )
    fs, ft = rand(3, 5, *hw, seed=5), rand(3, 5, *hw, seed=6)
    # its student entry is the ABF's (output, residual) pair
    theirs = oracle({"abf.0": {"output": (fs, None)}}, {"layer1": {"output": ft}})
    ours = hcl_level(fs, ft)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0)


# -- ABF --------------------------------------------------------------------------------------------------
def test_resize_grows_by_nearest_and_shrinks_by_average_pooling():
    x = rand(1, 2, 3, 3, seed=7)
    up = resize_to(x, (6, 6))
    assert torch.equal(up, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    down = resize_to(rand(1, 2, 6, 6, seed=8), (3, 3))
    big = rand(1, 2, 6, 6, seed=8).numpy()
    np.testing.assert_allclose(down.numpy(), pool_loops(big, 3), rtol=1e-12)
    assert resize_to(x, (3, 3)) is x


def bn_eval(x: np.ndarray, bn) -> np.ndarray:
    mean, var = bn.running_mean.numpy(), bn.running_var.numpy()
    g, b = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    return (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + bn.eps) * g[
        None, :, None, None
    ] + b[None, :, None, None]


def conv3x3_loops(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    n, _, h, wd = x.shape
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nchw,oc->nohw", pad[:, :, dy : dy + h, dx : dx + wd], w[:, :, dy, dx])
    return out


def test_attention_fusion_matches_a_hand_computation_in_float64():
    torch.manual_seed(0)
    abf = AttentionFusion(3, 4, 5, fuse=True, out_size=(8, 8)).double().eval()
    for bn in (abf.conv1[1], abf.conv2[1]):  # non-trivial running statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    x, residual = rand(2, 3, 4, 4, seed=9), rand(2, 4, 2, 2, seed=10)
    out, res = abf(x, residual)

    xn, rn = x.numpy(), residual.numpy()
    h = bn_eval(
        np.einsum("nchw,oc->nohw", xn, abf.conv1[0].weight.detach().numpy()[:, :, 0, 0]), abf.conv1[1]
    )
    r = rn.repeat(2, axis=2).repeat(2, axis=3)  # nearest 2x2 -> 4x4
    wa, ba = abf.att_conv.weight.detach().numpy()[:, :, 0, 0], abf.att_conv.bias.detach().numpy()
    logits = np.einsum("nchw,oc->nohw", np.concatenate([h, r], axis=1), wa) + ba[None, :, None, None]
    a = 1 / (1 + np.exp(-logits))
    fused = h * a[:, 0:1] + r * a[:, 1:2]
    fused = fused.repeat(2, axis=2).repeat(2, axis=3)  # to the teacher's 8x8
    expected = bn_eval(conv3x3_loops(fused, abf.conv2[0].weight.detach().numpy()), abf.conv2[1])
    np.testing.assert_allclose(res.detach().numpy(), fused, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_review_fuse_flows_deep_to_shallow_only():
    torch.manual_seed(0)
    abfs = [
        AttentionFusion(2, 4, 3, True, (8, 8)),
        AttentionFusion(5, 4, 6, True, (4, 4)),
        AttentionFusion(7, 4, 9, False, (1, 1)),
    ]
    abfs = [a.double().eval() for a in abfs]
    maps = [rand(2, 2, 8, 8, seed=1), rand(2, 5, 4, 4, seed=2), rand(2, 7, 1, 1, seed=3)]
    out = review_fuse(abfs, maps)
    assert [tuple(o.shape) for o in out] == [(2, 3, 8, 8), (2, 6, 4, 4), (2, 9, 1, 1)]
    shallow_changed = review_fuse(abfs, [maps[0] + 1, maps[1], maps[2]])
    assert torch.equal(shallow_changed[1], out[1]) and torch.equal(shallow_changed[2], out[2])
    deep_changed = review_fuse(abfs, [maps[0], maps[1], maps[2] + 1])
    assert not torch.allclose(deep_changed[0], out[0])  # the deepest level reaches the shallowest


@pytest.mark.parametrize(
    "s_channels, t_channels",
    [((4, 8), (8, 64)), ((4, 8, 16), (8, 64)), ((4, 8), (8, 16, 32))],  # equal, upsample, pool down
)
def test_reviewkd_abfs_match_teacher_levels_on_heterogeneous_pairs(s_channels, t_channels):
    student, teacher = cnn(s_channels), cnn(t_channels, seed=1).eval()
    method = METHODS.build({"name": "reviewkd"}, student=student, teacher=teacher, input_shape=(1, 8, 8))
    term = method.terms[1]
    shapes = term.level_shapes
    assert len(term.abfs) == len(shapes["teacher"]) == min(len(s_channels), len(t_channels)) + 1
    assert shapes["mid_channels"] == s_channels[-1]  # min(512, student feature dim)
    assert term.abfs[-1].att_conv is None and all(a.att_conv is not None for a in term.abfs[:-1])
    x = torch.randn(6, 1, 8, 8)
    s_out, t_out = method.student(x), method.teacher(x)
    fused = review_fuse(term.abfs, term._maps(s_out, term.student_maps))
    assert [tuple(f.shape[1:]) for f in fused] == [tuple(t) for t in shapes["teacher"]]
    batch = {"input": x, "target": torch.arange(6) % 10, "all_labelled": True}
    value = term(s_out, t_out, batch, StepContext())
    assert torch.isfinite(value["loss"]) and set(value) == {"loss", *(f"level{i}" for i in range(len(fused)))}
    value["loss"].backward()
    assert all(p.grad is not None for p in term.abfs.parameters())


def test_reviewkd_bad_configs_fail_clearly():
    teacher = cnn((8, 64), seed=1).eval()
    mlp = build_model({"name": "mlp"}, num_classes=10)
    with pytest.raises(ConfigError, match="student_layers"):
        METHODS.build({"name": "reviewkd"}, student=mlp, teacher=teacher, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="mid_channels"):
        METHODS.build(
            {"name": "reviewkd", "mid_channels": 0},
            student=cnn((4, 8)),
            teacher=teacher,
            input_shape=(1, 8, 8),
        )
    with pytest.raises(ConfigError, match="pool_sizes"):
        METHODS.build(
            {"name": "reviewkd", "pool_sizes": [2, 0]},
            student=cnn((4, 8)),
            teacher=teacher,
            input_shape=(1, 8, 8),
        )
    with pytest.raises(ConfigError, match="student_layers"):
        METHODS.build(
            {"name": "reviewkd", "student_layers": ["fc"]},
            student=cnn((4, 8)),
            teacher=teacher,
            input_shape=(1, 8, 8),
        )


# -- ND ---------------------------------------------------------------------------------------------------
def nd_reference(s, t, centres, labels) -> float:
    """The authors' per-sample loop, in plain Python floats."""

    def norm(v):
        return math.sqrt(sum(a * a for a in v))

    total = 0.0
    for si, ti, y in zip(s, t, labels):
        e = [v / norm(centres[y]) for v in centres[y]]
        total += 1 - sum(a * b for a, b in zip(si, e)) / max(norm(si), norm(ti))
    return total / len(labels)


def test_nd_loss_matches_a_per_sample_loop_in_float64():
    s, t, centres = rand(7, 5, seed=1), 3 * rand(7, 5, seed=2), rand(4, 5, seed=3)
    labels = torch.tensor([0, 1, 2, 3, 3, 1, 0])
    expected = nd_reference(s.tolist(), t.tolist(), centres.tolist(), labels.tolist())
    assert nd_loss(s, t, centres, labels).item() == pytest.approx(expected, rel=1e-12)


def test_nd_identities():
    centres, labels = rand(3, 4, seed=4), torch.tensor([0, 1, 2, 1])
    unit = centres / centres.norm(dim=1, keepdim=True)
    t = rand(4, 4, seed=5)
    t_norm = t.norm(dim=1, keepdim=True)
    # along the class direction with at least the teacher's norm: zero
    assert nd_loss(unit[labels] * t_norm * 1.5, t, centres, labels).item() == pytest.approx(0, abs=1e-14)
    assert nd_loss(unit[labels] * t_norm, t, centres, labels).item() == pytest.approx(0, abs=1e-14)
    # along the direction but shorter: 1 - c/|t| on average
    c = torch.tensor([[0.2], [0.5], [0.7], [0.9]], dtype=torch.float64) * t_norm
    expected = (1 - c.squeeze(1) / t_norm.squeeze(1)).mean().item()
    assert nd_loss(unit[labels] * c, t, centres, labels).item() == pytest.approx(expected, rel=1e-12)
    # the centres' scale does not matter; the opposite direction gives 2
    s = rand(4, 4, seed=6)
    assert nd_loss(s, t, 7 * centres, labels).item() == pytest.approx(
        nd_loss(s, t, centres, labels).item(), rel=1e-12
    )
    assert nd_loss(-unit[labels] * t_norm * 2, t, centres, labels).item() == pytest.approx(2.0, rel=1e-12)
    # with |s| > |t| it is 1 - cos: scale-invariant in s, so the gradient is orthogonal to s
    big = (10 * s).requires_grad_()
    nd_loss(big, t, centres, labels).backward()
    assert (big.grad * big).sum(1).abs().max().item() < 1e-12


def tiny_stats(teacher, tmp_path, n=40, hide_every=4):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10
    mask = torch.ones(n, dtype=torch.bool)
    if hide_every:
        mask[::hide_every] = False
    stats = TeacherStatistics(
        teacher, BatchDataset(TensorDataset(x, y), mask), 10, torch.device("cpu"), tmp_path, {"t": 1}
    )
    return stats, x, y, mask


def test_nd_prepare_stores_the_teacher_class_means(tmp_path):
    student, teacher = cnn((4, 8)), cnn((8, 64), seed=1).eval()
    method = METHODS.build({"name": "nd"}, student=student, teacher=teacher, input_shape=(1, 8, 8))
    term = method.terms[2]
    assert term.projector is not None and term.projector[2].out_features == 64
    stats, x, y, mask = tiny_stats(teacher, tmp_path)
    method.prepare(stats)
    tap = FeatureTap(teacher, ["feature"])
    with torch.no_grad():
        out = tap(x)
    classes = torch.where(mask, y, out["logits"].argmax(1))
    for c in range(10):
        rows = [out["feature"][i] for i in range(len(x)) if classes[i] == c]
        expected = sum(rows) / len(rows)
        torch.testing.assert_close(term.class_centres[c], expected, rtol=1e-5, atol=1e-6)
    state = method.state_dict()
    assert "terms.2.class_centres" in state  # checkpoints carry the centres
    again = METHODS.build({"name": "nd"}, student=cnn((4, 8)), teacher=teacher, input_shape=(1, 8, 8))
    again.load_state_dict(state)
    assert torch.equal(again.terms[2].class_centres, term.class_centres) and again.terms[2]._ready


def test_nd_without_projector_when_dims_match_and_clear_errors(tmp_path):
    teacher = cnn((8, 64), seed=1).eval()
    same = METHODS.build({"name": "nd"}, student=cnn((4, 64)), teacher=teacher, input_shape=(1, 8, 8))
    assert same.terms[2].projector is None
    batch = {"input": torch.randn(4, 1, 8, 8), "target": torch.arange(4), "all_labelled": True}
    with pytest.raises(ConfigError, match="prepare"):
        same.training_step(batch, StepContext())
    with pytest.raises(ConfigError, match="input_shape"):
        METHODS.build({"name": "nd"}, student=cnn((4, 8)), teacher=teacher)
    with pytest.raises(ConfigError, match="dropout"):
        METHODS.build(
            {"name": "nd", "dropout": 1.0}, student=cnn((4, 8)), teacher=teacher, input_shape=(1, 8, 8)
        )
    wide_teacher = cnn((8, 64), seed=1, classes=12).eval()
    stats, *_ = tiny_stats(wide_teacher, tmp_path, n=10, hide_every=None)  # images of classes 0..9 only
    stats.num_classes = 12  # classes 10 and 11 have no images: zero centres, the loss stays finite
    wide = METHODS.build(
        {"name": "nd"}, student=cnn((4, 64), classes=12), teacher=wide_teacher, input_shape=(1, 8, 8)
    )
    wide.prepare(stats)
    assert torch.equal(wide.terms[2].class_centres[10:], torch.zeros(2, 64))
    assert wide.terms[2].class_centres[:10].abs().sum(1).min() > 0
    out = wide.training_step({**batch, "target": torch.tensor([0, 10, 11, 3])}, StepContext())
    assert torch.isfinite(out["loss"])


# -- configs ---------------------------------------------------------------------------------------------
def build_from(spec, tmp_path):
    name, kwargs = split_spec(spec, "method")
    student, teacher = cnn((4, 8)), cnn((8, 64), seed=1).eval()
    method = METHODS.build(
        {"name": name, **kwargs},
        student=student,
        teacher=teacher,
        num_classes=10,
        input_shape=(1, 8, 8),
        num_samples=40,
    )
    method.prepare(tiny_stats(teacher, tmp_path)[0])
    return method


@pytest.mark.parametrize("config_name", CONFIGS)
def test_every_config_composes_and_trains_one_step(compose, tmp_path, config_name):
    cfg = config_lib.apply_recipe(compose([f"method={config_name}"]))
    method = build_from(cfg.method, tmp_path)
    x = torch.randn(20, 1, 8, 8)
    target = torch.arange(20) % 10
    target[::4] = -1
    batch = {"input": x, "target": target, "index": torch.arange(20), "all_labelled": False}
    method.train()
    out = method.training_step(batch, StepContext(step=0, epoch=3, steps_per_epoch=2, total_steps=4))
    assert torch.isfinite(out["loss"])
    assert {"ce", *method.keys} <= set(out)
    out["loss"].backward()
    extra = [p for term in method.terms for p in term.parameters()]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in extra)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())


@pytest.mark.parametrize("config_name", CONFIGS)
def test_every_per_recipe_entry_builds_and_names_a_known_recipe(compose, tmp_path, config_name):
    raw = OmegaConf.load(config_dir() / "method" / f"{config_name}.yaml")
    recipes = {OmegaConf.load(p).get("recipe") for p in (config_dir() / "experiment").rglob("*.yaml")} | {
        "digits"
    }
    base = compose([f"method={config_name}"])
    for recipe in raw.per_recipe:
        assert recipe in recipes, f"{config_name}: per_recipe key {recipe} is no experiment's recipe"
        cfg = base.copy()
        OmegaConf.update(cfg, "recipe", recipe, force_add=True)
        method_cfg = config_lib.apply_recipe(cfg).method
        if "losses" in raw:  # compositions restate the same terms per recipe, only values change
            assert [t.name for t in method_cfg.losses] == [t.name for t in raw.losses]
        build_from(method_cfg, tmp_path)
