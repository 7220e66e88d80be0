"""Shared fixtures: offline env, a shared teacher cache, and Hydra composition of the real configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

from gendd_framework.cli import config_dir  # noqa: E402

# `make test` runs two xdist workers on a 2-core machine: one thread each; a plain run uses both cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

FAST = ["trainer.epochs=2", "teacher.train.epochs=3", "trainer.progress=false"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gendd_cache")
    os.environ["GENDD_CACHE_DIR"] = str(path)
    return str(path)


@pytest.fixture
def compose(cache_dir):
    """compose(["method=kd", ...]) -> the composed DictConfig (hydra section removed)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(overrides=(), config_dirs=(), fast=FAST):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            extra = [f"hydra.searchpath=[file://{d}]" for d in config_dirs]
            return hydra_compose(config_name="train", overrides=[*fast, *overrides, *extra])

    return _compose


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Single-threaded torch for the generative unit tests: on a shared 2-core box, intra-op thread
    barriers cost 10-40x wall time for their small tensors."""
    if not request.node.fspath.basename.startswith("test_generative_"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
