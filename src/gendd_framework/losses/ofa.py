"""OFA-KD loss with adaptive target enhancement (Hao et al. NeurIPS'23).

With m = one-hot(y), p_t = softmax(z_t/τ) and log p_s = log_softmax(z_s/τ):

    L_OFA = −Σ_c [(p_t[c] + m[c])^ε − m[c]] · log p_s[c]        (averaged over the batch, no τ² factor)

so a non-target class is weighted by p_t[c]^ε and the target class by (1 + p_t[y])^ε − 1. For ε = 1
both weights are p_t[c]: the loss is the soft-target cross-entropy −Σ_c p_t[c] log p_s[c] =
KL(p_t ‖ p_s) + H(p_t) (KD without τ², up to the teacher's entropy). For ε > 1 the target weight grows
with the teacher's confidence in it and the non-target weights shrink (p^ε < p for p < 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ofa_weights(teacher_probs: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """(p_t + m)^ε − m: the per-class weights of −log p_s (m = one-hot(target))."""
    mask = F.one_hot(target, teacher_probs.shape[1]).to(teacher_probs.dtype)
    return (teacher_probs + mask).pow(eps) - mask


def ofa_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    eps: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Batch-mean OFA loss of one logit head (teacher detached). Uses log_softmax, not log(softmax),
    so a vanishing student probability gives a large finite loss instead of inf/NaN."""
    p_t = F.softmax(teacher_logits.detach() / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    return -(ofa_weights(p_t, target, eps) * log_p_s).sum(dim=1).mean()
