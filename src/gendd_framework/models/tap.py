"""FeatureTap: named tensors from any model by forward hooks, so models need no edits.

A tap is a name: `logits` (the model output), `feature` (the input of the final linear classifier: the
pooled penultimate vector), or a module path reading the module's output (`layer3`) or input
(`layer3:input`). An input is read as the module is called (a forward pre-hook), copied first when the
module works in place, so `block.relu:input` is the pre-activation map even for an in-place ReLU (a
module called several times keeps its last call's). The classifier is found the same way for every
family: timm's `get_classifier()`, else the last `nn.Linear` in module order. Unknown paths fail at
build with the closest module paths.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from gendd_framework.errors import ConfigError

SPECIAL_TAPS = ("logits", "feature")


def find_classifier(model: nn.Module) -> nn.Linear:
    """The final linear layer that maps the pooled feature to logits."""
    if getattr(model, "has_single_classifier", True) is False:
        raise ConfigError(
            f"{type(model).__name__} has no single classifier, so it has no 'feature' tap; "
            "tap member modules by path instead (e.g. 'members.0.fc:input')"
        )
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        if isinstance(head, nn.Linear):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear classifier to tap a 'feature' from")
    return linears[-1]


def feature_dim(model: nn.Module) -> int:
    return find_classifier(model).in_features


def parse_tap(spec: str | Mapping[str, Any]) -> tuple[str, str, str]:
    """`'layer3'`, `'layer3:input'` or `{path: layer3, io: input}` -> (key, path, io)."""
    if isinstance(spec, Mapping):
        path, io = str(spec.get("path", "")), str(spec.get("io", "output"))
    else:
        path, _, io = str(spec).partition(":")
        io = io or "output"
    if not path:
        raise ConfigError(f"a tap needs a module path, got {spec!r}")
    if io not in ("input", "output"):
        raise ConfigError(f"tap '{path}' reads 'input' or 'output' of its module, got io='{io}'")
    if path in SPECIAL_TAPS:
        return path, path, io
    return (path if io == "output" else f"{path}:input"), path, io


def unknown_path_message(model: nn.Module, path: str) -> str:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    children = ", ".join(n for n, _ in model.named_children())
    return f"module path '{path}' not found in {type(model).__name__}.{hint} Top-level children: {children}"


class FeatureTap(nn.Module):
    """Wraps a model; `forward(x)` returns `{"logits": ..., "feature": ..., <tap>: ...}`."""

    def __init__(self, model: nn.Module, taps: Iterable[str | Mapping[str, Any]] = ("logits",)) -> None:
        super().__init__()
        self.model = model
        self._store: dict[str, torch.Tensor] = {}
        self._handles = []
        self.taps: list[str] = []
        modules = dict(model.named_modules())
        for spec in taps:
            key, path, io = parse_tap(spec)
            if key in self.taps:
                continue
            self.taps.append(key)
            if key == "logits":
                continue
            if key == "feature":
                module, io = self.classifier, "input"
            elif path in modules and path:
                module = modules[path]
            else:
                raise ConfigError(unknown_path_message(model, path))
            if io == "input":
                copy = bool(getattr(module, "inplace", False))
                self._handles.append(module.register_forward_pre_hook(self._input_hook(key, copy)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(key)))

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer (looked up when first needed; not a submodule, so not saved twice)."""
        head = self.__dict__.get("_classifier")
        if head is None:
            head = self.__dict__["_classifier"] = find_classifier(self.model)
        return head

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self._store[name] = output

        return hook

    def _input_hook(self, name: str, copy: bool):
        def hook(_module, inputs):
            self._store[name] = inputs[0].clone() if copy else inputs[0]

        return hook

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._store = {}
        logits = self.model(x)
        out = dict(self._store)
        self._store = {}
        out["logits"] = logits
        return out

    @property
    def classifier_weight(self) -> torch.Tensor:
        """Weight `(num_classes, feature_dim)` of the final classifier (Distribution Contraction uses it)."""
        return self.classifier.weight

    @property
    def feature_dim(self) -> int:
        return self.classifier.in_features

    @torch.no_grad()
    def probe(self, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every tap from one dry forward in eval mode (BN statistics untouched)."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = self(example)
        finally:
            self.model.train(was_training)
        shapes = {}
        for key in self.taps:
            value = out.get(key)
            if not isinstance(value, torch.Tensor):
                raise ConfigError(f"tap '{key}' of {type(self.model).__name__} did not produce a tensor")
            shapes[key] = tuple(value.shape[1:])
        return shapes
