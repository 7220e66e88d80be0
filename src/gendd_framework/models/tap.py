"""FeatureTap: named tensors from any model by forward hooks, so models need no edits.

`logits` is the model output, `feature` the input of its final linear classifier (the pooled penultimate
vector), and any other name is a module path (`layer3`, `features.4`). The classifier is found once,
the same way for every family: timm's `get_classifier()`, else the last `nn.Linear` in module order.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gendd_framework.errors import ConfigError


def find_classifier(model: nn.Module) -> nn.Linear:
    """The final linear layer that maps the pooled feature to logits."""
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


class FeatureTap(nn.Module):
    """Wraps a model; `forward(x)` returns `{"logits": ..., "feature": ..., <path>: ...}`."""

    def __init__(self, model: nn.Module, paths: Iterable[str] = ("feature",)) -> None:
        super().__init__()
        self.model = model
        # a plain attribute (not a submodule), so the classifier is not saved twice in state dicts
        self.__dict__["classifier"] = find_classifier(model)
        self._store: dict[str, torch.Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for path in dict.fromkeys(paths):
            if path == "logits":
                continue
            if path == "feature":
                self._handles.append(self.classifier.register_forward_hook(self._save_input("feature")))
                continue
            if path not in modules:
                raise ConfigError(
                    f"module path '{path}' not found in {type(model).__name__}; "
                    f"top-level children: {', '.join(n for n, _ in model.named_children())}"
                )
            self._handles.append(modules[path].register_forward_hook(self._save_output(path)))

    def _save_input(self, name: str):
        def hook(_module, inputs, _output):
            self._store[name] = inputs[0]

        return hook

    def _save_output(self, name: str):
        def hook(_module, _inputs, output):
            self._store[name] = output

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
