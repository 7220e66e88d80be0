"""Discrete Gaussian diffusion (DDPM with IDDPM learned-range variance): the GenDD training objective.

Layout convention: channels are the LAST dimension. A diffusion sample is a vector of k channels and any
leading shape is a batch of independent rows, e.g. x0 of shape (R, B, n, k) = (replicas, images,
tokens, token_dim) with one timestep per row, t of shape (R, B, n). A timestep tensor only has to
broadcast against x.shape[:-1]; samplers pass t of shape (1, ..., 1) so a model can compute its time
embedding once per step instead of once per row.

Model contract: `model_fn(x_t, t_model) -> output` where `t_model` is the ORIGINAL (training) timestep
index (after a `respace` the chain index j maps to `timestep_map[j]`), and `output` has 2k channels
[ε or x0 prediction ; variance interpolation v] when `learn_sigma`, else k.

The schedule lives in CPU float64 tensors; per (device, dtype) a converted copy is cached, and the
working precision is the input's floating dtype, but at least float32. Nothing assumes CUDA.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from gendd_framework.errors import ConfigError
from gendd_framework.generative.protocol import ModelFn, Objective, as_working
from gendd_framework.generative.schedules import make_betas, respace_betas, space_timesteps
from gendd_framework.registry import OBJECTIVES

# The official code keeps the image-diffusion decoder NLL (8-bit bins) on features too; kept for parity.
_BIN_HALF_WIDTH = 1.0 / 255.0
_EDGE = 0.999
_MIN_PROB = 1e-12


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, half_width: float = _BIN_HALF_WIDTH
) -> torch.Tensor:
    """log P(x) per element for N(mean, e^{2·log_scale}) integrated over the bin [x − h, x + h].

    Values below −0.999 (above 0.999) take the whole left (right) tail, as for [-1, 1] 8-bit pixels;
    probabilities are floored at 1e-12. Uses the exact normal CDF.
    """
    inv_std = torch.exp(-log_scale)
    centred = x - mean
    cdf_plus = torch.special.ndtr(inv_std * (centred + half_width))
    cdf_min = torch.special.ndtr(inv_std * (centred - half_width))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=_MIN_PROB))
    # 1 − Φ(a) computed as Φ(−a) so the right tail keeps its digits.
    log_one_minus_cdf_min = torch.log(
        torch.special.ndtr(-inv_std * (centred - half_width)).clamp(min=_MIN_PROB)
    )
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=_MIN_PROB))
    return torch.where(x < -_EDGE, log_cdf_plus, torch.where(x > _EDGE, log_one_minus_cdf_min, log_delta))


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """Continuous log N(x; mean, e^log_variance) per element (the plain-Gaussian decoder ablation)."""
    return -0.5 * (math.log(2.0 * math.pi) + log_variance + (x - mean) ** 2 * torch.exp(-log_variance))


@OBJECTIVES.register("gaussian_diffusion")
class GaussianDiffusion(Objective):
    """DDPM objective: ε-MSE plus the IDDPM variational bound for a learned-range variance (as GenDD).

    Args:
        num_timesteps: length T of the training chain.
        schedule: 'cosine' (GenDD) or 'linear'.
        learn_sigma: the model also outputs v; log σ² = frac·log β_t + (1−frac)·log β̃_t, frac = (v+1)/2.
        predict: 'epsilon' (GenDD) or 'x0', what the first k output channels mean.
        vb_weight: weight of the VB term (bits) in `loss`; only the variance channels receive its gradient.
        decoder_nll: t=0 term of the VB: 'discretized' (official, 1/255 bins, ±0.999 edges) or 'gaussian'.
        fixed_variance: variance when not learn_sigma: 'large' (β_t, β̃_1 at t=0) or 'small' (β̃_t).
    """

    kind = "diffusion"  # the Objective protocol (generative/protocol.py): sampled by ddpm / ddim
    discrete_time = True

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "cosine",
        learn_sigma: bool = True,
        predict: str = "epsilon",
        vb_weight: float = 1.0,
        decoder_nll: str = "discretized",
        fixed_variance: str = "large",
    ) -> None:
        if predict not in ("epsilon", "x0"):
            raise ConfigError(f"predict must be 'epsilon' or 'x0', got {predict!r}")
        if decoder_nll not in ("discretized", "gaussian"):
            raise ConfigError(f"decoder_nll must be 'discretized' or 'gaussian', got {decoder_nll!r}")
        if fixed_variance not in ("large", "small"):
            raise ConfigError(f"fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
        if vb_weight < 0:
            raise ConfigError(f"vb_weight must be >= 0, got {vb_weight}")
        self.schedule = schedule
        self.learn_sigma = bool(learn_sigma)
        self.predict = predict
        self.vb_weight = float(vb_weight)
        self.decoder_nll = decoder_nll
        self.fixed_variance = fixed_variance
        self.original_num_timesteps = int(num_timesteps)
        betas = make_betas(schedule, num_timesteps)
        self._set_chain(betas, torch.arange(num_timesteps, dtype=torch.long))

    # -- schedule tables ------------------------------------------------------------------------
    def _set_chain(self, betas: torch.Tensor, timestep_map: torch.Tensor) -> None:
        """(Re)build every float64 table from the betas of the chain."""
        betas = betas.to(torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ConfigError("betas must be a 1-D tensor with values in (0, 1]")
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = timestep_map.to(torch.long)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # β̃_0 = 0: its log is clipped to β̃_1 (or β_0 for a one-step chain).
        first = post_var[1] if self.num_timesteps > 1 else betas[0]
        post_log_var = torch.log(torch.cat([first.reshape(1), post_var[1:]]))
        large_var = torch.cat([first.reshape(1), betas[1:]])
        self._tables: dict[str, torch.Tensor] = {
            "betas": betas,
            "log_betas": torch.log(betas),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": torch.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": torch.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_log_var,
            "posterior_mean_coef1": betas * torch.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac),
            "fixed_large_variance": large_var,
            "fixed_large_log_variance": torch.log(large_var),
        }
        self._device_cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def table(self, name: str) -> torch.Tensor:
        """A float64 CPU table of the chain, shape (num_timesteps,) (e.g. 'alphas_cumprod')."""
        return self._tables[name]

    @property
    def betas(self) -> torch.Tensor:
        return self._tables["betas"]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._tables["alphas_cumprod"]

    def coef(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`table[name][t]` on like's device in like's working dtype, with a trailing 1 for the channels."""
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        key = (name, like.device, dtype)
        table = self._device_cache.get(key)
        if table is None:
            table = self._tables[name].to(device=like.device, dtype=dtype)
            self._device_cache[key] = table
        return table[t.to(like.device)].unsqueeze(-1)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original training index the network must see for chain index `t` (identity unless respaced)."""
        key = ("timestep_map", t.device, torch.long)
        tmap = self._device_cache.get(key)
        if tmap is None:
            tmap = self._device_cache[key] = self.timestep_map.to(t.device)
        return tmap[t]

    def respace(self, steps: int | str | Sequence[int]) -> GaussianDiffusion:
        """A copy keeping `space_timesteps(T, steps)` and ᾱ there; the model still sees the original t."""
        kept = space_timesteps(self.num_timesteps, steps)
        new_betas, kept_t = respace_betas(self.betas, kept)
        other = copy.copy(self)
        other._set_chain(new_betas, self.timestep_map[kept_t])
        return other

    # -- forward process ------------------------------------------------------------------------
    def q_mean_variance(
        self, x0: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0)."""
        x0 = as_working(x0)
        mean = self.coef("sqrt_alphas_cumprod", t, x0) * x0
        var = (1.0 - self.coef("alphas_cumprod", t, x0)).expand_as(mean)
        return mean, var, self.coef("log_one_minus_alphas_cumprod", t, x0).expand_as(mean)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
        x0 = as_working(x0)
        return (
            self.coef("sqrt_alphas_cumprod", t, x0) * x0
            + self.coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0)."""
        mean = (
            self.coef("posterior_mean_coef1", t, x_t) * x0 + self.coef("posterior_mean_coef2", t, x_t) * x_t
        )
        var = self.coef("posterior_variance", t, x_t).expand_as(mean)
        log_var = self.coef("posterior_log_variance_clipped", t, x_t).expand_as(mean)
        return mean, var, log_var

    # -- reverse process ------------------------------------------------------------------------
    def split_output(
        self, output: torch.Tensor, x_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction channels, variance channels or None), checking the channel count."""
        k = x_t.shape[-1]
        expected = 2 * k if self.learn_sigma else k
        if output.shape[-1] != expected:
            raise ConfigError(
                f"the model returned {output.shape[-1]} channels but the diffusion objective expects "
                f"{expected} (token_dim={k}, learn_sigma={self.learn_sigma}); make the head's learn_sigma "
                "match the objective's"
            )
        if self.learn_sigma:
            return output[..., :k], output[..., k:]
        return output, None

    def p_mean_variance(
        self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """p(x_{t−1} | x_t) from a model output: dict(mean, variance, log_variance, pred_xstart, eps)."""
        x_t = as_working(x_t)
        pred, v = self.split_output(output, x_t)
        pred = pred.to(x_t.dtype)
        if v is not None:
            min_log = self.coef("posterior_log_variance_clipped", t, x_t)
            max_log = self.coef("log_betas", t, x_t)
            frac = (v.to(x_t.dtype) + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
        elif self.fixed_variance == "large":
            log_var = self.coef("fixed_large_log_variance", t, x_t).expand_as(x_t)
        else:
            log_var = self.coef("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        if self.predict == "epsilon":
            eps = pred
            pred_x0 = (
                self.coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self.coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
            )
        else:
            pred_x0 = pred
            eps = (self.coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_x0) / self.coef(
                "sqrt_recipm1_alphas_cumprod", t, x_t
            )
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_var),
            "log_variance": log_var,
            "pred_xstart": pred_x0,
            "eps": eps,
        }

    # -- training -------------------------------------------------------------------------------
    def vb_terms_bpd(
        self, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-row VB term in bits: KL(q(x_{t−1}|x_t,x0) ‖ p) for t>0, decoder NLL of x0 for t=0."""
        x0 = as_working(x0)
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance(output, x_t, t)
        kl = normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]).mean(-1) / math.log(2.0)
        if self.decoder_nll == "discretized":
            nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        else:
            nll = -gaussian_log_likelihood(x0, p["mean"], p["log_variance"])
        nll = nll.mean(-1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def draw_time(
        self, rows: torch.Size, generator: torch.Generator | None, x0: torch.Tensor
    ) -> torch.Tensor:
        """Chain indices t ~ U{0..T−1}, one per row."""
        return torch.randint(0, self.num_timesteps, rows, device=x0.device, generator=generator)

    def row_losses(
        self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """dict(loss, mse, vb) per row: ε-MSE (mean over channels) + vb_weight·VB (bits, stop-grad on ε),
        the official GenDD objective (`training_losses` averages them over every row)."""
        x_t = self.q_sample(x0, t, noise)
        output = model_fn(x_t, self.model_timesteps(t))
        pred, v = self.split_output(output, x_t)
        target = noise if self.predict == "epsilon" else x0
        mse = ((target - pred) ** 2).mean(-1)
        if v is None:
            return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
        # Stop-gradient on the prediction channels: the VB term only trains the variance.
        vb = self.vb_terms_bpd(torch.cat([pred.detach(), v], dim=-1), x0, x_t, t)
        return {"loss": mse + self.vb_weight * vb, "mse": mse, "vb": vb}

    def __repr__(self) -> str:
        respaced = (
            "" if self.num_timesteps == self.original_num_timesteps else f", respaced={self.num_timesteps}"
        )
        return (
            f"GaussianDiffusion(T={self.original_num_timesteps}{respaced}, schedule={self.schedule!r}, "
            f"learn_sigma={self.learn_sigma}, predict={self.predict!r}, decoder_nll={self.decoder_nll!r})"
        )
