"""The config schema sits below the engine, and the engine gets plain values, not the run config."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

import gendd_framework.components  # noqa: F401  (built-in registrations)
from gendd_framework import config as config_lib
from gendd_framework.data.base import TensorImages
from gendd_framework.engine.teacher_cache import TeacherCache, cache_for_run
from gendd_framework.errors import ConfigError
from gendd_framework.models import build_model
from gendd_framework.registry import METHODS
from gendd_framework.schema import TrainerConfig


def test_the_schema_imports_nothing_of_the_engine_or_torch():
    code = (
        "import sys, gendd_framework.schema, gendd_framework.config; "
        "print(sorted(m for m in sys.modules if m.startswith(('gendd_framework.engine', 'torch'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("method.lam=0.5", "method.lam"),
        ("++method.lam=0.5", "method.lam"),
        ("method.name='a=b'", "method.name"),  # quoted values may hold '='
        ("method/sampler=ddim", "method.sampler"),
        ("method/sampler@method.sampler=euler", "method.sampler"),  # a group with its package
        ("method.temperature=1,2", "method.temperature"),  # a sweep: the key, whatever the values
    ],
)
def test_the_user_method_keys_are_read_with_hydras_grammar(override, path):
    assert config_lib.user_method_keys([override, "method=kd", "seed=1", "~method.beta"]) == [path]


def test_a_command_line_value_wins_over_the_recipe():
    cfg = OmegaConf.create(
        {
            "recipe": "r",
            "method": {"name": "m", "lam": 0.3, "steps": 5, "per_recipe": {"r": {"lam": 0.9, "steps": 64}}},
        }
    )
    merged = config_lib.apply_recipe(cfg, ["++method.lam=0.3"])
    assert (merged.method.lam, merged.method.steps) == (0.3, 64)  # the user's lam, the recipe's steps
    assert "per_recipe" not in merged.method


def tiny_kd():
    torch.manual_seed(0)
    student = build_model({"name": "small_cnn", "channels": [4, 8]}, num_classes=10)
    teacher = build_model({"name": "small_cnn", "channels": [8, 16]}, num_classes=10).eval()
    return METHODS.build({"name": "kd"}, student=student, teacher=teacher, input_shape=(1, 8, 8))


def test_the_teacher_cache_is_built_from_plain_values(tmp_path):
    data = TensorImages(torch.randn(20, 1, 8, 8), torch.arange(20) % 10, None)
    trainer = TrainerConfig(epochs=2, teacher_cache={"mode": "deterministic"})
    plain = {"data_config": {"name": "tiny"}, "device": torch.device("cpu"), "train_dataset": data}
    cache = cache_for_run(tiny_kd(), trainer, root=tmp_path / "teacher_outputs", **plain)
    assert isinstance(cache, TeacherCache)
    assert cache.folder.parent == tmp_path / "teacher_outputs"
    with pytest.raises(ConfigError, match="set trainer.teacher_cache.dir or paths.cache_dir"):
        cache_for_run(tiny_kd(), trainer, root=None, **plain)
    off = TrainerConfig(epochs=2)
    assert cache_for_run(tiny_kd(), off, root=None, **plain) is None
