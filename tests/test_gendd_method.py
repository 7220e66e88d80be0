"""The GenDD method (training step, contraction, sampling predict, parameter groups, beta2 ramp) and
the digits pipeline end to end. Small MLP teacher/student on 1x8x8 inputs; everything runs on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import gendd_framework.components  # noqa: F401  (registers every built-in component)
from gendd_framework.context import StepContext, as_batch
from gendd_framework.engine.optim import adamw, beta2_cosine_ramp
from gendd_framework.errors import ConfigError
from gendd_framework.models import build_model
from gendd_framework.registry import METHODS

NUM_CLASSES, BATCH = 10, 8
HEAD = {"name": "mlp_adaln", "width": 32, "depth": 1}
OBJECTIVE = {"name": "gaussian_diffusion", "num_timesteps": 50}
SAMPLER = {"name": "ddim", "steps": 5}
TINY = [
    "trainer.epochs=1",
    "method.head.width=32",
    "method.head.depth=1",
    "method.diffusion_batch_mul=2",
    "method.sampler.steps=5",
    "data.train_fraction=0.3",
]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core box: one thread is faster than two for these tiny ops
    yield
    torch.set_num_threads(previous)


def make_method(teacher_hidden=(128,), **kwargs):
    torch.manual_seed(0)
    teacher = build_model({"name": "mlp", "hidden": list(teacher_hidden)}, num_classes=NUM_CLASSES)
    student = build_model({"name": "mlp", "hidden": [16]}, num_classes=NUM_CLASSES)
    spec = {"name": "gendd", "head": HEAD, "objective": OBJECTIVE, "sampler": SAMPLER, **kwargs}
    return METHODS.build(spec, student=student, teacher=teacher, num_classes=NUM_CLASSES)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 1, 8, 8, generator=g), torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)


def perturb_head(method, std=0.1):
    """Give the zero-initialised adaLN and output layers random weights (a zero head has zero gradient
    upstream and ignores its condition)."""
    g = torch.Generator().manual_seed(123)
    head = method.head
    layers = [b.modulation[-1] for b in head.blocks] + [head.final.modulation[-1], head.final.linear]
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.copy_(std * torch.randn(p.shape, generator=g))


def backbone_params(method):
    fc = {id(p) for p in method.student.classifier.parameters()}
    return [p for p in method.student.model.parameters() if id(p) not in fc]


def capture_targets(method, monkeypatch):
    """Record the x0 handed to the diffusion objective by every training_step."""
    seen = []
    original = method.objective.training_losses

    def spy(model_fn, x0, *args, **kwargs):
        seen.append(x0.detach().clone())
        return original(model_fn, x0, *args, **kwargs)

    monkeypatch.setattr(method.objective, "training_losses", spy)
    return seen


# -- construction ---------------------------------------------------------------------------------
def test_token_dim_not_dividing_teacher_feature_is_a_config_error_naming_both():
    with pytest.raises(ConfigError) as info:
        make_method(teacher_hidden=(100,), tokenizer={"name": "split", "token_dim": 64})
    assert "100" in str(info.value) and "64" in str(info.value)


def test_teacher_is_frozen_in_eval_mode_and_class_weight_is_a_separate_copy():
    method = make_method()
    method.train()
    assert not method.teacher.training
    assert all(not m.training for m in method.teacher.modules())
    assert all(not p.requires_grad for p in method.teacher.parameters())
    assert method.student.training and method.head.training

    w = method.teacher.classifier.weight
    assert torch.equal(method.class_weight, w)
    assert method.class_weight.data_ptr() != w.data_ptr()
    assert torch.equal(method.class_bias, method.teacher.classifier.bias)
    before = method.class_weight.clone()
    with torch.no_grad():
        w.add_(1.0)  # changing the teacher head leaves the buffer alone
    assert torch.equal(method.class_weight, before)


def test_unsupervised_with_positive_lambda_is_a_config_error():
    with pytest.raises(ConfigError, match="lam"):
        make_method(use_labels=False, lam=0.5)


# -- training step --------------------------------------------------------------------------------
def test_training_step_loss_is_diffusion_plus_weighted_ce():
    method = make_method(ce_weight=0.5)
    method.train()
    out = method.training_step(as_batch(batch()), StepContext())
    assert {"loss", "diffusion", "ce", "mse", "vb"} <= set(out)
    assert all(torch.isfinite(v).all() for v in out.values())
    torch.testing.assert_close(out["loss"], out["diffusion"] + 0.5 * out["ce"])


def test_ce_does_not_reach_the_backbone_but_the_diffusion_loss_does():
    method = make_method(cond_drop_prob=0.0)
    perturb_head(method)
    method.train()
    out = method.training_step(as_batch(batch()), StepContext())
    params = backbone_params(method)
    grads = torch.autograd.grad(out["ce"], params, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    fc_grads = torch.autograd.grad(out["ce"], list(method.student.classifier.parameters()), retain_graph=True)
    assert any(g.abs().sum() > 0 for g in fc_grads)  # the CE head itself does learn
    grads = torch.autograd.grad(out["diffusion"], params, allow_unused=True)
    weight_grads = [g for p, g in zip(params, grads, strict=True) if p.ndim == 2]
    assert weight_grads and all(g is not None and g.abs().sum() > 0 for g in weight_grads)


def test_zero_initialised_head_gives_the_backbone_no_gradient():
    """Why the test above perturbs the head: at init the denoiser outputs 0 whatever its condition."""
    method = make_method(cond_drop_prob=0.0)
    method.train()
    out = method.training_step(as_batch(batch()), StepContext())
    grads = torch.autograd.grad(out["diffusion"], backbone_params(method), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_full_contraction_target_is_the_class_weight_row_replicated_m_times(monkeypatch):
    method = make_method(lam=1.0, mixup_beta=0.0, diffusion_batch_mul=3)
    seen = capture_targets(method, monkeypatch)
    method.train()
    x, y = batch()
    method.training_step({"input": x, "target": y}, StepContext())
    (x0,) = seen
    n, k = method.tokenizer.num_tokens, method.tokenizer.token_dim
    assert (n, k) == (2, 64)
    assert x0.shape == (3, BATCH, n, k)
    expected = method.teacher.classifier.weight[y].reshape(BATCH, n, k)
    for copy in x0:
        torch.testing.assert_close(copy, expected)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_partial_contraction_mixes_teacher_feature_and_class_row(monkeypatch, scale):
    """The diffusion target is target_scale * ((1-lam) f + lam W[y])."""
    method = make_method(lam=0.25, mixup_beta=0.0, diffusion_batch_mul=2, target_scale=scale)
    seen = capture_targets(method, monkeypatch)
    method.train()
    x, y = batch()
    with torch.no_grad():
        feature = method.teacher(x)["feature"]
    method.training_step({"input": x, "target": y}, StepContext())
    expected = scale * (0.75 * feature + 0.25 * method.teacher.classifier.weight[y])
    torch.testing.assert_close(seen[0][1], expected.reshape(BATCH, 2, 64))


def test_unsupervised_has_no_ce_and_targets_the_teacher_feature(monkeypatch):
    method = make_method(use_labels=False, lam=0.0, ce_weight=0.0, mixup_beta=0.0, diffusion_batch_mul=2)
    seen = capture_targets(method, monkeypatch)
    method.train()
    x, y = batch()
    with torch.no_grad():
        feature = method.teacher(x)["feature"]
    out = method.training_step({"input": x, "target": y}, StepContext())
    assert "ce" not in out
    torch.testing.assert_close(out["loss"], out["diffusion"])
    assert seen[0].shape == (2, BATCH, 2, 64)
    for copy in seen[0]:
        torch.testing.assert_close(copy, feature.reshape(BATCH, 2, 64))


def test_target_scale_divides_the_samples_back_and_must_be_positive(monkeypatch):
    method = make_method(target_scale=4.0)
    # sampling: whatever the chain returns in scaled units comes back divided by the scale
    tokens = torch.randn(1, BATCH, 2, 64)
    monkeypatch.setattr(method.sampler, "sample", lambda *args, **kwargs: tokens)
    z = torch.zeros(BATCH, method.student.feature_dim)
    torch.testing.assert_close(method.sample_features(z), tokens.reshape(1, BATCH, 128) / 4.0)
    with pytest.raises(ConfigError, match="target_scale must be a number > 0 or 'auto'"):
        make_method(target_scale=0.0)


def test_auto_target_scale_is_one_over_rms_of_the_first_batch_and_is_saved(monkeypatch):
    method = make_method(lam=0.5, mixup_beta=0.0, diffusion_batch_mul=1, target_scale="auto")
    perturb_head(method)
    z = torch.zeros(BATCH, method.student.feature_dim)
    with pytest.raises(ConfigError, match="measured on the first training batch"):
        method.sample_features(z)
    seen = capture_targets(method, monkeypatch)
    method.train()
    x, y = batch()
    with torch.no_grad():
        x0 = 0.5 * method.teacher(x)["feature"] + 0.5 * method.teacher.classifier.weight[y]
    method.training_step({"input": x, "target": y}, StepContext())
    expected = x0.double().pow(2).mean().rsqrt().item()
    assert method.target_scale.item() == pytest.approx(expected, rel=1e-5)
    assert seen[0].pow(2).mean().item() == pytest.approx(1.0, rel=1e-4)  # the head sees unit RMS
    method.training_step(as_batch(batch(1)), StepContext())  # measured once, not per batch
    assert method.target_scale.item() == pytest.approx(expected, rel=1e-5)
    fresh = make_method(lam=0.5, target_scale="auto")
    fresh.load_state_dict(method.state_dict())  # evaluation/resume reuse the trained scale
    assert fresh.target_scale.item() == pytest.approx(expected, rel=1e-5)
    old = {k: v for k, v in method.state_dict().items() if k != "target_scale"}
    fresh.load_state_dict(old)  # checkpoints from before the option: unscaled targets
    assert fresh.target_scale.item() == 1.0


# -- prediction -----------------------------------------------------------------------------------
def test_predict_outputs_and_generative_logits_are_teacher_head_of_mean_sample():
    method = make_method(num_sampling=3)
    perturb_head(method)
    method.eval()
    x, _ = batch(1)
    method.on_evaluate_start()
    out = method.predict(x)
    assert set(out) == {"generative", "student"}
    assert out["generative"].shape == out["student"].shape == (BATCH, NUM_CLASSES)
    with torch.no_grad():
        h = method.student(x)["feature"]
        torch.testing.assert_close(out["student"], method.student.classifier(h))
        method.on_evaluate_start()
        samples = method.sample_features(method.norm(h))
        assert samples.shape == (3, BATCH, 128)
        expected = method.teacher.classifier(samples.mean(0))  # the teacher's own linear head
    torch.testing.assert_close(out["generative"], expected)


def test_eval_seed_makes_evaluation_repeatable_and_guidance_matters():
    method = make_method()
    perturb_head(method)
    method.eval()
    x, _ = batch(2)

    def generative(**settings):
        for key, value in settings.items():
            setattr(method, key, value)
        method.on_evaluate_start()
        return method.predict(x)["generative"]

    first = generative(eval_seed=0, guidance_scale=2.0)
    assert torch.equal(first, generative())  # same seed, re-seeded: identical
    assert not torch.allclose(first, method.predict(x)["generative"])  # no re-seed: fresh noise
    assert not torch.allclose(first, generative(eval_seed=1))
    assert not torch.allclose(generative(eval_seed=0, guidance_scale=1.0), first)


# -- optimisation ---------------------------------------------------------------------------------
def group_ids(groups):
    return {g["group"]: {id(p) for p in g["params"]} for g in groups}


@pytest.mark.parametrize("official", [False, True])
def test_param_groups_by_role(official):
    method = make_method(official_weight_decay=official)
    groups = method.param_groups(0.05)
    ids = group_ids(groups)
    wd = {g["group"]: g["weight_decay"] for g in groups}
    assert wd == {"decay": 0.05, "no_decay": 0.0}
    head = {id(p) for p in method.head.parameters()}
    assert head <= ids["no_decay"] and not head & ids["decay"]
    student_weights = {id(m.weight) for m in method.student.model.modules() if isinstance(m, nn.Linear)}
    assert student_weights <= ids["decay"]
    ln_weight = id(method.norm.weight)
    assert ln_weight in (ids["decay"] if official else ids["no_decay"])
    teacher = {id(p) for p in method.teacher.parameters()}
    assert not teacher & (ids["decay"] | ids["no_decay"])
    # every trainable parameter is in exactly one group
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert not ids["decay"] & ids["no_decay"]
    assert ids["decay"] | ids["no_decay"] == trainable


def test_beta2_cosine_ramp_endpoints_and_middle():
    total = 11  # steps 0..10, S = total - 1 = 10
    assert beta2_cosine_ramp(0, total, 0.95, 0.999) == pytest.approx(0.95)
    assert beta2_cosine_ramp(total - 1, total, 0.95, 0.999) == pytest.approx(0.999)
    # s=3: 0.999 - 0.5*0.049*(1 + cos(0.3*pi)) = 0.999 - 0.0245*1.5877852523 = 0.9600992613
    assert beta2_cosine_ramp(3, total, 0.95, 0.999) == pytest.approx(0.9600992613, abs=1e-9)
    assert beta2_cosine_ramp(5, total, 0.95, 0.999) == pytest.approx((0.95 + 0.999) / 2)


def test_adamw_before_step_sets_beta2_of_every_group():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2))
    opt = adamw(
        [{"params": [a], "weight_decay": 0.0}, {"params": [b], "weight_decay": 0.05}],
        lr=1e-3,
        betas=(0.9, 0.999),
        beta2_min=0.95,
    )
    for step in (0, 4, 9):
        opt.before_step(step, 10)
        expected = 0.999 - 0.5 * 0.049 * (1 + math.cos(math.pi * step / 9))
        assert [g["betas"] for g in opt.param_groups] == [(0.9, pytest.approx(expected))] * 2
    assert opt.param_groups[0]["betas"][1] == pytest.approx(0.999)


def test_adamw_without_beta2_min_has_no_ramp():
    opt = adamw([nn.Parameter(torch.zeros(2))], lr=1e-3)
    assert getattr(opt, "before_step", None) is None


# -- end to end on digits -------------------------------------------------------------------------
def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_pipeline_gendd_on_digits_records_both_outputs_and_eval_settings(compose, tmp_path):
    from gendd_framework.pipeline import run

    summary = run(compose(["experiment=digits/gendd", *TINY]), tmp_path)
    record = summary["distill"]
    assert {"acc/generative", "acc/student"} <= set(record["test"])
    # the recorded test numbers are exactly those of the saved best-on-val checkpoint, re-evaluated
    from gendd_framework.cli.evaluate import RunEvaluator

    again = RunEvaluator(tmp_path, device="cpu").evaluate(split="test")
    for key in ("acc/generative", "acc/student", "agree/generative", "kl/generative", "ece/student"):
        assert again[key] == pytest.approx(record["test"][key], abs=1e-9), key
    settings = record["eval_settings"]
    assert settings["steps"] == 5
    assert settings["guidance_scale"] == 2.0
    assert settings["num_sampling"] == 1
    assert settings["eval_seed"] == 0
    assert json.loads((tmp_path / "summary.json").read_text())["distill"]["eval_settings"] == settings
    assert (tmp_path / "student.pt").is_file()


def test_pipeline_gendd_with_pretrain_stage_on_digits(compose, tmp_path):
    from gendd_framework.pipeline import run

    summary = run(compose(["experiment=digits/gendd_pretrain", "pretrain.epochs=1", *TINY]), tmp_path)
    stage_keys = ["teacher", "pretrain", "distill"]
    assert [k for k in summary if k in stage_keys] == stage_keys
    assert "acc/student" in summary["pretrain"]["test"]
    assert {"acc/generative", "acc/student"} <= set(summary["distill"]["test"])
    stages = [r["stage"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "stage" in r]
    assert "pretrain" in stages and stages.index("pretrain") < stages.index("distill")


def test_explicit_generative_selection_works_with_the_pretrain_stage(compose, tmp_path):
    from gendd_framework.pipeline import run

    overrides = [
        "experiment=digits/gendd_pretrain",
        "pretrain.epochs=1",
        "trainer.select=acc/generative",
        *TINY,
    ]
    summary = run(compose(overrides), tmp_path)
    assert "acc/generative" in summary["distill"]["val"]


def test_cosine_schedule_ends_at_zero_with_gradient_accumulation(compose, tmp_path):
    from gendd_framework.pipeline import run

    overrides = ["experiment=digits/ce", "trainer.accum_steps=2", "sched.warmup_epochs=0", "trainer.epochs=1"]
    run(compose(overrides), tmp_path)
    last = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("stage") == "distill" and "lr" in r]
    assert last[-1]["lr"] == pytest.approx(0.0, abs=1e-9)
