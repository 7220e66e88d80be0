"""Reverse-process samplers (ancestral DDPM and DDIM) with classifier-free guidance.

Model-call contract (shared with `GaussianDiffusion.training_losses`):

    model_fn(x, t)                -> output               # the conditional model
    model_fn(x, t, guided=True)   -> (output_c, output_u) # conditional and unconditional outputs

`x` has the sample shape (…, k) given to `sample`; `t` holds ORIGINAL training indices and has shape
(1, …, 1) (it broadcasts against x.shape[:-1]), so a model embeds the timestep once per step. With
`guided=True` the model evaluates the SAME x under its condition and under the null condition, in one
batch if it likes (`MLPAdaLNHead.make_model_fn` does: [z ; null] share the input projection). The
sampler then combines ε = ε_u + s·(ε_c − ε_u) on the first k channels and keeps the variance channels
of the conditional output (as the official GenDD code does). Because only one x is ever carried, the
cond and uncond branches always see the same x_t: the initial noise (and every later state) is shared
between them. With guidance_scale == 1 the unconditional branch is never evaluated.

All randomness is drawn from the passed `torch.Generator`, which must live on the sampling device.
Both samplers sample `kind == "diffusion"` objectives only (generative/protocol.py); flow objectives
use the samplers of generative/flow.py.
"""

from __future__ import annotations

import torch

from gendd_framework.errors import ConfigError
from gendd_framework.generative import flow  # noqa: F401  (registers the flow objective and samplers)
from gendd_framework.generative.diffusion import GaussianDiffusion
from gendd_framework.generative.protocol import GuidedFn, Sampler, guided_model_output, require_kind
from gendd_framework.registry import SAMPLERS

__all__ = ["DDIMSampler", "DDPMSampler", "guided_model_output"]


class _Sampler(Sampler):
    """Shared plumbing: the respaced chain (cached) walked from x_T to x_0, one model call per step.

    Each step turns the model output into p(x_{t−1} | x_t) and asks the sampler for its transition
    (mean, std); x_{t−1} = mean + std·(temperature·z), with no noise at the last step or when std is None.
    """

    objectives: tuple[str, ...] = ("diffusion",)
    steps: int | str
    temperature: float = 1.0  # multiplies the injected noise (not the initial noise)

    def __init__(self) -> None:
        self._respaced: tuple[GaussianDiffusion, int | str, GaussianDiffusion] | None = None

    def respaced(self, diffusion: GaussianDiffusion) -> GaussianDiffusion:
        """The diffusion respaced to `self.steps` (cached per diffusion object)."""
        cached = self._respaced
        if cached is None or cached[0] is not diffusion or cached[1] != self.steps:
            cached = (diffusion, self.steps, diffusion.respace(self.steps))
            self._respaced = cached
        return cached[2]

    def integrate(
        self,
        diffusion: GaussianDiffusion,
        model: GuidedFn,
        x: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """x = x_T walked down the respaced chain to x_0."""
        chain = self.respaced(diffusion)
        for i in reversed(range(chain.num_timesteps)):
            t = torch.full((1,) * (x.dim() - 1), i, dtype=torch.long, device=x.device)  # broadcasts on rows
            step = chain.p_mean_variance(model(x, chain.model_timesteps(t)), x, t)
            mean, std = self.transition(chain, step, t)
            if i == 0 or std is None:
                x = mean
            else:
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = mean + std * (self.temperature * eps)
        return x

    def nfe(self, diffusion: GaussianDiffusion) -> int:
        """Model calls per sample: one per step of the respaced chain (guided calls are one batch)."""
        require_kind(self, diffusion)
        return self.respaced(diffusion).num_timesteps

    def transition(
        self, chain: GaussianDiffusion, step: dict[str, torch.Tensor], t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, std) of x_{t−1} given the model's step statistics (sampler-specific)."""
        raise NotImplementedError


@SAMPLERS.register("ddpm")
class DDPMSampler(_Sampler):
    """Ancestral DDPM sampling on a respaced chain with learned variance (GenDD's sampler; the official code
    uses 100 steps on CIFAR-100 and 64 on ImageNet).

    `temperature` multiplies the injected noise (not the initial noise); no noise is added at the last
    step; the x0 prediction is not clipped.
    """

    def __init__(self, steps: int | str = 100, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        self.steps = steps
        self.temperature = float(temperature)

    def transition(
        self, chain: GaussianDiffusion, step: dict[str, torch.Tensor], t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return step["mean"], torch.exp(0.5 * step["log_variance"])


@SAMPLERS.register("ddim")
class DDIMSampler(_Sampler):
    """DDIM sampling on a respaced chain; eta=0 is deterministic given the initial noise.

    x_{prev} = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ²)·ε̂ + σ·z with σ = η·√((1−ᾱ_prev)/(1−ᾱ))·√(1−ᾱ/ᾱ_prev).
    Learned variance channels are ignored. Default 10 steps: on digits it matches DDPM-100 within seed
    noise (benchmarks/results/fast_samplers.md).
    """

    def __init__(self, steps: int | str = 10, eta: float = 0.0) -> None:
        super().__init__()
        if eta < 0:
            raise ConfigError(f"eta must be >= 0, got {eta}")
        self.steps = steps
        self.eta = float(eta)

    def transition(
        self, chain: GaussianDiffusion, step: dict[str, torch.Tensor], t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ac = chain.coef("alphas_cumprod", t, step["eps"])
        ac_prev = chain.coef("alphas_cumprod_prev", t, step["eps"])
        sigma = self.eta * torch.sqrt((1.0 - ac_prev) / (1.0 - ac)) * torch.sqrt(1.0 - ac / ac_prev)
        mean = step["pred_xstart"] * torch.sqrt(ac_prev) + torch.sqrt(1.0 - ac_prev - sigma**2) * step["eps"]
        return mean, (sigma if self.eta > 0 else None)
