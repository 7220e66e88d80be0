"""Every registered method trains two steps and evaluates once (tiny shapes), and every experiment
composes and builds with every method (random-init models, nothing trained)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gendd_framework
import gendd_framework.components  # noqa: F401  (registrations)
from gendd_framework import config as config_lib
from gendd_framework.cli import config_dir
from gendd_framework.context import StepContext
from gendd_framework.data.base import BatchDataset
from gendd_framework.engine.statistics import TeacherStatistics
from gendd_framework.engine.trainer import evaluate
from gendd_framework.errors import ConfigError
from gendd_framework.methods.base import required_views
from gendd_framework.models import build_model
from gendd_framework.models.ensemble import EnsembleTeacher
from gendd_framework.registry import METHODS, OPTIMIZERS, origin, split_spec
from gendd_framework.stages import teacher_architecture

METHOD_FILES = sorted(p.stem for p in (config_dir() / "method").glob("*.yaml"))
EXPERIMENTS = sorted(
    p.relative_to(config_dir() / "experiment").with_suffix("").as_posix()
    for p in (config_dir() / "experiment").rglob("*.yaml")
    if not p.name.startswith("_")
)
# Every method is composed, validated and built on one experiment per (teacher family, student family)
# of the shipped experiments: the CIFAR zoo's ResNet, ResNet x4, WRN, VGG, ResNet50, MobileNetV2,
# ShuffleNetV1/V2 and timm ViT, torchvision ImageNet pairs, and the digits MLP and CNN students.
# Every experiment file composes and validates with its own method in test_recipes.py, and every
# published (method, pair) recipe in test_published_recipes.py.
PAIR_EXPERIMENTS = [
    "cifar100/resnet56_resnet20", "cifar100/resnet32x4_resnet8x4", "cifar100/wrn_40_2_wrn_16_2",
    "cifar100/vgg13_vgg8", "cifar100/resnet50_vgg8", "cifar100/vgg13_mobilenetv2",
    "cifar100/resnet32x4_shufflev1", "cifar100/resnet32x4_shufflev2", "cifar100/resnet32x4_vit_tiny",
    "imagenet/resnet34_resnet18", "imagenet/resnet50_mobilenet", "digits/transfer", "digits/transfer_cnn",
]  # fmt: skip
assert set(PAIR_EXPERIMENTS) <= set(EXPERIMENTS)
INPUT_SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "imagefolder": None}
# methods registered by the library itself (plugins from registry/ are tested in test_registry.py)
BUILT_IN = {"ce", "kd", "distill", "dkd", "dist", "wkd_l", "pld", "meal_v2", "gendd", "teacher_head_ce"}
BUILT_IN |= {"fitnet", "fitnet_hint", "at", "sp", "pkt", "rkd", "vid", "crd", "reviewkd", "wkd_f", "nd"}
BUILT_IN |= {"projector_ensemble", "ofa", "ctkd", "simkd", "mean_teacher", "dml"}
STAGE_ONLY = {"teacher_head_ce", "fitnet_hint"}  # built by a stage (pretrain, hint), no method config


def tiny_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10
    target = y.clone()
    target[::4] = -1  # a transfer set: some labels hidden from the student
    return BatchDataset(TensorDataset(x, target)), BatchDataset(TensorDataset(x, y))


def tiny_teacher(method_name):
    torch.manual_seed(1)
    make = lambda w: build_model({"name": "small_cnn", "channels": [8, w]}, num_classes=10)  # noqa: E731
    if method_name == "meal_v2":
        return EnsembleTeacher([make(64).eval(), make(32).eval()], "probs")
    return make(64).eval()  # 64-d feature: one GenDD token


def method_spec(compose, config_name):
    cfg = config_lib.apply_recipe(compose([f"method={config_name}"]))
    return split_spec(cfg.method, "method")


def test_every_built_in_method_has_a_config_and_is_tested(compose):
    names = {method_spec(compose, m)[0] for m in METHOD_FILES}
    assert names >= BUILT_IN - STAGE_ONLY
    package = Path(gendd_framework.__file__).parent  # plugins (registry/, tests' own) are not built in
    in_package = {n for n in METHODS.names() if package in origin(METHODS.get(n)).file.parents}
    assert in_package == BUILT_IN  # a new method must be added here (and tested)


@pytest.mark.parametrize("config_name", [*METHOD_FILES, *sorted(STAGE_ONLY)])
def test_method_trains_two_steps_and_evaluates_once(compose, tmp_path, config_name):
    if config_name in STAGE_ONLY:
        name, kwargs = config_name, {}
    else:
        name, kwargs = method_spec(compose, config_name)
    if name == "gendd":  # a small head and few sampling steps: this checks wiring, not quality
        kwargs.update(head={"name": "mlp_adaln", "width": 32, "depth": 1}, diffusion_batch_mul=2)
        kwargs["sampler"] = {**kwargs["sampler"], "steps": 4}
    torch.manual_seed(0)
    student = build_model({"name": "small_cnn", "channels": [4, 8]}, num_classes=10)
    teacher = tiny_teacher(config_name)
    method = METHODS.build(
        {"name": name, **kwargs},
        student=student,
        teacher=teacher,
        num_classes=10,
        input_shape=(1, 8, 8),
        num_samples=len(tiny_data()[0]),
    )
    train, test = tiny_data()
    train.views = required_views(method, train[0].keys())  # e.g. mean_teacher's second view `input_1`
    if method.teacher is not None:
        stats = TeacherStatistics(teacher, train, 10, torch.device("cpu"), tmp_path, {"tiny": 1})
        method.prepare(stats)
    optimizer = OPTIMIZERS.build({"name": "adamw", "lr": 1e-2}, params=method.param_groups(1e-4))
    before = [p.detach().clone() for p in student.parameters()]
    loader = DataLoader(train, batch_size=20, shuffle=False)
    method.train()
    for step, batch in enumerate(loader):
        out = method.training_step(batch, StepContext(step=step, steps_per_epoch=2, total_steps=2))
        assert torch.isfinite(out["loss"]), out
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    changed = [not torch.equal(a, b) for a, b in zip(before, student.parameters())]
    assert any(changed), "two optimizer steps left the student unchanged"
    if method.teacher is not None and method.teacher.model is teacher:  # ce, dml, mean_teacher ignore it
        assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    metrics = evaluate(method, DataLoader(test, batch_size=12), torch.device("cpu"), teacher=teacher)
    for output in method.predict(test[0]["input"][None]):
        for key in ("acc", "ce", "ece", "agree", "kl"):
            assert f"{key}/{output}" in metrics


_PAIR_MODELS: dict[str, tuple] = {}  # random-init (student, teacher) per pair, built once, copied per build


def build_for(cfg, shape, classes):
    key = json.dumps([config_lib.plain(cfg.student), config_lib.plain(cfg.teacher), classes], default=str)
    if key not in _PAIR_MODELS:
        torch.manual_seed(0)
        _PAIR_MODELS[key] = (
            build_model(cfg.student, num_classes=classes),
            teacher_architecture(cfg.teacher, classes),
        )
    student, teacher = (copy.deepcopy(m) for m in _PAIR_MODELS[key])
    name, kwargs = split_spec(cfg.method, "method")
    return METHODS.build(
        {"name": name, **kwargs},
        student=student,
        teacher=teacher,
        num_classes=classes,
        input_shape=shape,
        num_samples=1000,
    )


@pytest.mark.parametrize("method", METHOD_FILES)
def test_every_method_composes_and_builds_on_every_model_family(compose, method):
    """Every method x one experiment per model-family pair composes, validates and builds at real
    shapes, projectors sized from the probe. A method that reads spatial maps may refuse a student
    without any (the digits MLP, a ViT), naming the keys that set the layers."""
    built: dict[str, str] = {}
    for experiment in PAIR_EXPERIMENTS:
        cfg = config_lib.apply_recipe(compose([f"experiment={experiment}", f"method={method}"]))
        config_lib.validate(cfg)
        data = cfg.data.name
        shape = INPUT_SHAPES[data] or (3, cfg.data.size, cfg.data.size)
        classes = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagefolder": 1000}[data]
        key = json.dumps(
            [config_lib.plain(cfg.student), config_lib.plain(cfg.teacher.get("model") or cfg.teacher),
             config_lib.plain(cfg.method), shape], sort_keys=True, default=str,
        )  # fmt: skip
        if key in built:
            continue
        try:
            method_obj = build_for(cfg, shape, classes)
        except ConfigError as exc:
            no_maps = cfg.student.name == "mlp" or "vit" in str(cfg.student.name)  # no (C, H, W) maps
            assert no_maps and "layers" in str(exc), f"{experiment}: {exc}"
            built[key] = "refused"
            continue
        assert method_obj.param_groups(0.1)[0]["params"], f"{experiment}: nothing to train"
        built[key] = "built"
    assert "built" in built.values()
