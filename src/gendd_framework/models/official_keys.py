"""The official (RepDistiller / mdistiller) parameter names of the CIFAR zoo, as data.

The zoo keeps its own module names (`stem`, `layers`, `units`, ...) so this framework's checkpoints,
run directories and tap paths stay valid; the CIFAR distillation checkpoints (`ckpt_epoch_240.pth`
with a `model` state dict) use the upstream names (`conv1`, `bn1`, `layer1.0.conv1`, ...). Both
upstreams share one naming (mdistiller's CIFAR models are RepDistiller's files), so one map per family
serves both.

Each family is described by tables: the model's top-level modules, and for every block the block's
sub-modules, our path -> the official path. `official_module_map(model)` expands them over the model's
blocks (block counts come from the model) into a full module map; `checkpoints.py` turns it into a
key map. A module of the model that no table covers is an error (tests check every architecture
against the keys the official code produces).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from gendd_framework.models.cifar_mobilenetv2 import MobileNetV2Cifar
from gendd_framework.models.cifar_resnet import BasicBlock, Bottleneck, CifarResNet
from gendd_framework.models.cifar_shufflenet import ShuffleNetV1, ShuffleNetV2, ShuffleV2Down
from gendd_framework.models.cifar_vgg import CifarVGG
from gendd_framework.models.cifar_wrn import WideResNet

# ----------------------------------------------------------------------------- ResNets ---
# resnet.py (resnet8 ... resnet32x4) and resnetv2.py (ResNet18/34/50) differ in the shortcut and
# classifier names only.
RESNET_TOP = {
    "resnet": {"stem.0": "conv1", "stem.1": "bn1", "fc": "fc"},
    "resnetv2": {"stem.0": "conv1", "stem.1": "bn1", "fc": "linear"},
}
RESNET_SHORTCUT = {
    "resnet": {"shortcut.0": "downsample.0", "shortcut.1": "downsample.1"},
    "resnetv2": {"shortcut.0": "shortcut.0", "shortcut.1": "shortcut.1"},
}
RESNET_BLOCK = {
    BasicBlock: {"body.0": "conv1", "body.1": "bn1", "body.3": "conv2", "body.4": "bn2"},
    Bottleneck: {
        "body.0": "conv1",
        "body.1": "bn1",
        "body.3": "conv2",
        "body.4": "bn2",
        "body.6": "conv3",
        "body.7": "bn3",
    },
}

# ---------------------------------------------------------------------------- WRN ---------
WRN_TOP = {"conv1": "conv1", "bn": "bn1", "fc": "fc"}
WRN_BLOCK = {"bn1": "bn1", "conv1": "conv1", "bn2": "bn2", "conv2": "conv2", "shortcut": "convShortcut"}

# ---------------------------------------------------------------------------- VGG ---------
# features.<2i> is the official block<i> with the same sub-module indices; the pools hold no tensors.
VGG_TOP = {"classifier": "classifier"}

# ---------------------------------------------------------------------------- MobileNetV2 -
# `features` = [stem conv, BN, ReLU, inverted residuals..., head conv, BN, ReLU]; upstream splits it
# into conv1, blocks.<group>.<i> (same inner `conv.<k>` names) and conv2, and wraps the classifier.
MOBILENETV2_STEM = {"0": "conv1.0", "1": "conv1.1"}
MOBILENETV2_HEAD = {"0": "conv2.0", "1": "conv2.1"}  # offsets after the last inverted residual
MOBILENETV2_TOP = {"classifier": "classifier.0"}

# ---------------------------------------------------------------------------- ShuffleNets -
SHUFFLEV1_TOP = {"stem.0.0": "conv1", "stem.0.1": "bn1", "fc": "linear"}
SHUFFLEV1_UNIT = {
    "conv1.0": "conv1",
    "conv1.1": "bn1",
    "conv2.0": "conv2",
    "conv2.1": "bn2",
    "conv3.0": "conv3",
    "conv3.1": "bn3",
}
SHUFFLEV2_TOP = {
    "stem.0.0": "conv1",
    "stem.0.1": "bn1",
    "head.0.0": "conv2",
    "head.0.1": "bn2",
    "fc": "linear",
}
SHUFFLEV2_DOWN = {
    "left.0.0": "conv1",
    "left.0.1": "bn1",
    "left.1.0": "conv2",
    "left.1.1": "bn2",
    "right.0.0": "conv3",
    "right.0.1": "bn3",
    "right.2.0": "conv4",
    "right.2.1": "bn4",
    "right.3.0": "conv5",
    "right.3.1": "bn5",
}
SHUFFLEV2_UNIT = {
    "branch.0.0": "conv1",
    "branch.0.1": "bn1",
    "branch.2.0": "conv2",
    "branch.2.1": "bn2",
    "branch.3.0": "conv3",
    "branch.3.1": "bn3",
}

# (our prefix, official prefix, sub-module table or None for "same sub-paths")
Entry = tuple[str, str, dict[str, str] | None]


def _staged(depths: list[int]) -> Iterator[tuple[int, int, int]]:
    """(flat index, stage, index in stage) over blocks laid out stage after stage."""
    flat = 0
    for stage, depth in enumerate(depths):
        for j in range(depth):
            yield flat, stage, j
            flat += 1


def _resnet(model: CifarResNet) -> Iterator[Entry]:
    yield "", "", RESNET_TOP[model.layout]
    for flat, stage, j in _staged(model.stage_depths):
        block = model.layers[flat]
        yield (
            f"layers.{flat}",
            f"layer{stage + 1}.{j}",
            {**RESNET_BLOCK[type(block)], **RESNET_SHORTCUT[model.layout]},
        )


def _wrn(model: WideResNet) -> Iterator[Entry]:
    yield "", "", WRN_TOP
    for flat, stage, j in _staged(model.stage_depths):
        yield f"blocks.{flat}", f"block{stage + 1}.layer.{j}", WRN_BLOCK


def _vgg(model: CifarVGG) -> Iterator[Entry]:
    yield "", "", VGG_TOP
    for i in range(0, len(model.features), 2):
        yield f"features.{i}", f"block{i // 2}", None


def _mobilenetv2(model: MobileNetV2Cifar) -> Iterator[Entry]:
    yield "", "", MOBILENETV2_TOP
    yield "features", "", MOBILENETV2_STEM
    stem = model.STEM
    for flat, group, j in _staged(model.group_sizes):
        yield f"features.{stem + flat}", f"blocks.{group}.{j}", None
    head = stem + sum(model.group_sizes)
    yield "features", "", {str(head + int(k)): v for k, v in MOBILENETV2_HEAD.items()}


def _shufflev1(model: ShuffleNetV1) -> Iterator[Entry]:
    yield "", "", SHUFFLEV1_TOP
    for flat, stage, j in _staged(model.stage_depths):
        yield f"units.{flat}", f"layer{stage + 1}.{j}", SHUFFLEV1_UNIT


def _shufflev2(model: ShuffleNetV2) -> Iterator[Entry]:
    yield "", "", SHUFFLEV2_TOP
    for flat, stage, j in _staged(model.stage_depths):
        table = SHUFFLEV2_DOWN if isinstance(model.units[flat], ShuffleV2Down) else SHUFFLEV2_UNIT
        yield f"units.{flat}", f"layer{stage + 1}.{j}", table


FAMILIES = {
    CifarResNet: _resnet,
    WideResNet: _wrn,
    CifarVGG: _vgg,
    MobileNetV2Cifar: _mobilenetv2,
    ShuffleNetV1: _shufflev1,
    ShuffleNetV2: _shufflev2,
}


def has_official_names(model: nn.Module) -> bool:
    return type(model) in FAMILIES


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def official_module_map(model: nn.Module) -> dict[str, str]:
    """Our module path -> the official one, for every module that holds parameters or buffers."""
    entries = list(FAMILIES[type(model)](model))
    out: dict[str, str] = {}
    for path, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)) and not any(
            True for _ in module.buffers(recurse=False)
        ):
            continue
        out[path] = _resolve(path, entries, type(model).__name__)
    return out


def _resolve(path: str, entries: list[Entry], family: str) -> str:
    for ours, official, table in entries:
        if ours and path != ours and not path.startswith(ours + "."):
            continue
        rest = path[len(ours) :].lstrip(".") if ours else path
        if table is None:
            return _join(official, rest)
        if rest in table:
            return _join(official, table[rest])
    raise KeyError(f"{family}: no official name for module '{path}' (extend models/official_keys.py)")
