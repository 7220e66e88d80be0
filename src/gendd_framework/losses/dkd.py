"""Decoupled knowledge distillation (Zhao et al., CVPR'22): KD split into target and non-target parts.

With b = [p(y), 1 - p(y)] and p̂ the softmax over non-target classes only, the KD loss decomposes per
sample as KL(p_t‖p_s) = TCKD + (1 - p_t(y))·NCKD; DKD re-weights the two parts as α·TCKD + β·NCKD so
the non-target "dark knowledge" is not suppressed when the teacher is confident.
"""

from __future__ import annotations

import torch

from gendd_framework.losses.kd import standardized_pair


def _split_logits(z: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target logit (B,), non-target logits (B, C-1)): the target column is removed, row order kept."""
    keep = torch.ones_like(z, dtype=torch.bool).scatter_(1, target.view(-1, 1), False)
    return z.gather(1, target.view(-1, 1)).squeeze(1), z[keep].view(z.shape[0], z.shape[1] - 1)


def _binary_and_nontarget_logprobs(
    z: torch.Tensor, target: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(y), log(1 - p(y)) and log p̂ (B, C-1), all from log-sum-exps (no log(1 - p) cancellation).

    log(1 - p(y)) = LSE_{c≠y}(z/T) - LSE(z/T) stays finite even when p(y) rounds to 1.
    """
    z_y, z_nt = _split_logits(z / temperature, target)
    lse_all = torch.logsumexp(z / temperature, dim=1)
    lse_nt = torch.logsumexp(z_nt, dim=1)
    log_p_y = z_y - lse_all
    log_not_y = lse_nt - lse_all
    log_p_hat = z_nt - lse_nt.unsqueeze(1)
    return log_p_y, log_not_y, log_p_hat


def dkd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    standardize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each × T² and averaged over the batch (sum / B).

    NCKD uses the target-removed softmax, so for C=2 (a single non-target class) it is exactly 0.
    """
    student_logits, teacher_logits = standardized_pair(student_logits, teacher_logits, standardize)
    s_y, s_not, s_hat = _binary_and_nontarget_logprobs(student_logits, target, temperature)
    t_y, t_not, t_hat = _binary_and_nontarget_logprobs(teacher_logits, target, temperature)
    tckd = t_y.exp() * (t_y - s_y) + t_not.exp() * (t_not - s_not)
    nckd = (t_hat.exp() * (t_hat - s_hat)).sum(dim=1)
    scale = temperature**2
    return (tckd * scale).mean(), (nckd * scale).mean()


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
    standardize: bool = False,
) -> dict[str, torch.Tensor]:
    """dict(loss = α·TCKD + β·NCKD, tckd, nckd), both parts × T² and batch-averaged (the `dkd` term)."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature, standardize)
    return {"loss": alpha * tckd + beta * nckd, "tckd": tckd, "nckd": nckd}
