"""Deep mutual learning (Zhang et al., CVPR'18): K students learn from each other, no teacher.

Each peer k is pulled towards every other peer's current prediction, which it treats as a constant:
L_mimic,k = 1/(K−1) · Σ_{l≠k} KL(p_l ‖ p_k) at temperature 1, summed over classes and averaged over the
batch ('batchmean'; averaging over classes too would divide the term by C).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def mutual_kl(logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """[L_mimic,k for each peer k]: the mean over the other peers l of KL(sg p_l ‖ p_k) ('batchmean')."""
    if len(logits) < 2:
        raise ValueError(f"mutual learning needs at least two peers, got {len(logits)}")
    log_p = [F.log_softmax(z, dim=1) for z in logits]
    targets = [lp.detach() for lp in log_p]  # a peer's prediction is a constant for the others
    out = []
    for k, own in enumerate(log_p):
        terms = [
            (targets[l].exp() * (targets[l] - own)).sum(dim=1).mean() for l in range(len(logits)) if l != k
        ]
        out.append(torch.stack(terms).mean())
    return out


def mean_probability_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the peers' averaged probabilities: logits whose softmax is the ensemble's prediction."""
    log_p = torch.stack([F.log_softmax(z, dim=1) for z in logits])
    return torch.logsumexp(log_p, dim=0) - math.log(len(logits))
