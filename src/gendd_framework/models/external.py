"""torchvision (`tv:<name>`) and timm (`timm:<name>`) classifiers, random init or a local checkpoint.

Nothing is downloaded: `pretrained`/`weights` arguments are refused; weights come from a local file
through the framework's `checkpoint` key (see `build_model`).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.registry import MODELS

_FORBIDDEN = ("pretrained", "weights", "pretrained_cfg_overlay")


def _refuse_downloads(kwargs: dict[str, Any], source: str) -> None:
    bad = [k for k in _FORBIDDEN if kwargs.get(k)]
    if bad:
        raise ConfigError(
            f"{source}: {bad} would download weights; "
            "set `checkpoint: /path/to/weights.pth` on the model instead"
        )


def torchvision_factory(name: str):
    import torchvision.models as tvm

    available = tvm.list_models(module=tvm)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=5)
        raise ConfigError(f"unknown torchvision model '{name}'. Did you mean: {close}?")

    @functools.wraps(tvm.get_model_builder(name))
    def build(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
        _refuse_downloads(kwargs, f"tv:{name}")
        kwargs.pop("weights", None)
        return tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    build.__doc__ = f"torchvision `{name}`, random init (load weights with `checkpoint:`)."
    return build


def timm_factory(name: str):
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ConfigError(f"unknown timm model '{name}'. Did you mean: {close}?")

    def build(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
        _refuse_downloads(kwargs, f"timm:{name}")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)

    build.__doc__ = f"timm `{name}`, random init (load weights with `checkpoint:`)."
    return build


MODELS.add_prefix("tv", torchvision_factory, "any torchvision classifier, e.g. tv:resnet18")
MODELS.add_prefix("timm", timm_factory, "any timm model, e.g. timm:resnet18 (offline, random init)")
