"""Speed options (`trainer.speed`): applied to a method's models and to data loaders, never to the maths.

The keys, defaults and allowed values are `schema.SpeedConfig` / `schema.CompileOptions`.

Every option is off by default, so the default run is plain fp32 eager PyTorch (mixed precision is the
separate `trainer.precision`). What each option does and when it pays off:

- `channels_last`: student and teacher weights in NHWC and every 4-D model input converted on entry (a
  forward pre-hook), the layout oneDNN/cuDNN convolutions prefer under autocast. 4-D inputs only;
  no effect on MLPs and ViTs.
- `compile: {student, teacher, head, mode, backend, dynamic, fullgraph}`: `nn.Module.compile` in place
  (state-dict keys stay unchanged, so checkpoints are interchangeable with eager runs). The first steps
  pay the compilation; shapes that change (the last eval batch) recompile once.
- `teacher_mode`: `no_grad` (default) runs the frozen teacher under `torch.no_grad()`; `inference` uses
  `torch.inference_mode()` and returns clones (normal tensors terms may combine with student tensors in
  autograd-recorded ops). The clones copy every tap each step and measured no faster on CPU, so
  `inference` is opt-in (it may help on GPU).
- `head_checkpointing`: recompute the generative head's blocks in backward (activation memory for
  about one extra head forward); only methods with a `head` exposing `grad_checkpointing` use it.
- `persistent_workers`: keep train-loader workers alive across epochs. Off by default because
  persistent workers carry their RNG across epochs, so a resumed run draws different augmentations
  than an uninterrupted one (eval loaders are always persistent when they have workers).
- `prefetch_factor`: batches each worker loads ahead (torch default 2; needs `num_workers` > 0).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gendd_framework.schema import CompileOptions, SpeedConfig

LOG = logging.getLogger("gendd_framework")


# -- models -----------------------------------------------------------------------------------------
def _to_channels_last(module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def use_channels_last(model: nn.Module) -> nn.Module:
    """NHWC weights and a pre-hook converting 4-D inputs: the model then sees one layout end to end."""
    if getattr(model, "_gendd_channels_last", False):
        return model
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_to_channels_last)
    model._gendd_channels_last = True
    return model


def compile_module(module: nn.Module, options: CompileOptions) -> nn.Module:
    """`module.compile(...)` in place (once): the module, its parameters and state-dict keys stay."""
    if getattr(module, "_gendd_compiled", False):
        return module
    module.compile(**options.kwargs())
    module._gendd_compiled = True
    return module


def apply_speed(method: nn.Module, speed: SpeedConfig | Mapping[str, Any] | None) -> list[str]:
    """Apply the model-side options to a built method (after `.to(device)`); returns what was applied.

    Works on any `Method`: the student is `method.student.model` (or `method.student`), the teacher
    `method.teacher.model`, the generative head `method.head`; parts a method lacks are skipped, so one
    `trainer.speed` serves every stage (a teacher-training stage has no teacher and no head)."""
    speed = SpeedConfig.from_mapping(speed)
    student = _inner(getattr(method, "student", None))
    teacher = _inner(getattr(method, "teacher", None))
    head = getattr(method, "head", None)
    applied: list[str] = []
    if hasattr(method, "teacher_grad_mode"):
        method.teacher_grad_mode = speed.teacher_mode
        if teacher is not None:
            applied.append(f"teacher_mode={speed.teacher_mode}")
    if speed.channels_last:
        for name, model in (("student", student), ("teacher", teacher)):
            if model is not None:
                use_channels_last(model)
                applied.append(f"channels_last:{name}")
    if speed.head_checkpointing and head is not None and hasattr(head, "grad_checkpointing"):
        head.grad_checkpointing = True
        applied.append("head_checkpointing")
    for name, model in (("student", student), ("teacher", teacher), ("head", head)):
        if getattr(speed.compile, name) and model is not None:
            compile_module(model, speed.compile)
            applied.append(f"compile:{name}({speed.compile.mode})")
    return applied


def _inner(tap: nn.Module | None) -> nn.Module | None:
    """The raw model inside a FeatureTap (hooks stay on its submodules), or the module itself."""
    if tap is None:
        return None
    inner = getattr(tap, "model", None)
    return inner if isinstance(inner, nn.Module) else tap


# -- data loaders -----------------------------------------------------------------------------------
def loader_options(
    num_workers: int,
    pin_memory: bool | None,
    *,
    train: bool,
    device: torch.device,
    speed: SpeedConfig | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """DataLoader keyword arguments for worker count, pinning, persistence and prefetching.

    `pin_memory=None` pins exactly when training on CUDA. Eval loaders with workers persist; train
    loaders persist only with `trainer.speed.persistent_workers` (exact resume is then lost: a resumed
    run's workers start a fresh RNG stream where the uninterrupted run's workers continued theirs)."""
    speed = SpeedConfig.from_mapping(speed)
    options: dict[str, Any] = {
        "num_workers": num_workers,
        "pin_memory": device.type == "cuda" if pin_memory is None else bool(pin_memory),
        "persistent_workers": num_workers > 0 and (not train or speed.persistent_workers),
    }
    if speed.prefetch_factor is not None and num_workers > 0:
        options["prefetch_factor"] = speed.prefetch_factor
    return options
