"""The Objective/Sampler protocol as GenDD uses it: build-time kind checks, objective-agnostic logging,
recorded settings and NFE, and the flow objective composing on every GenDD recipe."""

from __future__ import annotations

import pytest
import torch

import gendd_framework.components  # noqa: F401  (registers every built-in component)
from gendd_framework import config as config_lib
from gendd_framework.cli import config_dir
from gendd_framework.context import StepContext, as_batch
from gendd_framework.errors import ConfigError
from gendd_framework.generative.protocol import check_objective, check_sampler, samplers_for
from gendd_framework.models import build_model
from gendd_framework.registry import METHODS, split_spec

GENDD_RECIPES = sorted(
    p.relative_to(config_dir() / "experiment").with_suffix("").as_posix()
    for p in (config_dir() / "experiment").rglob("*gendd*.yaml")
    if not p.name.startswith("_")
)

NUM_CLASSES, BATCH = 10, 6
HEAD = {"name": "mlp_adaln", "width": 32, "depth": 1}
FLOW = {"name": "flow"}
DIFFUSION = {"name": "gaussian_diffusion", "num_timesteps": 50}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_method(objective=FLOW, sampler=None, **kwargs):
    torch.manual_seed(0)
    teacher = build_model({"name": "mlp", "hidden": [128]}, num_classes=NUM_CLASSES)
    student = build_model({"name": "mlp", "hidden": [16]}, num_classes=NUM_CLASSES)
    spec = {"name": "gendd", "head": HEAD, "objective": objective, "diffusion_batch_mul": 2, **kwargs}
    if sampler is not None:
        spec["sampler"] = sampler
    return METHODS.build(spec, student=student, teacher=teacher, num_classes=NUM_CLASSES)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 1, 8, 8, generator=g)
    return as_batch((x, torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)))


# -- build-time checks -------------------------------------------------------------------------------
def test_flow_objective_with_the_default_ddpm_sampler_fails_at_build_in_one_line():
    with pytest.raises(ConfigError) as info:
        make_method(FLOW)  # no sampler: the default ddpm
    message = str(info.value)
    assert "\n" not in message
    assert "'ddpm'" in message and "'flow'" in message and "flow objective" in message
    assert all(name in message for name in ("euler", "heun", "one_step"))


def test_diffusion_objective_with_euler_fails_at_build():
    with pytest.raises(ConfigError) as info:
        make_method(DIFFUSION, {"name": "euler", "steps": 2})
    message = str(info.value)
    assert "\n" not in message and "'euler'" in message and "'gaussian_diffusion'" in message
    assert "ddim" in message and "ddpm" in message


def test_samplers_for_each_kind():
    assert set(samplers_for("flow")) == {"euler", "heun", "one_step"}
    assert set(samplers_for("diffusion")) == {"ddpm", "ddim"}


def test_protocol_checks_reject_incomplete_components():
    class NoKind:
        learn_sigma = False

        def training_losses(self, model_fn, x0, noise=None):
            return {}

    class NoNoise:
        kind, learn_sigma = "flow", False

        def training_losses(self, model_fn, x0):
            return {}

    with pytest.raises(ConfigError, match="kind"):
        check_objective(NoKind(), "nokind")
    with pytest.raises(ConfigError, match="noise"):
        check_objective(NoNoise(), "nonoise")

    class NoObjectives:
        def sample(self, *args, **kwargs): ...

        def nfe(self, objective): ...

    with pytest.raises(ConfigError, match="objectives"):
        check_sampler(NoObjectives(), "bare")


def test_head_learn_sigma_follows_the_objective():
    assert make_method(FLOW, {"name": "euler"}).head.out_channels == 64
    assert make_method(DIFFUSION, {"name": "ddim", "steps": 2}).head.out_channels == 128
    with pytest.raises(ConfigError, match="learn_sigma"):
        make_method(FLOW, {"name": "euler"}, head={**HEAD, "learn_sigma": True})


# -- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("loss", "terms"), [("mse", {"mse"}), ("pseudo_huber", {"mse", "pseudo_huber"})])
def test_flow_training_step_is_finite_and_logs_the_objective_terms(loss, terms):
    method = make_method({"name": "flow_matching", "loss": loss}, {"name": "euler", "steps": 2})
    method.train()
    out = method.training_step(batch(), StepContext())
    assert set(out) == {"loss", "diffusion", "ce", *terms}
    assert all(torch.isfinite(v).all() for v in out.values())
    assert all(not out[k].requires_grad for k in terms)
    assert out["loss"].requires_grad
    torch.testing.assert_close(out["loss"], out["diffusion"] + out["ce"])


def test_objective_overrides_apply_only_to_the_named_objective():
    overrides = {"gaussian_diffusion": {"schedule": "linear"}}
    diffusion = make_method(DIFFUSION, {"name": "ddim", "steps": 2}, objective_overrides=overrides)
    assert diffusion.objective.schedule == "linear"
    flow = make_method(FLOW, {"name": "euler"}, objective_overrides=overrides)  # no diffusion keys reach it
    assert flow.objective.kind == "flow"
    aliased = make_method(
        FLOW, {"name": "euler"}, objective_overrides={"flow_matching": {"loss": "pseudo_huber"}}
    )
    assert aliased.objective.loss == "pseudo_huber"
    with pytest.raises(ConfigError, match="unknown objectives"):
        make_method(FLOW, {"name": "euler"}, objective_overrides={"flwo": {}})


