"""Curriculum temperature KD (CTKD, Li et al., AAAI'23): the KD temperature is learned adversarially.

One global temperature T = t_start + t_end·σ(r) is computed from a raw scalar r that reaches the loss
through a gradient-reversal layer: identity forward, gradient × λ backward with λ ≤ 0, so the student
descends the KD loss while r ascends it (T seeks the hardest temperature). |λ| grows from 0 to 1 over
the first epochs by a cosine curriculum (easy to hard):

    λ_e = λ_min + (λ_max − λ_min)·(cos(π·min(e, E)/E) + 1)/2,   e = 1, 2, ... (1-indexed epochs)

which with λ_max = 0, λ_min = −1, E = 10 gives −0.024 at e = 1, −0.5 at e = 5 and −1 from e = 10.
"""

from __future__ import annotations

import math

import torch


class _GradientReversal(torch.autograd.Function):
    """y = x forward; dL/dx = λ·dL/dy backward (the caller passes λ ≤ 0 to reverse the gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lam = float(lam)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.lam, None


def scale_gradient(x: torch.Tensor, lam: float) -> torch.Tensor:
    """x in the forward pass; its gradient multiplied by `lam` in the backward pass (λ < 0 reverses it)."""
    return _GradientReversal.apply(x, lam)


def cosine_lambda(epoch: float, epochs: float, lam_max: float = 0.0, lam_min: float = -1.0) -> float:
    """The curriculum's λ at the 1-indexed `epoch`: λ_max at epoch 0, λ_min from `epochs` on."""
    e = min(max(epoch, 0.0), epochs)
    return lam_min + (lam_max - lam_min) * (math.cos(math.pi * e / epochs) + 1.0) / 2.0


def learned_temperature(raw: torch.Tensor, t_start: float, t_end: float) -> torch.Tensor:
    """T = t_start + t_end·σ(raw): bounded in (t_start, t_start + t_end), smooth in raw."""
    return t_start + t_end * torch.sigmoid(raw)
