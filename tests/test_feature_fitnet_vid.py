"""FitNet (hint term, method, the `hint` stage) and VID: float64 losses against independent computations,
regressors sized from the probe, the hint stage training only the guided path, and tiny pipeline runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gendd_framework.components  # noqa: F401  (registrations)
import gendd_framework.stages.hint  # noqa: F401  (the `hint` stage)
from gendd_framework.context import StepContext
from gendd_framework.data.base import BatchDataset
from gendd_framework.engine.checkpoint import seed_everything
from gendd_framework.engine.trainer import evaluate
from gendd_framework.errors import ConfigError
from gendd_framework.losses.fitnet import hint_mse
from gendd_framework.losses.vid import inverse_softplus, vid_nll, vid_variance
from gendd_framework.methods.feature.fitnet import FitNetHint, cut_at, hint_layer
from gendd_framework.methods.feature.vid import VIDLoss
from gendd_framework.models import build_model
from gendd_framework.pipeline import run
from gendd_framework.registry import METHODS, OPTIMIZERS
from gendd_framework.runtime import build_data
from gendd_framework.stages.hint import fitnet_term_settings

CTX = StepContext()
TINY = ["trainer.epochs=1", "hint.epochs=1", "data.train_fraction=0.3"]


def cnn(channels, seed=0):
    torch.manual_seed(seed)
    return build_model({"name": "small_cnn", "channels": channels}, num_classes=10)


def build(name, student, teacher, **kwargs):
    return METHODS.build(
        {"name": name, **kwargs}, student=student, teacher=teacher, num_classes=10, input_shape=(1, 8, 8)
    )


# -- VID maths -----------------------------------------------------------------------------------------
def test_vid_nll_matches_an_explicit_loop_and_torch_gaussian_nll():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 2, 5, generator=g, dtype=torch.float64)
    target = torch.randn(3, 4, 2, 5, generator=g, dtype=torch.float64)
    var = torch.rand(4, generator=g, dtype=torch.float64) * 3 + 0.1
    m, t, v = mean.numpy(), target.numpy(), var.numpy()
    total = 0.0
    for b in range(3):
        for c in range(4):
            for h in range(2):
                for w in range(5):
                    total += 0.5 * ((t[b, c, h, w] - m[b, c, h, w]) ** 2 / v[c] + math.log(v[c]))
    got = vid_nll(mean, target, var)
    assert got.item() == pytest.approx(total / mean.numel(), rel=1e-12)
    full = var.view(1, -1, 1, 1).expand_as(mean)  # a different route: torch's Gaussian NLL, no constant
    assert got.item() == pytest.approx(F.gaussian_nll_loss(mean, target, full, full=False).item(), rel=1e-12)


def test_vid_nll_identities():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    var = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    # a perfect mean leaves only ½·log σ², averaged over the channels
    assert vid_nll(target, target, var).item() == pytest.approx(
        0.5 * np.log([0.5, 1.0, 4.0]).mean(), rel=1e-12
    )
    # the optimal variance of a channel is its mean squared residual: the gradient in σ² vanishes there
    mean = torch.zeros_like(target)
    best = target.pow(2).mean(dim=(0, 2, 3)).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(vid_nll(mean, target, best), best)
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-14)
    # vectors (B, C) work as 1x1 maps
    flat = vid_nll(target[:, :, 0, 0], torch.zeros(6, 3, dtype=torch.float64), var)
    assert flat.item() == pytest.approx(vid_nll(target[:, :, :1, :1], mean[:, :, :1, :1], var).item())


def test_softplus_parameterisation_starts_at_the_initial_variance():
    for value in (1e-3, 0.5, 5.0 - 1e-5, 40.0, 80.0):
        alpha = inverse_softplus(value)
        assert F.softplus(torch.tensor(alpha, dtype=torch.float64)).item() == pytest.approx(value, rel=1e-12)
        assert math.log(math.exp(value) - 1.0) == pytest.approx(alpha, rel=1e-9, abs=1e-12)
    log_scale = torch.full((3,), inverse_softplus(5.0 - 1e-5), dtype=torch.float64)
    assert torch.allclose(vid_variance(log_scale, 1e-5), torch.full((3,), 5.0, dtype=torch.float64))
    with pytest.raises(ConfigError, match="positive"):
        inverse_softplus(0.0)


def test_vid_shape_errors_are_config_errors():
    with pytest.raises(ConfigError, match="differ"):
        vid_nll(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2), torch.ones(3))
    with pytest.raises(ConfigError, match="one entry per channel"):
        vid_nll(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.ones(4))


# -- VID term -----------------------------------------------------------------------------------------
def test_vid_sizes_regressors_from_the_probe_and_pools_the_larger_map():
    student, teacher = cnn([4, 8, 16]), cnn([8, 64], seed=1)  # (8,4,4),(16,2,2) vs (8,8,8),(64,4,4)
    method = build("vid", student, teacher)
    term = method.terms[1]
    assert term.student_taps == ("features.6", "features.10") and term.teacher_taps == (
        "features.2",
        "features.6",
    )
    shapes = [
        [tuple(c.weight.shape[:2]) for c in r.mean if isinstance(c, nn.Conv2d)] for r in term.regressors
    ]
    assert shapes == [[(8, 8), (8, 8), (8, 8)], [(64, 16), (64, 64), (64, 64)]]  # mid = teacher channels
    assert all(torch.allclose(vid_variance(r.log_scale, 1e-5), torch.tensor(5.0)) for r in term.regressors)
    narrow = build("vid", student, teacher, mid_channels=3).terms[1]
    assert [r.mean[0].out_channels for r in narrow.regressors] == [3, 3]


def test_vid_term_value_matches_an_independent_float64_computation():
    term = VIDLoss(student_layers=["a"], teacher_layers=["b"], init_pred_var=2.0)
    term.student_taps, term.teacher_taps = ("a",), ("b",)
    term.setup({"student": {"a": (3, 4, 4)}, "teacher": {"b": (5, 2, 2)}})
    term.double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for conv in term.regressors[0].mean:
            if isinstance(conv, nn.Conv2d):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        term.regressors[0].log_scale.copy_(torch.randn(5, generator=g, dtype=torch.float64))
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 2, 2, generator=g, dtype=torch.float64)
    got = term({"a": s}, {"b": t}, {}, CTX)
    # numpy: 2x2 block means, the three 1x1 convs as channel matmuls, softplus by log1p(exp)
    pooled = s.numpy().reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))
    w = [c.weight.detach().numpy()[:, :, 0, 0] for c in term.regressors[0].mean if isinstance(c, nn.Conv2d)]
    h = np.maximum(np.einsum("oc,bchw->bohw", w[0], pooled), 0)
    h = np.maximum(np.einsum("oc,bchw->bohw", w[1], h), 0)
    mu = np.einsum("oc,bchw->bohw", w[2], h)
    var = np.log1p(np.exp(term.regressors[0].log_scale.detach().numpy())) + 1e-5
    expect = np.mean(
        0.5 * ((t.numpy() - mu) ** 2 / var[None, :, None, None] + np.log(var)[None, :, None, None])
    )
    assert got["loss"].item() == pytest.approx(float(expect), rel=1e-12)
    assert got["layer0"].item() == pytest.approx(float(expect), rel=1e-12)


def test_vid_bad_layer_settings_fail_clearly():
    student, teacher = cnn([4, 8, 16]), cnn([8, 64], seed=1)
    with pytest.raises(ConfigError, match="one to one"):
        build("vid", student, teacher, student_layers=[0, 1, 2], teacher_layers=[0, 1])
    with pytest.raises(ConfigError, match="mid_channels"):
        build("vid", student, teacher, mid_channels=0)
    with pytest.raises(ConfigError, match="init_pred_var > eps"):
        build("vid", student, teacher, init_pred_var=0.0)
    with pytest.raises(ConfigError, match="student_layers"):
        build("vid", build_model({"name": "mlp"}, num_classes=10), teacher)


# -- FitNet term --------------------------------------------------------------------------------------
def test_hint_mse_matches_a_loop_and_is_zero_on_equal_maps():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    b = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    expect = sum((x - y) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()
    assert hint_mse(a, b).item() == pytest.approx(expect, rel=1e-12)
    assert hint_mse(a, a).item() == 0.0
    with pytest.raises(ConfigError, match="differ"):
        hint_mse(a, b[:, :2])


def test_fitnet_term_regresses_then_takes_the_mean_squared_error():
    term = FitNetHint()
    term.student_taps, term.teacher_taps = ("s",), ("t",)
    term.setup({"student": {"s": (3, 4, 4)}, "teacher": {"t": (5, 2, 2)}})
    term.double().eval()  # BN from running statistics: r is a fixed function
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 2, 2, generator=g, dtype=torch.float64)
    conv = term.regressor.conv
    z = F.conv2d(s, conv.weight, conv.bias, stride=2, padding=1) / math.sqrt(1 + term.regressor.bn.eps)
    expect = ((z.clamp_min(0) - t) ** 2).mean()
    assert term({"s": s}, {"t": t}, {}, CTX).item() == pytest.approx(expect.item(), rel=1e-12)
    same = FitNetHint(regressor="none")
    same.student_taps, same.teacher_taps = ("s",), ("t",)
    same.setup({"student": {"s": (5, 2, 2)}, "teacher": {"t": (5, 2, 2)}})
    assert same({"s": t}, {"t": t}, {}, CTX).item() == 0.0


@pytest.mark.parametrize(
    ("s_layer", "t_layer", "conv"),
    [(0, 1, nn.Conv2d), (1, 0, nn.ConvTranspose2d), (0, 2, nn.Conv2d), (1, 1, nn.Conv2d)],
)
def test_fitnet_regressor_is_sized_from_the_probe_across_resolutions(s_layer, t_layer, conv):
    student, teacher = cnn([4, 8]), cnn([6, 16, 32], seed=1)  # (4,8,8),(8,4,4) vs (6,8,8),(16,4,4),(32,2,2)
    method = build("fitnet", student, teacher, student_layers=s_layer, teacher_layers=t_layer)
    term = method.terms[1]
    assert isinstance(term.regressor.conv, conv)
    shapes = method.tap_shapes()
    (s_tap,), (t_tap,) = term.student_taps, term.teacher_taps
    out = term.regressor.eval()(torch.zeros(2, *shapes["student"][s_tap]))
    assert tuple(out.shape[1:]) == shapes["teacher"][t_tap]


def test_fitnet_auto_hint_layer_is_the_second_default_stage():
    shape = (3, 32, 32)
    assert hint_layer(build_model({"name": "resnet8x4"}, num_classes=100), "auto", shape, "k") == "layers.1"
    assert hint_layer(build_model({"name": "vgg8"}, num_classes=100), "auto", shape, "k") == "features.4"
    assert hint_layer(cnn([4, 8, 16]), "auto", (1, 8, 8), "k") == "features.6"
    assert hint_layer(cnn([4]), "auto", (1, 8, 8), "k") == "features.2"  # a single stage


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"student_layers": 5}, "`student_layers` index 5 is out of range"),
        ({"teacher_layers": [0, 1]}, "one layer per side"),
        ({"student_layers": "feature"}, "feature map"),
        ({"student_layers": "features.99"}, "not found"),
        ({"student_layers": 1, "teacher_layers": 0, "regressor": "none"}, "regressor: none needs equal"),
        ({"regressor": "mlp"}, "regressor must be one of"),
    ],
)
def test_fitnet_unusable_layers_fail_with_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        build("fitnet", cnn([4, 8]), cnn([8, 64], seed=1), **kwargs)


def test_fitnet_refuses_a_student_map_smaller_than_a_doubled_one():
    student, teacher = cnn([4, 8, 16]), cnn([8], seed=1)  # student 2x2 map vs teacher 8x8
    with pytest.raises(ConfigError, match=r"`student_layers` features.10 gives \(16, 2, 2\)"):
        build("fitnet", student, teacher, student_layers=2)


# -- the hint method: only the guided path trains --------------------------------------------------------
def tiny_batches(n=40, hide=True):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10
    if hide:
        y[::4] = -1  # a transfer set: some labels hidden from the student
    return DataLoader(BatchDataset(TensorDataset(x, y)), batch_size=20)


def test_hint_method_trains_the_guided_path_and_regressor_only():
    student, teacher = cnn([4, 8, 16]), cnn([8, 64], seed=1)  # guided features.6 (8,4,4) -> (64,4,4)
    method = build("fitnet_hint", student, teacher)
    assert method.guided == "features.6" and method.hint == "features.6"
    path = {f"features.{i}.{p}" for i in (0, 1, 4, 5) for p in ("weight", "bias")} - {
        "features.0.bias",
        "features.4.bias",
    }
    assert set(method.hint_parameter_names) == path
    regressor = {id(p) for p in method.term.parameters()}
    grouped = [p for g in method.param_groups(0.1) for p in g["params"]]
    assert {id(p) for p in grouped} == {id(dict(student.named_parameters())[n]) for n in path} | regressor
    state = {k: v.clone() for k, v in student.state_dict().items()}
    reg_before = [p.detach().clone() for p in method.term.parameters()]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5, weight_decay=0.1)  # decay on every param
    optimizer.add_param_group({"params": list(method.term.parameters())})
    method.train()
    for step, batch in enumerate(tiny_batches()):
        out = method.training_step(batch, StepContext(step=step))
        assert set(out) == {"loss", "hint"} and torch.isfinite(out["loss"])
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
    after = student.state_dict()
    for key, value in state.items():
        later = not key.startswith(("features.0.", "features.1.", "features.4.", "features.5."))
        assert torch.equal(after[key], value) == later, key  # BN buffers after the guided layer too
    assert all(not torch.equal(a, b) for a, b in zip(reg_before, method.term.parameters()))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in student.modules())  # no leftovers
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_hint_method_trains_two_steps_with_the_framework_optimizer_and_evaluates():
    student, teacher = cnn([4, 8]), cnn([8, 64], seed=1)
    method = build("fitnet_hint", student, teacher)
    optimizer = OPTIMIZERS.build({"name": "adamw", "lr": 1e-2}, params=method.param_groups(1e-4))
    fc_before = student.fc.weight.detach().clone()
    first = student.features[0].weight.detach().clone()
    method.train()
    for step, batch in enumerate(tiny_batches()):
        loss = method.training_step(batch, StepContext(step=step))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(student.fc.weight, fc_before) and not torch.equal(student.features[0].weight, first)
    metrics = evaluate(method, tiny_batches(hide=False), torch.device("cpu"), teacher=teacher)
    assert {"acc/student", "agree/student"} <= set(metrics)


def test_hint_method_refuses_a_guided_layer_without_trainable_parameters():
    student = cnn([4, 8])
    for p in student.features[:6].parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="depends on no trainable student parameter"):
        build("fitnet_hint", student, cnn([8, 64], seed=1))
    with pytest.raises(ConfigError, match="input_shape"):
        METHODS.build({"name": "fitnet_hint"}, student=cnn([4, 8]), teacher=cnn([8, 64]))


def test_cut_at_runs_eager_and_compiled_models_only_up_to_the_layer():
    model = cnn([4, 8, 16])
    x = torch.randn(3, 1, 8, 8)
    expect = model.eval().features[:7](x)  # conv-BN-ReLU, pool, conv-BN-ReLU: the second stage's map
    assert torch.equal(cut_at(model, "features.6")(x), expect)
    assert torch.equal(cut_at(model, "features.7:input")(x), expect)
    called = []
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda _m, _i, name=name: called.append(name))
    cut_at(model, "features.7:input")(x)
    assert "features.6" in called and not {"features.7", "features.8", "fc"} & set(called)
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    cut_at(model, "features.6")(x)  # train mode: only the BN layers before the cut update statistics
    moved = {k for k, v in stats.items() if not torch.equal(model.state_dict()[k], v)}
    assert moved == {f"features.{i}.running_{s}" for i in (1, 5) for s in ("mean", "var")}
    model.eval().compile(backend="aot_eager")  # trainer.speed.compile: cut from the Python forward
    assert torch.allclose(cut_at(model, "features.6")(x), model.features[:7](x))
    with pytest.raises(ConfigError, match="not found"):
        cut_at(model, "features.60")


CUT_FAMILIES = [
    ({"name": "resnet8"}, (3, 32, 32)),
    ({"name": "wrn_16_1"}, (3, 32, 32)),
    ({"name": "vgg8"}, (3, 32, 32)),
    ({"name": "vgg8"}, (3, 64, 64)),  # the pool the official forward applies at 64 pixels only
    ({"name": "mobilenetv2_cifar"}, (3, 32, 32)),
    ({"name": "shufflev1"}, (3, 32, 32)),
    ({"name": "shufflev2"}, (3, 32, 32)),
    ({"name": "tv:resnet18"}, (3, 32, 32)),
    ({"name": "timm:vit_tiny_patch16_224", "img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 32,
      "depth": 6, "num_heads": 4}, (1, 8, 8)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "shape"), CUT_FAMILIES, ids=lambda v: v.get("name") if isinstance(v, dict) else ""
)
def test_cut_at_equals_a_hooked_full_forward_on_every_family(spec, shape):
    """The auto hint layer's map (output and input) of each family: the cut graph vs a forward hook."""
    torch.manual_seed(0)
    model = build_model(spec, num_classes=10).eval()
    x = torch.randn(2, *shape)
    tap = hint_layer(model, "auto", shape, "student_layers")
    module = dict(model.named_modules())[tap]
    seen = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args: seen.setdefault("input", args[0].clone())),
        module.register_forward_hook(lambda _m, _a, out: seen.setdefault("output", out.clone())),
    ]
    with torch.no_grad():
        model(x)
        for hook in hooks:
            hook.remove()
        assert torch.equal(cut_at(model, tap)(x), seen["output"])
        assert torch.equal(cut_at(model, f"{tap}:input")(x), seen["input"])


