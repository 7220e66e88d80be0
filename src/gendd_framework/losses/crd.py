"""Contrastive representation distillation (Tian et al., ICLR'20): memory-bank scores and the NCE loss.

An anchor embedding v (unit norm) is scored against K+1 rows of the *other* model's memory bank (row 0
the positive, rows 1..K the negatives): s_j = exp(<m_j, v> / T). Dividing by a normalisation constant
Z (estimated once as mean(s)·N on the first batch, then kept fixed) turns the scores into estimates of
P(j | v) over a dataset of N samples. Noise-contrastive estimation with K noise samples from the uniform
noise distribution P_n = 1/N gives, per anchor (paper Eq. 18),

    loss = -[ log( P_0 / (P_0 + K/N) ) + Σ_{j≥1} log( (K/N) / (P_j + K/N) ) ]

averaged over the batch. After the step each bank row of the batch becomes
normalise(μ·row + (1 - μ)·v) (momentum μ), so the bank holds a running average of the embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-7  # added to the NCE denominators, as in the official implementation


def contrast_logits(anchor: torch.Tensor, memory: torch.Tensor, contrast_index: torch.Tensor) -> torch.Tensor:
    """<memory[contrast_index[b, j]], anchor[b]>: (B, K+1). The bank is read without gradient.

    Two routes with the same value, whichever holds fewer numbers for the backward: a dense (B, N)
    product with a copy of the bank, then a gather (CIFAR: N = 50k rows against (K+1)·d = 2.1M
    gathered numbers per anchor), or the gathered (B, K+1, d) rows. Either way the saved tensor is a
    copy, so the in-place bank update after the forward leaves the backward intact."""
    memory = memory.detach()
    (batch, k1), (n, d) = contrast_index.shape, memory.shape
    if n * (d + batch) <= batch * k1 * d:
        return (anchor @ memory.clone().T).gather(1, contrast_index)
    rows = memory.index_select(0, contrast_index.reshape(-1)).view(batch, k1, d)
    return torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2)


def contrast_scores(
    anchor: torch.Tensor, memory: torch.Tensor, contrast_index: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Unnormalised scores exp(<m_j, v> / T), shape (B, K+1)."""
    return torch.exp(contrast_logits(anchor, memory, contrast_index) / temperature)


def normalisation_constant(scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Z = mean of the unnormalised scores · N (a Monte-Carlo estimate of Σ_i exp(<m_i, v>/T))."""
    return scores.detach().mean() * num_samples


def nce_loss(probs: torch.Tensor, num_samples: int, eps: float = EPS) -> torch.Tensor:
    """NCE loss of (B, K+1) probabilities (column 0 = positive) against K uniform noise samples."""
    k = probs.shape[1] - 1
    noise = k / float(num_samples)  # K · P_n
    pos, neg = probs[:, 0], probs[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + eps))
    log_d0 = torch.log(noise / (neg + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / probs.shape[0]


@torch.no_grad()
def momentum_update_(memory: torch.Tensor, index: torch.Tensor, value: torch.Tensor, momentum: float) -> None:
    """memory[index] <- normalise(momentum·memory[index] + (1 - momentum)·value), in place.

    Rows are read before any is written, so every row mixes with the bank as it was before the step
    (indices within a batch are expected to be distinct, as with any sampler without replacement)."""
    rows = memory.index_select(0, index).mul_(momentum)
    rows.add_(value.detach().to(memory.dtype), alpha=1 - momentum)
    memory.index_copy_(0, index, F.normalize(rows, dim=1))
