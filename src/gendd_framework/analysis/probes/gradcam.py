"""Grad-CAM (Selvaraju et al., 2017) at a model's last feature stage, for conv maps and ViT tokens.

For a map A (channels c, positions p) and a class score y: weights a_c = mean_p dy/dA_cp and
CAM_p = ReLU(sum_c a_c A_cp), then bilinearly upsampled to the input's height and width. Token models
(timm ViTs) drop their class/register tokens and lay the patch tokens on the patch grid. The layer is
the model family's last feature stage (`models/feature_stages.py`); a ViT that reads only its class
token has no path from the last block's patch outputs to the logits, so its map is read at that block's
input (the patch tokens the last attention mixes into the class token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gendd_framework.analysis.probes.common import ProbeUnavailable, batches, eval_mode, model_device
from gendd_framework.errors import ConfigError
from gendd_framework.models.feature_stages import feature_stages
from gendd_framework.models.tap import parse_tap


@dataclass(frozen=True)
class CamLayer:
    """Where a model's map is read: module path, its `output` or `input`, and for token models the
    number of leading non-patch tokens and the patch grid."""

    path: str
    io: str = "output"
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None
    channels_last: bool = False

    def describe(self) -> str:
        return self.path if self.io == "output" else f"{self.path}:input"


def token_layout(model: nn.Module) -> tuple[int, tuple[int, int]] | None:
    """(prefix tokens, patch grid) of a timm-style ViT, else None."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        return None
    return int(getattr(model, "num_prefix_tokens", 0)), (int(grid[0]), int(grid[1]))


def cam_layer(
    model: nn.Module, input_shape: tuple[int, ...], stage: int = -1, path: str | None = None
) -> CamLayer:
    """The layer Grad-CAM reads: `path` if given, else feature stage `stage` of the model's family."""
    tokens = token_layout(model)
    if path is None:
        try:
            stages = feature_stages(model, input_shape, keys="localization.teacher_layer/student_layer")
        except ConfigError as exc:
            raise ProbeUnavailable(f"Grad-CAM needs a conv map or ViT patch tokens: {exc}") from None
        if not -len(stages) <= stage < len(stages):
            raise ConfigError(f"localization.stage={stage}: {type(model).__name__} has stages {stages}")
        path, io = stages[stage], "output"
        blocks = getattr(model, "blocks", None)
        last_block = isinstance(blocks, nn.Sequential) and path == f"blocks.{len(blocks) - 1}"
        if tokens is not None and getattr(model, "global_pool", None) == "token" and last_block:
            io = "input"
    else:
        _, path, io = parse_tap(path)
    if path not in dict(model.named_modules()):
        raise ConfigError(f"localization layer '{path}' is not a module of {type(model).__name__}")
    prefix, grid = tokens if tokens is not None else (0, None)
    nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"  # timm Swin-style stages
    return CamLayer(path, io, prefix, grid, nhwc)


def _spatial(act: torch.Tensor, layer: CamLayer) -> torch.Tensor:
    """(B, C, H, W) from a conv map or a token sequence."""
    if act.dim() == 4:
        return act.permute(0, 3, 1, 2) if layer.channels_last else act
    if act.dim() == 3 and layer.grid is not None:
        patches = act[:, layer.prefix_tokens :]
        h, w = layer.grid
        if patches.shape[1] != h * w:
            raise ProbeUnavailable(
                f"layer '{layer.describe()}' has {act.shape[1]} tokens, not {layer.prefix_tokens} + {h}x{w}"
            )
        return patches.transpose(1, 2).reshape(len(act), -1, h, w)
    raise ProbeUnavailable(
        f"layer '{layer.describe()}' gives shape {tuple(act.shape[1:])}, not a spatial map or patch tokens"
    )


def cam_from(act: torch.Tensor, grad: torch.Tensor, layer: CamLayer) -> torch.Tensor:
    """Grad-CAM maps (B, H, W) at the layer's own resolution."""
    a, g = _spatial(act, layer), _spatial(grad, layer)
    weights = g.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * a).sum(1))


class _Capture:
    """Replaces the read activation by a leaf tensor, so the gradient reaches it even in a frozen
    model and nothing accumulates in parameter `.grad`s; returns a clone, so later in-place ops
    (ReLU(inplace)) act on the clone, not on the leaf."""

    def __init__(self, layer: CamLayer) -> None:
        self.layer, self.act = layer, None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise ProbeUnavailable(f"layer '{self.layer.describe()}' does not pass a single tensor")
        self.act = t.detach().requires_grad_(True)
        return self.act.clone()

    def attach(self, module: nn.Module):
        if self.layer.io == "input":
            return module.register_forward_pre_hook(lambda _m, args: (self(args[0]), *args[1:]))
        return module.register_forward_hook(lambda _m, _args, out: self(out))


def grad_cam(
    model: nn.Module, layer: CamLayer, inputs: torch.Tensor, classes: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Grad-CAM of `classes` (one per input) at `layer`, upsampled to the inputs' (H, W): (N, H, W).

    Samples are independent in eval mode, so one backward of the summed class scores gives every
    sample's gradient."""
    module = dict(model.named_modules())[layer.path]
    device = model_device(model)
    size = tuple(inputs.shape[-2:])
    capture = _Capture(layer)
    maps = []
    with eval_mode(model):
        for part in batches(len(inputs), batch_size):
            handle = capture.attach(module)
            try:
                with torch.enable_grad():
                    logits = model(inputs[part].to(device))
                    if capture.act is None:
                        raise ProbeUnavailable(f"layer '{layer.describe()}' is not run by the forward pass")
                    score = logits.float().gather(1, classes[part].to(device).view(-1, 1)).sum()
                    (grad,) = torch.autograd.grad(score, capture.act, allow_unused=True)
            finally:
                handle.remove()
            if grad is None:
                raise ProbeUnavailable(f"the logits do not depend on layer '{layer.describe()}'")
            cam = cam_from(capture.act.detach(), grad, layer)
            if cam.shape[-2:] != size:
                cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            maps.append(cam.float().cpu())
    return torch.cat(maps)
