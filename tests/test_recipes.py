"""The CIFAR-100 and ImageNet GenDD recipes (conf/experiment/{cifar100,imagenet}/): they compose, carry
the paper's per-pair settings (the official CIFAR-100 and ImageNet recipes), build at the real shapes,
and fail clearly without data or teacher weights. Models are random-init; nothing is trained."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import gendd_framework.components  # noqa: F401  (registers every built-in component)
from gendd_framework import config as config_lib
from gendd_framework.cli import config_dir
from gendd_framework.context import StepContext
from gendd_framework.errors import ConfigError
from gendd_framework.models import build_model
from gendd_framework.registry import METHODS, split_spec

RECIPE_FILES = sorted(
    p.relative_to(config_dir() / "experiment").with_suffix("").as_posix()
    for group in ("cifar100", "imagenet")
    for p in (config_dir() / "experiment" / group).glob("*.yaml")
)

# (teacher, student, lambda, M, tokens n = D_t / 64): the official CIFAR-100 recipes
CIFAR_PAIRS = [
    ("resnet110", "resnet32", 0.9, 30, 1),
    ("resnet56", "resnet20", 0.9, 30, 1),
    ("resnet32x4", "resnet8x4", 0.7, 30, 4),
    ("vgg13", "vgg8", 0.7, 30, 8),
    ("vgg13", "resnet20", 0.9, 30, 8),
    ("wrn_40_2", "resnet8x4", 0.7, 30, 2),
    ("wrn_40_2", "wrn_16_2", 0.8, 30, 2),
    ("wrn_40_2", "wrn_40_1", 0.8, 30, 2),
]
# experiment, teacher model, student model, warmup epochs, tokens n: the official ImageNet recipes
# the method-independent pairs of the CIFAR-100 KD literature (CRD/RepDistiller tables) + a ViT student
METHOD_INDEPENDENT_PAIRS = [
    "wrn_40_2_wrn_16_2", "wrn_40_2_wrn_40_1", "resnet56_resnet20", "resnet110_resnet20", "resnet110_resnet32",
    "resnet32x4_resnet8x4", "vgg13_vgg8", "vgg13_mobilenetv2", "resnet50_mobilenetv2", "resnet50_vgg8",
    "resnet32x4_shufflev1", "resnet32x4_shufflev2", "wrn_40_2_shufflev1", "resnet32x4_vit_tiny",
    "resnet32x4_vgg8", "resnet32x4_shufflev2_1_5",  # SimKD's README pairs
]  # fmt: skip
IMAGENET_PAIRS = [
    ("imagenet/gendd_resnet34_resnet18", "tv:resnet34", "tv:resnet18", 10, 8),
    ("imagenet/gendd_resnet50_mobilenet", "tv:resnet50", "tv:mobilenet_v2", 20, 32),
]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def cifar(teacher, student):
    return f"cifar100/gendd_{teacher}_{student}"


def compose_recipe(experiment):
    """The recipe as written: without the FAST overrides the `compose` fixture prepends."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=[f"experiment={experiment}"])
    return config_lib.apply_recipe(cfg)  # per-recipe method values merged, as a run does


def build_method(cfg, num_classes, **method_overrides):
    cfg = config_lib.apply_recipe(cfg)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher.model, num_classes=num_classes)
    student = build_model(cfg.student, num_classes=num_classes)
    name, kwargs = split_spec(cfg.method, "method")
    return METHODS.build(
        {"name": name, **kwargs, **method_overrides},
        student=student,
        teacher=teacher,
        num_classes=num_classes,
    )


def test_every_pair_of_the_spec_has_a_recipe_and_nothing_else():
    expected = {f"cifar100/gendd_{t}_{s}" for t, s, *_ in CIFAR_PAIRS} | {e for e, *_ in IMAGENET_PAIRS}
    expected |= {f"cifar100/{pair}" for pair in METHOD_INDEPENDENT_PAIRS}
    expected |= {"imagenet/resnet34_resnet18", "imagenet/resnet50_mobilenet"}
    recipes = {r for r in RECIPE_FILES if not r.rsplit("/", 1)[-1].startswith("_")}
    assert recipes == expected


@pytest.mark.parametrize("experiment", RECIPE_FILES)
def test_recipe_composes_and_validates(compose, experiment):
    cfg = config_lib.apply_recipe(compose([f"experiment={experiment}"]))
    config_lib.validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize(("teacher", "student", "lam", "mul", "tokens"), CIFAR_PAIRS)
def test_cifar_recipe_settings_match_the_spec(teacher, student, lam, mul, tokens):
    cfg = compose_recipe(cifar(teacher, student))
    assert cfg.teacher.model.name == teacher and cfg.student.name == student
    assert cfg.data.name == "cifar100" and cfg.data.loader.batch_size == 64
    m = cfg.method
    assert (m.name, m.lam, m.diffusion_batch_mul) == ("gendd", lam, mul)
    assert (m.tokenizer.name, m.tokenizer.token_dim) == ("split", 64)
    assert (m.head.width, m.head.depth) == (1024, 3)
    assert (m.sampler.name, m.sampler.steps) == ("ddpm", 100)
    assert (m.mixup_beta, m.cond_drop_prob, m.guidance_scale, m.num_sampling) == (1.0, 0.2, 2.0, 1)
    assert m.objective.schedule == "cosine" and m.use_labels
    o = cfg.optim
    assert (o.name, o.lr, o.weight_decay, list(o.betas), o.beta2_min) == (
        "adamw",
        1e-3,
        5e-2,
        [0.9, 0.999],
        0.95,
    )
    s = cfg.sched
    assert (s.name, list(s.milestones), s.gamma, s.warmup_epochs) == ("multistep", [150, 180, 210], 0.1, 50)
    # selection defaults to the method's primary output: GenDD's generative accuracy
    assert cfg.trainer.epochs == 240 and cfg.trainer.select is None
    assert list(cfg.stages) == ["teacher", "pretrain", "distill"]
    p = cfg.pretrain
    assert (p.epochs, p.optim.name, p.optim.lr, p.optim.weight_decay) == (50, "adamw", 3e-3, 5e-2)
    assert (p.sched.name, p.sched.warmup_epochs) == ("cosine", 0)
    assert cfg.trainer.eval_every == 10
    assert cfg.teacher.train_if_missing is False
    t = cfg.teacher.train  # the standard CIFAR teacher recipe, used only when training a teacher here
    assert (t.epochs, t.optim.name, t.optim.lr, list(t.sched.milestones)) == (
        240,
        "sgd",
        0.05,
        [150, 180, 210],
    )
    assert str(cfg.teacher.weights).endswith(f"{teacher}_vanilla/ckpt_epoch_240.pth")