# -- prediction ----------------------------------------------------------------------------------
def count_calls(method):
    counts = {"head": 0, "student": 0}
    denoise = method.head.denoise

    def counting_denoise(*args, **kwargs):
        counts["head"] += 1
        return denoise(*args, **kwargs)

    method.head.denoise = counting_denoise
    method.student.register_forward_hook(lambda *_: counts.__setitem__("student", counts["student"] + 1))
    return counts


@pytest.mark.parametrize(
    ("sampler", "nfe"), [({"name": "euler", "steps": 1}, 1), ({"name": "heun", "steps": 2}, 3)]
)
def test_predict_calls_the_head_nfe_times_and_the_student_once(sampler, nfe):
    method = make_method(FLOW, sampler, num_sampling=5, guidance_scale=2.0)
    method.eval()
    counts = count_calls(method)
    out = method.predict(batch()["input"])
    assert out["generative"].shape == (BATCH, NUM_CLASSES)
    assert counts == {"head": nfe, "student": 1}  # NS=5 samples and cond/uncond batched in each call
    assert method.eval_settings()["nfe"] == nfe


def test_eval_settings_record_objective_sampler_and_nfe():
    flow = make_method({"name": "flow", "time_sampling": "u_shaped"}, {"name": "heun", "steps": 3})
    s = flow.eval_settings()
    assert (s["objective"], s["sampler_name"], s["sampler"], s["nfe"]) == (
        "flow_matching",
        "heun",
        "HeunSampler",
        5,
    )
    assert s["objective_settings"]["time_sampling"] == "u_shaped" and s["objective_settings"]["loss"] == "mse"
    assert (s["steps"], s["final_corrector"]) == (3, False)
    d = make_method(DIFFUSION, {"name": "ddim", "steps": 4}).eval_settings()
    assert (d["objective"], d["sampler_name"], d["nfe"], d["steps"]) == ("gaussian_diffusion", "ddim", 4, 4)
    assert d["objective_settings"]["schedule"] == "cosine"
    one = make_method(FLOW, {"name": "one_step"}).eval_settings()
    assert (one["sampler_name"], one["nfe"]) == ("one_step", 1)


# -- configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", GENDD_RECIPES)
def test_flow_objective_and_euler_compose_on_every_gendd_recipe(compose, experiment):
    overrides = [f"experiment={experiment}", "method/objective=flow", "method/sampler=euler"]
    cfg = config_lib.apply_recipe(compose(overrides))
    config_lib.validate(cfg)
    assert cfg.method.objective.name == "flow_matching" and cfg.method.sampler.name == "euler"
    assert "schedule" not in cfg.method.objective and "num_timesteps" not in cfg.method.objective


@pytest.mark.parametrize("sampler", ["euler", "heun", "one_step"])
def test_digits_gendd_with_flow_builds_and_keeps_the_digits_settings(compose, sampler):
    cfg = config_lib.apply_recipe(
        compose(["experiment=digits/gendd", "method/objective=flow", f"method/sampler={sampler}"])
    )
    name, kwargs = split_spec(cfg.method, "method")
    teacher = build_model(cfg.teacher.model, num_classes=NUM_CLASSES)
    student = build_model(cfg.student, num_classes=NUM_CLASSES)
    method = METHODS.build(
        {"name": name, **kwargs}, student=student, teacher=teacher, num_classes=NUM_CLASSES
    )
    assert method.objective.kind == "flow" and method.head.width == 256 and method.mul == 8
    assert {"euler": 4, "heun": 3, "one_step": 1}[sampler] == method.eval_settings()["nfe"]


def test_digits_gendd_still_uses_the_linear_diffusion_schedule(compose):
    cfg = config_lib.apply_recipe(compose(["experiment=digits/gendd"]))
    name, kwargs = split_spec(cfg.method, "method")
    teacher = build_model(cfg.teacher.model, num_classes=NUM_CLASSES)
    student = build_model(cfg.student, num_classes=NUM_CLASSES)
    method = METHODS.build(
        {"name": name, **kwargs}, student=student, teacher=teacher, num_classes=NUM_CLASSES
    )
    assert method.objective.schedule == "linear" and method.objective.learn_sigma


_MODELS: dict = {}


@pytest.mark.parametrize("sampler", ["euler", "heun", "one_step"])
@pytest.mark.parametrize("experiment", GENDD_RECIPES)
def test_flow_objective_and_every_flow_sampler_build_on_every_gendd_recipe(compose, experiment, sampler):
    from gendd_framework.stages import teacher_architecture

    overrides = [f"experiment={experiment}", "method/objective=flow", f"method/sampler={sampler}"]
    cfg = config_lib.apply_recipe(compose(overrides), overrides)
    classes = {"digits": 10, "cifar100": 100, "imagefolder": 1000}[cfg.data.name]
    if experiment not in _MODELS:  # models are shared by the three samplers of a recipe
        torch.manual_seed(0)
        _MODELS.clear()
        _MODELS[experiment] = (
            teacher_architecture(cfg.teacher, classes),
            build_model(cfg.student, num_classes=classes),
        )
    teacher, student = _MODELS[experiment]
    name, kwargs = split_spec(cfg.method, "method")
    method = METHODS.build({"name": name, **kwargs}, student=student, teacher=teacher, num_classes=classes)
    assert method.objective.kind == "flow" and method.eval_settings()["sampler_name"] == sampler