def test_cut_at_refuses_a_forward_torch_fx_cannot_trace():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 10)

        def forward(self, x):
            x = self.conv(x)
            if x.sum() > 0:  # data-dependent control flow
                x = x.relu()
            return self.fc(x.mean((2, 3)))

    with pytest.raises(ConfigError, match=r"Branchy at 'conv' with torch.fx.*method=fitnet") as info:
        cut_at(Branchy(), "conv")
    assert "\n" not in str(info.value)


def test_hint_stage_reads_the_methods_fitnet_term():
    fit = {
        "name": "fitnet",
        "student_layers": 2,
        "teacher_layers": "layer2",
        "regressor": "none",
        "ce_weight": 1,
    }
    assert fitnet_term_settings(fit) == {"student_layers": 2, "teacher_layers": "layer2", "regressor": "none"}
    losses = [{"name": "ce"}, {"name": "fitnet", "weight": 50, "student_layers": 0}]
    assert fitnet_term_settings({"name": "distill", "losses": losses}) == {"student_layers": 0}
    assert fitnet_term_settings({"name": "kd", "temperature": 4}) == {}
    with pytest.raises(ConfigError, match="hint.student_layers"):
        fitnet_term_settings({"name": "distill", "losses": [losses[1], {**losses[1], "key": "b"}]})


