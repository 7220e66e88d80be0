"""Default feature-map taps per model family: the official stage lists, and their pre-activation maps.

Feature-distillation methods read intermediate maps ("stages"). The CIFAR zoo names them itself
(`stage_taps(preact)` on each model): the maps the RepDistiller/mdistiller `forward(is_feat=True)`
returns, without the stem (and without the pooled vector, which is the `feature` tap), and with
`preact=True` the maps before each stage's final ReLU. torchvision ResNets read `layer1..layer4` (their
preact: the input of each stage's last ReLU). Any other family names its trunk (the modules the input
flows through in order) and one dry forward finds, for each spatial resolution, the last trunk module
producing it; where that module is a ReLU, its input is the preact map. timm models use their own
`feature_info`. A family that is not known fails with a message naming the config keys that set the
layers by module path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gendd_framework.errors import ConfigError

_MEMO: dict[tuple, list[str]] = {}  # (family, parameter shapes, input shape) -> stages: one probe each
MAX_STAGES = 4  # deeper trunks (VGG's five blocks, torchvision MobileNetV2) keep their last four stages
POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout)


def _trunk_by_class(model: nn.Module) -> tuple[str, ...] | None:
    """Module paths the input flows through (a Sequential expands to its children), by model family."""
    from gendd_framework.models.small import SmallCNN

    own = getattr(model, "feature_trunk", None)  # a plugin model may name its own trunk
    if own is not None:
        return tuple(own)
    table: list[tuple[type, tuple[str, ...]]] = [(SmallCNN, ("features",))]
    try:
        import torchvision.models as tvm

        table += [
            (tvm.ResNet, ("layer1", "layer2", "layer3", "layer4")),
            (tvm.MobileNetV2, ("features",)),
            (tvm.MobileNetV3, ("features",)),
        ]
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    for cls, trunk in table:
        if isinstance(model, cls):
            return trunk
    return None


def _candidates(model: nn.Module, trunk: Sequence[str]) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    out = []
    for path in trunk:
        module = modules[path]
        if isinstance(module, nn.Sequential):
            out += [(f"{path}.{name}", child) for name, child in module.named_children()]
        else:
            out.append((path, module))
    return [(p, m) for p, m in out if not isinstance(m, POOLING)]


@torch.no_grad()
def _stage_ends(model: nn.Module, trunk: Sequence[str], input_shape: Sequence[int]) -> list[str]:
    candidates = _candidates(model, trunk)
    sizes: dict[str, tuple[int, ...]] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, p=path: sizes.__setitem__(p, tuple(out.shape)))
        for path, module in candidates
    ]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model(torch.zeros(2, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    ends: list[str] = []
    last_size = None
    for path, _ in candidates:
        shape = sizes.get(path)
        if shape is None or len(shape) != 4:
            continue
        if shape[2:] == last_size:
            ends[-1] = path
        else:
            ends.append(path)
            last_size = shape[2:]
    return ends[-MAX_STAGES:]


def _timm_stages(model: nn.Module) -> list[str] | None:
    info = getattr(model, "feature_info", None)
    if not info:
        return None
    entries = [dict(e) for e in info]
    if len(entries) > 1 and entries[0].get("reduction", 0) < entries[1].get("reduction", 0) <= 4:
        entries = entries[1:]  # the stem
    return [str(e["module"]) for e in entries if e.get("module")][-MAX_STAGES:]


def _probed_stages(model: nn.Module, trunk: tuple[str, ...], input_shape: Sequence[int] | None, keys: str):
    if input_shape is None:
        raise ConfigError(
            f"default feature layers of {type(model).__name__} are found by a dry forward: build the "
            f"method with input_shape, or set {keys} to module paths"
        )
    memo_key = (
        type(model).__qualname__,
        tuple(trunk),
        tuple((name, tuple(p.shape)) for name, p in model.named_parameters()),
        tuple(input_shape),
    )
    if memo_key not in _MEMO:
        _MEMO[memo_key] = _stage_ends(model, trunk, input_shape)
    stages = list(_MEMO[memo_key])
    if not stages:
        raise ConfigError(f"{type(model).__name__} produced no 4-D feature maps; set {keys} to module paths")
    return stages


def _torchvision_resnet_preact(model: nn.Module) -> list[str] | None:
    try:
        import torchvision.models as tvm
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(model, tvm.ResNet):
        return None
    # each block applies its one in-place `relu` last to the residual sum: the tap reads its input
    # before the call (FeatureTap copies the input of in-place modules), so the last call's is kept
    return [f"layer{i}.{len(getattr(model, f'layer{i}')) - 1}.relu:input" for i in range(1, 5)]


def feature_stages(
    model: nn.Module, input_shape: Sequence[int] | None, keys: str = "the layer keys", preact: bool = False
) -> list[str]:
    """Tap names of the model's stage maps, shallow to deep (at most `MAX_STAGES`): the official
    `is_feat` maps, or with `preact` the maps before each stage's final ReLU.

    `keys` names the config keys a user sets instead (used in errors). `preact` on a family without
    pre-activation taps raises; `preact_stages` returns None there instead.
    """
    stages = preact_stages(model, input_shape, keys) if preact else None
    if preact and stages is None:
        raise ConfigError(
            f"{type(model).__name__} has no known pre-activation stage maps: set {keys} to module paths "
            "(e.g. '<block>.relu:input')"
        )
    return stages if stages is not None else _post_stages(model, input_shape, keys)


def _post_stages(model: nn.Module, input_shape: Sequence[int] | None, keys: str) -> list[str]:
    named = getattr(model, "stage_taps", None)
    if callable(named):
        return list(named(preact=False))[-MAX_STAGES:]
    trunk = _trunk_by_class(model)
    if trunk is None:
        stages = _timm_stages(model)
        if stages:
            return stages
        children = ", ".join(n for n, _ in model.named_children())
        raise ConfigError(
            f"no default feature layers for {type(model).__name__}: set {keys} to module paths "
            f"(top-level children: {children})"
        )
    return _probed_stages(model, trunk, input_shape, keys)


def preact_stages(
    model: nn.Module, input_shape: Sequence[int] | None, keys: str = "the layer keys"
) -> list[str] | None:
    """The pre-activation versions of the stage maps, or None when the family defines none."""
    named = getattr(model, "stage_taps", None)
    if callable(named):
        return list(named(preact=True))[-MAX_STAGES:]
    tv = _torchvision_resnet_preact(model)
    if tv is not None:
        return tv
    trunk = _trunk_by_class(model)
    if trunk is None:
        return None
    modules = dict(model.named_modules())
    stages = _probed_stages(model, trunk, input_shape, keys)
    if all(isinstance(modules.get(s), nn.ReLU) for s in stages):
        return [f"{s}:input" for s in stages]
    return None
