"""Flow matching (rectified flow) for GenDD's head, and its ODE samplers (Euler, Heun, one step).

Path and target (t ∈ [0, 1], t = 0 data, t = 1 noise)::

    x_t = (1 − t)·x0 + t·ε,   ε ~ N(0, I),   v = dx_t/dt = ε − x0   (the head predicts v)

Sampling integrates dx/dt = v̂(x, t) from t = 1 (pure noise) to t = 0 on a uniform grid; with a
straight (rectified) flow one Euler step already lands on x0 = x1 − v̂(x1, 1). The head embeds
`t·time_scale` (default 1000), so its sinusoidal embedding sees the same range as diffusion's
integer indices 0..999 and the same head class serves both objectives. Implements the Objective and
Sampler protocol of generative/protocol.py (kind "flow", learn_sigma False); layout as in diffusion.py:
channels last, any leading shape is a batch of independent rows, one t per row in training.

Time sampling: `uniform`; `logit_normal` (t = sigmoid(m + s·n), Esser et al. 2024); `u_shaped`, the
U-shaped distribution of Lee, Lin & Fanti, "Improving the Training of Rectified Flows" (NeurIPS 2024):
an equal mixture of the density ∝ e^{a·t} on [0, 1] and its mirror image, i.e. density
p(t) = a·cosh(a(t − ½)) / (2·sinh(a/2)), a = 4 there. It is sampled exactly by its inverse CDF
t = ½ + asinh((2u − 1)·sinh(a/2)) / a. It puts weight on both ends, where one-step errors come from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gendd_framework.errors import ConfigError
from gendd_framework.generative.protocol import GuidedFn, ModelFn, Objective, Sampler
from gendd_framework.registry import OBJECTIVES, SAMPLERS

TIME_SAMPLINGS = ("uniform", "logit_normal", "u_shaped")
FLOW_LOSSES = ("mse", "pseudo_huber")
HUBER_C_PER_SQRT_DIM = 0.00054  # c = 0.00054·sqrt(d) (Song & Dhariwal 2023, kept by Lee et al. 2024)
VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]  # (x, flow time) -> guided velocity


def u_shaped_density(t: torch.Tensor, a: float = 4.0) -> torch.Tensor:
    """p(t) = a·cosh(a(t − ½)) / (2·sinh(a/2)) on [0, 1]: the U-shaped timestep density."""
    return a * torch.cosh(a * (t - 0.5)) / (2.0 * math.sinh(a / 2.0))


def u_shaped_icdf(u: torch.Tensor, a: float = 4.0) -> torch.Tensor:
    """Inverse CDF of `u_shaped_density`: F(t) = (sinh(a(t − ½)) + sinh(a/2)) / (2·sinh(a/2))."""
    return 0.5 + torch.asinh((2.0 * u - 1.0) * math.sinh(a / 2.0)) / a


@OBJECTIVES.register("flow_matching", aliases=["flow"])
class FlowMatching(Objective):
    """Flow-matching / rectified-flow objective: regress the velocity ε − x0 on the linear path.

    Args:
        time_sampling: 'uniform', 'logit_normal' or 'u_shaped' (how training t is drawn).
        logit_mean, logit_std: the logit-normal's m and s.
        u_shape_a: the U-shaped density's a (4 as in Lee et al.).
        loss: 'mse' (mean over all elements) or 'pseudo_huber' (per row √(‖v̂ − v‖² + c²) − c).
        huber_c: pseudo-Huber c; None = 0.00054·√k for token dimension k.
        time_scale: the head sees t·time_scale (1000: the range of diffusion's indices).
    """

    kind = "flow"
    learn_sigma = False

    def __init__(
        self,
        time_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        u_shape_a: float = 4.0,
        loss: str = "mse",
        huber_c: float | None = None,
        time_scale: float = 1000.0,
    ) -> None:
        if time_sampling not in TIME_SAMPLINGS:
            raise ConfigError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
        if loss not in FLOW_LOSSES:
            raise ConfigError(f"flow loss must be one of {FLOW_LOSSES}, got {loss!r}")
        if logit_std <= 0 or u_shape_a <= 0 or time_scale <= 0:
            raise ConfigError("logit_std, u_shape_a and time_scale must be > 0")
        if huber_c is not None and huber_c <= 0:
            raise ConfigError(f"huber_c must be > 0 (or null for 0.00054·sqrt(k)), got {huber_c}")
        self.time_sampling = time_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.u_shape_a = float(u_shape_a)
        self.loss = loss
        self.huber_c = None if huber_c is None else float(huber_c)
        self.time_scale = float(time_scale)

    def sample_time(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Training times t ∈ [0, 1] of `shape`, drawn from the configured distribution."""
        if self.time_sampling == "logit_normal":
            n = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
            return torch.sigmoid(self.logit_mean + self.logit_std * n)
        u = torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)
        return u if self.time_sampling == "uniform" else u_shaped_icdf(u, self.u_shape_a)

    def draw_time(
        self, rows: torch.Size, generator: torch.Generator | None, x0: torch.Tensor
    ) -> torch.Tensor:
        return self.sample_time(rows, generator, x0.device, x0.dtype)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the head embeds for flow time t."""
        return t * self.time_scale

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 − t)·x0 + t·ε, t of shape x.shape[:-1] (or broadcastable)."""
        tt = t.unsqueeze(-1)
        return (1.0 - tt) * x0 + tt * noise

    def velocity(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The k predicted velocity channels, checking the head was built without variance channels."""
        if output.shape[-1] != x.shape[-1]:
            raise ConfigError(
                f"the model returned {output.shape[-1]} channels but the flow objective expects "
                f"{x.shape[-1]} (token_dim, no variance channels); build the head with learn_sigma=false"
            )
        return output.to(x.dtype)

    def huber_constant(self, k: int) -> float:
        return self.huber_c if self.huber_c is not None else HUBER_C_PER_SQRT_DIM * math.sqrt(k)

    def row_losses(
        self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """dict(loss, mse[, pseudo_huber]) per row: the velocity regression at the rows' t and ε."""
        x_t = self.interpolate(x0, noise, t)
        err = self.velocity(model_fn(x_t, self.model_time(t)), x_t) - (noise - x0)
        out = {"mse": err.pow(2).mean(-1)}
        if self.loss == "pseudo_huber":
            c = self.huber_constant(x0.shape[-1])
            out["pseudo_huber"] = torch.sqrt(err.pow(2).sum(-1) + c * c) - c
            out["loss"] = out["pseudo_huber"]
        else:
            out["loss"] = out["mse"]
        return out

    def __repr__(self) -> str:
        return (
            f"FlowMatching(time_sampling={self.time_sampling!r}, loss={self.loss!r}, "
            f"time_scale={self.time_scale})"
        )


class _FlowSampler(Sampler):
    """Shared plumbing of the ODE samplers: a uniform grid 1 → 0 and one `step` per interval."""

    objectives: tuple[str, ...] = ("flow",)

    def __init__(self, steps: int) -> None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"{type(self).__name__}: steps must be a positive integer, got {steps!r}")
        self.steps = steps

    def grid(self) -> list[float]:
        """t_0 = 1 > t_1 > … > t_N = 0, uniform (t_N exactly 0)."""
        return [1.0 - i / self.steps for i in range(self.steps)] + [0.0]

    def integrate(
        self, objective: FlowMatching, model: GuidedFn, x: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """x(1) = x integrated to x(0) along the grid."""

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            """Guided v̂(x, t): one model call, t as a (1, …, 1) tensor the head embeds once."""
            tt = torch.full((1,) * (x.dim() - 1), t, dtype=x.dtype, device=x.device)
            return objective.velocity(model(x, objective.model_time(tt)), x)

        ts = self.grid()
        for t, t_next in zip(ts[:-1], ts[1:]):
            x = self.step(velocity, x, t, t_next)
        return x

    def step(self, velocity: VelocityFn, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        """x(t_next) from x(t), with `velocity(x, t)` the guided v̂ (one model call each)."""
        raise NotImplementedError

    def nfe(self, objective: Any = None) -> int:
        raise NotImplementedError


@SAMPLERS.register("euler")
class EulerSampler(_FlowSampler):
    """Explicit Euler on the flow ODE: x ← x + (t_next − t)·v̂(x, t); `steps` model calls.
    steps=1 is the deterministic one-step prediction x0 = x1 − v̂(x1, 1)."""

    def __init__(self, steps: int = 4) -> None:
        super().__init__(steps)

    def step(self, velocity: VelocityFn, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        return x + (t_next - t) * velocity(x, t)

    def nfe(self, objective: Any = None) -> int:
        """Model calls per sample: one per step."""
        return self.steps


@SAMPLERS.register("one_step")
class OneStepSampler(EulerSampler):
    """One Euler step from t = 1 to 0 (the 1-NFE generative prediction; = euler with steps=1)."""

    def __init__(self) -> None:
        super().__init__(1)


@SAMPLERS.register("heun")
class HeunSampler(_FlowSampler):
    """Heun's 2nd-order predictor–corrector: Euler predictor x̃, then x ← x + h·(v̂(x, t) + v̂(x̃, t_next))/2.

    As in EDM (Karras et al. 2022) the step that ends at t = 0 keeps the Euler predictor (no corrector)
    unless `final_corrector`; the method stays 2nd order. NFE = 2·steps − 1 (2·steps with it).
    """

    def __init__(self, steps: int = 2, final_corrector: bool = False) -> None:
        super().__init__(steps)
        self.final_corrector = bool(final_corrector)

    def step(self, velocity: VelocityFn, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        h = t_next - t
        d = velocity(x, t)
        predicted = x + h * d
        if t_next == 0.0 and not self.final_corrector:
            return predicted
        return x + h * 0.5 * (d + velocity(predicted, t_next))

    def nfe(self, objective: Any = None) -> int:
        """Model calls per sample: two per step, one on the last step unless final_corrector."""
        return 2 * self.steps - (0 if self.final_corrector else 1)
