"""The Objective/Sampler protocol: the only surface through which GenDD (and any stage) talks to a
generative objective and its sampler, so diffusion and flow matching swap by config alone.

Objective (registered in OBJECTIVES)::

    kind: str            # "diffusion" | "flow": which samplers can integrate/denoise it
    learn_sigma: bool    # the head outputs 2k channels (prediction ; variance) instead of k
    training_losses(model_fn, x0, noise=None) -> {"loss": scalar, <term>: scalar, ...}

`x0` is (…, k) with any leading rows; `noise` (same shape) fixes the noise drawn per row, i.e. the
(noise, x0) coupling; reflow trains on given pairs this way. Every entry besides `loss` is a named term
for logging (diffusion: `mse`, `vb`; flow: `mse`, or `pseudo_huber` and `mse`). Objectives also accept
`generator=` and keyword `t=` overrides; pass `noise` by keyword.

Sampler (registered in SAMPLERS)::

    objectives: tuple[str, ...]   # the objective kinds it can sample
    sample(objective, model_fn, shape, *, guidance_scale, generator, device, dtype=None, noise=None)
    nfe(objective) -> int          # model_fn calls per `sample` call

`noise` fixes the initial state (x_T for diffusion, x at t=1 for flow) and must have `shape`; otherwise
it is drawn from `generator` (which must live on `device`). A sampler refuses an objective whose kind
it does not list (ConfigError).

Model-call contract, shared by both kinds::

    model_fn(x, t)               -> output                # conditional model
    model_fn(x, t, guided=True)  -> (output_c, output_u)  # conditional and unconditional, same x

`t` is what the head embeds: original integer indices 0..T−1 for diffusion, `t·time_scale` (floats in
[0, 1000] by default) for flow. Classifier-free guidance combines the first k channels as
out_u + s·(out_c − out_u) (`guided_model_output`); with s = 1 the unconditional branch never runs.

NFE convention: `nfe` counts model_fn calls per sample batch. A guided call evaluates cond and uncond
in ONE batched head call (`MLPAdaLNHead.make_model_fn`), so guidance does not double it; a model that
ran the two branches separately would cost 2 evaluations per guided call. The NS samples of an image
are batched too, so `nfe` is also the number of head calls per `GenDD.predict`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from gendd_framework.errors import ConfigError
from gendd_framework.generative.diffusion import as_working, check_generator
from gendd_framework.registry import SAMPLERS

ModelFn = Callable[..., Any]
OBJECTIVE_KINDS = ("diffusion", "flow")


class Objective(Protocol):
    """Structural type of a generative training objective (see the module docstring)."""

    kind: str
    learn_sigma: bool

    def training_losses(
        self, model_fn: ModelFn, x0: torch.Tensor, noise: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]: ...


class Sampler(Protocol):
    """Structural type of a sampler (see the module docstring)."""

    objectives: tuple[str, ...]

    def sample(
        self,
        objective: Objective,
        model_fn: ModelFn,
        shape: Sequence[int],
        *,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def nfe(self, objective: Objective) -> int: ...


def check_objective(objective: Any, name: str) -> None:
    """Fail at build (not mid-training) when an objective does not implement the protocol."""
    kind = getattr(objective, "kind", None)
    if kind not in OBJECTIVE_KINDS:
        raise ConfigError(f"objective '{name}' must have kind in {OBJECTIVE_KINDS}, got {kind!r}")
    if not isinstance(getattr(objective, "learn_sigma", None), bool):
        raise ConfigError(f"objective '{name}' must have a bool learn_sigma")
    losses = getattr(objective, "training_losses", None)
    params = _parameters(losses) if callable(losses) else {}
    if params is not None and "noise" not in params:
        raise ConfigError(f"objective '{name}' needs training_losses(model_fn, x0, noise=None)")


def check_sampler(sampler: Any, name: str) -> None:
    """Fail at build when a sampler does not implement the protocol."""
    kinds = getattr(sampler, "objectives", None)
    if not isinstance(kinds, tuple) or not set(kinds) <= set(OBJECTIVE_KINDS):
        raise ConfigError(f"sampler '{name}' must list the objective kinds it samples in `objectives`")
    for method in ("sample", "nfe"):
        if not callable(getattr(sampler, method, None)):
            raise ConfigError(f"sampler '{name}' has no {method}() method")


def samplers_for(kind: str) -> list[str]:
    """Registered sampler names whose class declares it can sample objectives of `kind`."""
    return [n for n in SAMPLERS.names() if kind in getattr(SAMPLERS.get(n), "objectives", ())]


def require_kind(sampler: Any, objective: Any, sampler_name: str = "", objective_name: str = "") -> None:
    """One-line ConfigError when `sampler` cannot sample `objective`'s kind, naming the samplers that can."""
    kind = getattr(objective, "kind", None)
    if kind in getattr(sampler, "objectives", ()):
        return
    sname = sampler_name or type(sampler).__name__
    oname = objective_name or type(objective).__name__
    fits = ", ".join(samplers_for(str(kind))) or "none registered"
    raise ConfigError(
        f"sampler '{sname}' samples {'/'.join(sampler.objectives)} objectives but objective '{oname}' is a "
        f"{kind} objective; use a sampler that fits: {fits} (e.g. method/sampler={fits.split(', ')[0]})"
    )


def guided_model_output(
    model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, guidance_scale: float = 1.0
) -> torch.Tensor:
    """Model output for x under classifier-free guidance (scale 1: a single conditional call).

    Only the first k = x.shape[-1] channels (the ε/x0/velocity prediction) are guided; any further
    channels (learned variance) are taken from the conditional output.
    """
    if guidance_scale == 1.0:
        return model_fn(x, t)
    out_c, out_u = model_fn(x, t, guided=True)
    k = x.shape[-1]
    guided = out_u[..., :k] + guidance_scale * (out_c[..., :k] - out_u[..., :k])
    return torch.cat([guided, out_c[..., k:]], dim=-1)


def initial_state(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    noise: torch.Tensor | None,
    model_fn: ModelFn,
    guidance_scale: float,
) -> tuple[torch.Tensor, torch.dtype]:
    """(start state in working precision (>= float32), dtype of the returned sample), with checks."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise ConfigError("sample shape needs at least a channel dimension (…, k)")
    if guidance_scale != 1.0 and not accepts_guided(model_fn):
        raise ConfigError(
            f"guidance_scale={guidance_scale} needs a model_fn accepting guided=True and returning "
            "(cond_output, uncond_output), e.g. MLPAdaLNHead.make_model_fn(cond)"
        )
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ConfigError(f"initial noise has shape {tuple(noise.shape)}, expected {shape}")
        check_generator(generator, noise.device)
        return as_working(noise), noise.dtype
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    check_generator(generator, device)
    out_dtype = dtype or torch.float32
    x = torch.randn(shape, generator=generator, device=device, dtype=working_dtype(out_dtype))
    return x, out_dtype


def accepts_guided(model_fn: ModelFn) -> bool:
    """Whether model_fn can be called with guided=True (unknown signatures are given the benefit)."""
    params = _parameters(model_fn)
    if params is None:
        return True  # cannot tell; let the call decide
    return "guided" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