# -- pipeline: preflight, the stage's handover, the two-stage protocol end to end -------------------------
def fresh_cache(monkeypatch, tmp_path):
    cache = tmp_path / "fresh_cache"
    monkeypatch.setenv("GENDD_CACHE_DIR", str(cache))
    return cache


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["experiment=digits/transfer_cnn", "method=fitnet", "stages=[teacher,hint,distill]"],
            "'hint'.*(needs|missing)",
        ),
        (["experiment=digits/fitnet_stagewise", "+hint.student_layers=7"], "index 7 is out of range"),
        (["experiment=digits/fitnet_stagewise", "method=fitnet", "method.teacher_layers=[0,1]"], "one layer"),
        (["experiment=digits/fitnet_stagewise", "stages=[hint,teacher,distill]"], "`teacher` stage before"),
        (["experiment=digits/fitnet_stagewise", "hint.optim.name=adamm"], "adamm"),
        (["experiment=digits/fitnet_stagewise", "hint.epochs=0"], "hint.epochs"),
    ],
)
def test_preflight_rejects_a_bad_hint_stage_before_any_training(
    compose, monkeypatch, tmp_path, overrides, message
):
    cache = fresh_cache(monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as info:
        run(compose([*overrides, "trainer.epochs=1"]), tmp_path / "run")
    assert "\n" not in str(info.value)
    assert not cache.exists(), "the teacher stage ran before the error"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_hint_stage_hands_over_a_student_changed_only_up_to_its_guided_layer(compose, tmp_path):
    cfg = compose(["experiment=digits/fitnet_stagewise", "stages=[teacher,hint]", *TINY])
    summary = run(cfg, tmp_path)
    record = summary["hint"]
    assert record["guided_layer"] == "features.6" and record["hint_layer"] == "features.6"
    assert record["handover"] == "last" and (tmp_path / "checkpoints" / "hint_last.pt").exists()
    handed = torch.load(tmp_path / "student.pt", weights_only=True)
    last = torch.load(tmp_path / "checkpoints" / "hint_last.pt", weights_only=True)["method"]
    assert all(torch.equal(v, last[f"student.model.{k}"]) for k, v in handed.items())
    seed_everything(int(cfg.seed))  # the stage built its student right after this
    fresh = build_model(cfg.student, num_classes=10).state_dict()
    for key, value in fresh.items():
        later = not key.startswith(("features.0.", "features.1.", "features.4.", "features.5."))
        assert torch.equal(handed[key], value) == later, key
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "hint" and "train/hint" in r for r in rows)


