"""Shared fixtures: offline env, a shared teacher cache, Hydra composition of the real configs, and
registries and plugin state isolated per test module and per test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import contextlib  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import gendd_framework.components  # noqa: E402,F401  (every built-in name, before the first snapshot)
from gendd_framework import plugins, registry  # noqa: E402
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


# -- registry and plugin isolation -------------------------------------------------------------------
PLUGIN_STATE = ("_loaded", "_by_content", "imported_files", "_code_files", "_code_dirs")  # plugins.py


def registries() -> list[registry.Registry]:
    return [value for value in vars(registry).values() if isinstance(value, registry.Registry)]


def _restore(container, saved) -> None:
    """Put `saved` (a copy) back into `container` in place: holders of the object see the restore."""
    if isinstance(container, list):
        container[:] = saved
    else:
        container.clear()
        container.update(saved)


@contextlib.contextmanager
def isolated_components() -> Iterator[None]:
    """Every registry and the plugin loader's memory as they were on entry once the block ends: what
    the block registers (directly or by importing a plugin) is gone, a name it replaced is back, and
    a plugin it imported is imported (and registers) again next time."""
    saved = [
        (table, dict(table))
        for reg in registries()
        for table in (reg._entries, reg._aliases, reg._prefixes, reg._origins)
    ]
    state = [(getattr(plugins, name), getattr(plugins, name).copy()) for name in PLUGIN_STATE]
    modules = set(sys.modules)
    try:
        yield
    finally:
        for name in set(sys.modules) - modules:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if name.startswith("gendd_plugins.") or (file and plugins.is_plugin_code(file)):
                del sys.modules[name]
        for container, copy in [*saved, *state]:
            _restore(container, copy)


@pytest.fixture(autouse=True, scope="module")
def _module_components() -> Iterator[None]:
    """Module-scoped fixtures (a run with a plugin) register nothing beyond their module."""
    with isolated_components():
        yield


@pytest.fixture(autouse=True)
def _test_components() -> Iterator[None]:
    """A test's registrations and plugin imports end with the test."""
    with isolated_components():
        yield
