"""Build a model from its config node, optionally loading local weights (never executes code)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.models.tap import find_classifier
from gendd_framework.registry import MODELS, split_spec


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a `.pth`/`.pt`/`.safetensors` file; `weights_only=True` so loading runs no code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file or pickled code objects
        raise ConfigError(f"cannot load checkpoint {path} with weights_only=True: {exc}") from exc
    for key in ("model", "state_dict", "student", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint {path} holds a {type(obj).__name__}, expected a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


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
    """`{name, checkpoint?, strict?, freeze?, **kwargs}` -> module; `defaults` (e.g. num_classes) fill
    unset kwargs. `freeze` lists module paths whose parameters are never trained (see freeze_parameters).
    """
    name, kwargs = split_spec(spec, "model")
    checkpoint = kwargs.pop("checkpoint", None)
    strict = kwargs.pop("strict", True)
    freeze = kwargs.pop("freeze", None) or []
    model = MODELS.build({"name": name, **{**defaults, **kwargs}})
    if checkpoint:
        state = load_state_dict_file(checkpoint)
        try:
            model.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise ConfigError(f"weights in {checkpoint} do not fit model '{name}': {exc}") from exc
    freeze_parameters(model, freeze)
    return model
