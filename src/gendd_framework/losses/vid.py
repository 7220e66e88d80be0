"""Variational Information Distillation (Ahn et al. CVPR'19): Gaussian negative log-likelihood of the
teacher map under a Gaussian whose mean is regressed from the student map.

The teacher map t is modelled as N(μ(s), σ²) with μ a small conv net of the student map s and σ² a
learned per-channel variance, σ²_c = softplus(α_c) + ε (heteroscedastic over channels, shared over
positions). Maximising a variational lower bound on the mutual information I(t; s) amounts to minimising

    NLL = mean over (batch, channel, position) of ½·[(t − μ)² / σ²_c + log σ²_c]

The constant ½·log 2π of the Gaussian density is left out (as in the authors' code and RepDistiller): it
changes neither the gradients nor the optimum, but the reported value is that much lower than a true NLL
and can be negative when σ² < 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gendd_framework.errors import ConfigError


def inverse_softplus(value: float) -> float:
    """α with softplus(α) = value (> 0): log(e^value − 1), computed stably as value + log(1 − e^−value)."""
    if not value > 0:
        raise ConfigError(f"inverse_softplus needs a positive value, got {value}")
    return value + math.log(-math.expm1(-value))


def vid_variance(log_scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-channel predictive variance σ²_c = softplus(α_c) + ε (always ≥ ε, so the log stays finite)."""
    return F.softplus(log_scale) + eps


def vid_nll(mean: torch.Tensor, target: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """½·[(t − μ)²/σ² + log σ²] averaged over every element; `variance` has one entry per channel (dim 1).

    `mean` and `target` are (B, C, ...) with equal shapes; `variance` is (C,).
    """
    if mean.shape != target.shape:
        raise ConfigError(
            f"vid: regressed student map {tuple(mean.shape)} and teacher map {tuple(target.shape)} differ"
        )
    if variance.ndim != 1 or mean.ndim < 2 or variance.shape[0] != mean.shape[1]:
        raise ConfigError(
            f"vid: a variance of shape {tuple(variance.shape)} needs one entry per channel of "
            f"{tuple(mean.shape)}"
        )
    var = variance.reshape(1, -1, *([1] * (mean.ndim - 2))).to(mean.dtype)
    return 0.5 * ((target - mean).pow(2) / var + torch.log(var)).mean()
