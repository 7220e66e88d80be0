"""Attention transfer (Zagoruyko & Komodakis, ICLR'17): match where the networks look, not what they see.

A (B, C, H, W) map A becomes a spatial attention map by averaging |A_c|^p over the channels,
Q = mean_c |A_c|^p (flattened to H·W), normalised to unit L2 norm per sample: q = Q / max(‖Q‖₂, 1e-12).
Channel counts may differ between student and teacher; the spatial sizes must agree.

Two reductions of the difference δ_b = q_s,b − q_t,b (per pair of maps):
- `code` (the authors' code and RepDistiller/mdistiller/torchdistill `mode='code'`): the mean of δ² over
  the batch and the H·W positions, i.e. (1/B)·Σ_b ‖δ_b‖²₂ / (H·W). The paper's "β = 10³ divided by the
  number of elements in the attention map and batch size" is this normalisation, so β = 1000 goes with it.
- `paper` (Eq. 2 with β/2 folded into the weight; torchdistill `mode='paper'`): (1/B)·Σ_b ‖δ_b‖₂.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gendd_framework.errors import ConfigError

AT_MODES = ("code", "paper")


def attention_map(feature_map: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W): the channel mean of |A|^p, L2-normalised per sample (eps 1e-12).

    |A|^p equals the official A^p for even p or non-negative (post-ReLU) maps; the channel mean and
    the channel sum give the same map after normalisation."""
    if feature_map.dim() != 4:
        raise ConfigError(f"attention transfer needs (B, C, H, W) maps, got shape {tuple(feature_map.shape)}")
    q = feature_map.abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(q, p=2.0, dim=1)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0, mode: str = "code") -> torch.Tensor:
    """AT loss of one pair of maps of equal spatial size (see the module docstring for `mode`)."""
    if mode not in AT_MODES:
        raise ConfigError(f"at mode must be one of {AT_MODES}, got '{mode}'")
    if not p > 0:
        raise ConfigError(f"at p must be > 0, got {p}")
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0]:
        raise ConfigError(
            f"attention transfer needs (B, C, H, W) maps with the same batch size, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if student.shape[2:] != teacher.shape[2:]:
        raise ConfigError(
            f"attention transfer needs maps of equal spatial size, got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}; pool them to a common size first"
        )
    diff = attention_map(student, p) - attention_map(teacher, p)
    if mode == "code":
        return diff.pow(2).mean()
    return diff.norm(p=2, dim=1).mean()
