"""Build a model from its config node, optionally loading local weights (never executes code)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.models.checkpoints import load_state_dict_file, load_weights
from gendd_framework.models.tap import find_classifier
from gendd_framework.registry import MODELS, split_spec

__all__ = ["build_model", "freeze_parameters", "load_state_dict_file"]


def freeze_parameters(model: nn.Module, paths: Sequence[str]) -> list[str]:
    """Stop gradients into the modules at `paths` (module paths, or `classifier` for the final linear
    layer found as FeatureTap finds it); return the frozen parameter names.

    This is how a baseline keeps part of a model at its initial (or loaded) values, e.g. the official
    unsupervised KL baseline's student fc frozen at random init. Only parameters are frozen; batch-norm
    statistics inside a frozen module still update in train mode.
    """
    if isinstance(paths, str):
        paths = [paths]
    modules = dict(model.named_modules())
    names = {id(p): n for n, p in model.named_parameters()}
    frozen: list[str] = []
    for path in paths:
        if path == "classifier":
            module = find_classifier(model)
        elif path in modules and path:
            module = modules[path]
        else:
            close = difflib.get_close_matches(path, [m for m in modules if m], n=5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"cannot freeze '{path}': no such module in {type(model).__name__} (use 'classifier' "
                f"or a module path, e.g. {', '.join(n for n, _ in model.named_children())}).{hint}"
            )
        for p in module.parameters():
            p.requires_grad_(False)
            frozen.append(names[id(p)])
    return frozen


def build_model(spec: Any, **defaults: Any) -> nn.Module:
    """`{name, checkpoint?, weights_format?, strict?, freeze?, **kwargs}` -> module; `defaults` (e.g.
    num_classes) fill unset kwargs. `checkpoint` is a local weights file in any format
    `models/checkpoints.py` reads (`weights_format: auto` detects it); `freeze` lists module paths
    whose parameters are never trained (see freeze_parameters).
    """
    name, kwargs = split_spec(spec, "model")
    checkpoint = kwargs.pop("checkpoint", None)
    weights_format = kwargs.pop("weights_format", "auto") or "auto"
    strict = kwargs.pop("strict", True)
    freeze = kwargs.pop("freeze", None) or []
    model = MODELS.build({"name": name, **{**defaults, **kwargs}})
    if checkpoint:
        load_weights(model, checkpoint, name=name, weights_format=str(weights_format), strict=bool(strict))
    freeze_parameters(model, freeze)
    return model