@pytest.mark.parametrize(("experiment", "teacher", "student", "warmup", "tokens"), IMAGENET_PAIRS)
def test_imagenet_recipe_settings_match_the_spec(experiment, teacher, student, warmup, tokens):
    cfg = compose_recipe(experiment)
    assert cfg.teacher.model.name == teacher and cfg.student.name == student
    assert cfg.data.name == "imagefolder" and cfg.data.loader.batch_size == 512
    m = cfg.method
    assert (m.lam, m.diffusion_batch_mul, m.tokenizer.token_dim, m.sampler.steps) == (0.9, 10, 64, 64)
    assert (m.mixup_beta, m.cond_drop_prob) == (1.0, 0.2)
    o = cfg.optim
    assert (o.name, o.lr, o.weight_decay, o.beta2_min) == ("adamw", 2e-3, 2e-2, 0.96)
    s = cfg.sched
    assert (s.name, s.warmup_epochs) == ("cosine", warmup)
    assert s.min_lr_ratio * o.lr == pytest.approx(1e-6)
    assert cfg.trainer.epochs == 100
    p = cfg.pretrain
    assert (p.epochs, p.optim.lr, p.optim.weight_decay) == (20, 2e-3, 2e-2)
    assert list(cfg.stages) == ["teacher", "pretrain", "distill"]


@pytest.mark.parametrize(("teacher", "student", "lam", "mul", "tokens"), CIFAR_PAIRS)
def test_cifar_method_builds_at_real_shapes(compose, teacher, student, lam, mul, tokens):
    cfg = compose([f"experiment={cifar(teacher, student)}"])
    method = build_method(cfg, num_classes=100)
    assert method.tokenizer.num_tokens == tokens
    assert method.tokenizer.token_dim == 64
    assert method.teacher.feature_dim == 64 * tokens
    assert method.class_weight.shape == (100, 64 * tokens)
    assert method.head.num_positions == tokens and method.head.cond_dim == method.student.feature_dim
    assert (method.lam, method.mul) == (lam, mul)


@pytest.mark.parametrize(("experiment", "teacher", "student", "warmup", "tokens"), IMAGENET_PAIRS)
def test_imagenet_method_builds_at_real_shapes(compose, experiment, teacher, student, warmup, tokens):
    method = build_method(compose([f"experiment={experiment}"]), num_classes=1000)
    assert method.tokenizer.num_tokens == tokens
    assert method.class_weight.shape == (1000, 64 * tokens)
    if experiment.endswith("resnet34_resnet18"):
        # k=64, D_s=512, n=8, width 1024, depth 3: the GenDD paper quotes 19.89 M for this pair
        assert sum(p.numel() for p in method.head.parameters()) == 19_893_376
    else:
        assert method.student.feature_dim == 1280  # MobileNetV2 (the paper's MobileNetV1 has 1024)


def test_one_training_step_of_a_cifar_recipe(compose):
    cfg = compose([f"experiment={cifar('resnet56', 'resnet20')}"])
    method = build_method(cfg, num_classes=100, diffusion_batch_mul=2)
    method.train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 100, (2,), generator=g)
    out = method.training_step({"input": x, "target": y}, StepContext())
    assert {"loss", "diffusion", "ce"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert method.head.final.linear.weight.grad is not None


def test_cifar_recipe_without_data_stops_with_a_clear_error(compose, tmp_path, monkeypatch):
    from gendd_framework.pipeline import run

    monkeypatch.setenv("GENDD_DATA_DIR", str(tmp_path / "nodata"))
    cfg = compose([f"experiment={cifar('resnet56', 'resnet20')}"])
    with pytest.raises(ConfigError, match="cifar-100-python"):
        run(cfg, tmp_path / "run")


@pytest.mark.parametrize("experiment", [cifar("resnet32x4", "resnet8x4"), IMAGENET_PAIRS[0][0]])
def test_missing_teacher_weights_stop_the_teacher_stage_naming_the_file(
    compose, tmp_path, monkeypatch, experiment
):
    from gendd_framework.stages.teacher import teacher_stage

    monkeypatch.setenv("GENDD_TEACHERS", str(tmp_path / "teachers"))
    cfg = compose([f"experiment={experiment}"])
    expected = str(cfg.teacher.weights)
    assert expected.startswith(str(tmp_path / "teachers"))
    # the data is not needed before the weights are loaded, so a stand-in context reaches the check
    ctx = SimpleNamespace(cfg=cfg, data=SimpleNamespace(num_classes=100), models={})
    with pytest.raises(ConfigError) as info:
        teacher_stage(ctx)
    assert expected in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        build_model({**OmegaConf.to_container(cfg.teacher.model), "checkpoint": expected}, num_classes=100)
