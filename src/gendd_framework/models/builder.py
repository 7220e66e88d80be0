"""Build a model from its config node, optionally loading local weights (never executes code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gendd_framework.errors import ConfigError
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


def build_model(spec: Any, **defaults: Any) -> nn.Module:
    """`{name, checkpoint?, strict?, **kwargs}` -> module; `defaults` (e.g. num_classes) fill unset kwargs."""
    name, kwargs = split_spec(spec, "model")
    checkpoint = kwargs.pop("checkpoint", None)
    strict = kwargs.pop("strict", True)
    model = MODELS.build({"name": name, **{**defaults, **kwargs}})
    if checkpoint:
        state = load_state_dict_file(checkpoint)
        try:
            model.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise ConfigError(f"weights in {checkpoint} do not fit model '{name}': {exc}") from exc
    return model