def exported_student_metrics(cfg, run_dir) -> tuple[float, float]:
    """Test accuracy (%) and mean CE of the run's `student.pt`, by a plain loop over the test split
    (not the trainer's evaluation: no metric accumulator, no checkpoint selection)."""
    splits, _ = build_data(cfg.data)
    model = build_model(cfg.student, num_classes=splits.num_classes)
    model.load_state_dict(torch.load(run_dir / "student.pt", weights_only=True))
    model.eval()
    batches = DataLoader(BatchDataset(splits.test), batch_size=1000)
    with torch.no_grad():
        logits, target = map(torch.cat, zip(*((model(b["input"]), b["target"]) for b in batches)))
    return 100.0 * (logits.argmax(1) == target).double().mean().item(), F.cross_entropy(logits, target).item()


def epoch_rows(run_dir, stage):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("stage") == stage and "train/loss" in r]


def test_two_stage_fitnet_runs_end_to_end(compose, tmp_path):
    """Hints, then CE + hint term (the preset's KD stage 2 is a plain distill stage after the hint one):
    each stage's logged loss is its terms at the configured weights, and the reported test numbers are
    those of the exported student."""
    cfg = compose(["experiment=digits/fitnet_stagewise", "method=fitnet", *TINY])
    summary = run(cfg, tmp_path)
    assert [k for k in summary if k in ("teacher", "hint", "distill")] == ["teacher", "hint", "distill"]
    for name in ("hint_last.pt", "distill_last.pt"):
        assert (tmp_path / "checkpoints" / name).exists()
    (hint,) = epoch_rows(tmp_path, "hint")
    assert hint["train/loss"] == pytest.approx(hint["train/hint"], rel=1e-6) and hint["train/hint"] > 0
    (distill,) = epoch_rows(tmp_path, "distill")
    weights = (cfg.method.ce_weight, cfg.method.feature_weight)  # 1 and 100 (conf/method/fitnet.yaml)
    expected = weights[0] * distill["train/ce"] + weights[1] * distill["train/fitnet"]
    assert distill["train/loss"] == pytest.approx(expected, rel=1e-5)
    acc, ce = exported_student_metrics(cfg, tmp_path)
    assert summary["distill"]["test"]["acc/student"] == pytest.approx(acc, abs=1e-9)
    assert summary["distill"]["test"]["ce/student"] == pytest.approx(ce, rel=1e-5)


def test_vid_runs_end_to_end_on_the_digits_cnn_pair(compose, tmp_path):
    """VID on the CNN pair: the logged loss is CE + w·Σ per-pair terms at the configured weights, every
    default stage pair is logged, and the reported test numbers are those of the exported student."""
    cfg = compose(["experiment=digits/transfer_cnn", "method=vid", *TINY[:1], *TINY[2:]])
    summary = run(cfg, tmp_path)
    (train,) = epoch_rows(tmp_path, "distill")
    pairs = [train[f"train/vid/layer{i}"] for i in range(3)]
    assert train["train/vid"] == pytest.approx(sum(pairs), rel=1e-5)
    expected = cfg.method.ce_weight * train["train/ce"] + cfg.method.feature_weight * train["train/vid"]
    assert train["train/loss"] == pytest.approx(expected, rel=1e-5)
    acc, ce = exported_student_metrics(cfg, tmp_path)
    assert summary["distill"]["test"]["acc/student"] == pytest.approx(acc, abs=1e-9)
    assert summary["distill"]["test"]["ce/student"] == pytest.approx(ce, rel=1e-5)
