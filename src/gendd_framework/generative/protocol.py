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
from gendd_framework.registry import SAMPLERS

ModelFn = Callable[..., Any]
GuidedFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> guided model output
OBJECTIVE_KINDS = ("diffusion", "flow")
REDUCTIONS = ("mean", "none")


class Objective(Protocol):
    """Structural type of a generative training objective (see the module docstring).

    The built-in objectives subclass it for its `training_losses`: one time and one noise per row of
    x0 (drawn from `generator` unless given), the objective's per-row terms (`row_losses`), then the
    batch mean (`reduction='mean'`) or the rows themselves (`'none'`)."""

    kind: str
    learn_sigma: bool
    discrete_time: bool = False  # training times are integer indices (diffusion) or floats (flow)

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> dict[str, torch.Tensor]:
        """dict(loss, <term>...): `t` (broadcastable to x0.shape[:-1]) and `noise` (x0's shape) override
        the draws, so a given `noise` fixes the (noise, x0) coupling (reflow); pass both by keyword."""
        if reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        x0 = as_working(x0)
        rows = x0.shape[:-1]
        if t is None:
            check_generator(generator, x0.device)
            t = self.draw_time(rows, generator, x0)
        else:
            t = torch.as_tensor(t, device=x0.device, dtype=torch.long if self.discrete_time else x0.dtype)
            t = t.expand(rows)
        if noise is None:
            check_generator(generator, x0.device)
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        elif noise.shape != x0.shape:
            raise ConfigError(f"noise has shape {tuple(noise.shape)}, expected x0's {tuple(x0.shape)}")
        out = self.row_losses(model_fn, x0, t, noise.to(device=x0.device, dtype=x0.dtype))
        return {key: value.mean() for key, value in out.items()} if reduction == "mean" else out

    def draw_time(
        self, rows: torch.Size, generator: torch.Generator | None, x0: torch.Tensor
    ) -> torch.Tensor:
        """Training times of shape `rows`, one per row, from the objective's own distribution."""
        raise NotImplementedError

    def row_losses(
        self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-row terms (shape x0.shape[:-1]), `loss` among them, for the given times and noise."""
        raise NotImplementedError


class Sampler(Protocol):
    """Structural type of a sampler (see the module docstring).

    The built-in samplers subclass it for its `sample`: the checks, the start state (given noise or
    a draw, in working precision), `integrate` with the guided model output, and the output dtype."""

    objectives: tuple[str, ...]

    @torch.no_grad()
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
    ) -> torch.Tensor:
        """Samples of `shape` (…, k); `noise` fixes the start state (x_T, or x at flow time 1)."""
        require_kind(self, objective)
        x, out_dtype = initial_state(shape, generator, device, dtype, noise, model_fn, guidance_scale)

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided_model_output(model_fn, x, t, guidance_scale)

        return self.integrate(objective, guided, x, generator).to(out_dtype)

    def integrate(
        self, objective: Any, model: GuidedFn, x: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Carry the start state `x` to a sample; `model(x, t)` is the guided output at head time t."""
        raise NotImplementedError

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


def as_working(x: torch.Tensor) -> torch.Tensor:
    """Generative arithmetic in the input's dtype, but never below float32 (bf16 inputs are upcast)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """A generator must live on the device it draws for (torch refuses otherwise, with a vaguer message)."""
    if generator is not None and generator.device.type != torch.device(device).type:
        raise ConfigError(
            f"the torch.Generator is on {generator.device} but the tensors are on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )


def _parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
