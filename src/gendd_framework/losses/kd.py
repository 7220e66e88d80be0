"""Hinton-style logit distillation and its small relatives (pure functions, input dtype kept)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def standardize_logits(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR'24): z-score each row over classes.

    (z - mean_c z) / (std_c z + eps) with the unbiased (N-1) std, so student and teacher are compared
    on shape, not on logit scale/offset; the shared temperature then acts on unit-variance logits.
    """
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True, unbiased=True)
    return (z - mean) / (std + eps)


def standardized_pair(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, standardize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logit vectors z-scored when `standardize` (the switch shared by KD, DKD and DIST)."""
    if not standardize:
        return student_logits, teacher_logits
    return standardize_logits(student_logits), standardize_logits(teacher_logits)


def kd_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    standardize: bool = False,
) -> torch.Tensor:
    """Hinton KD: T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)), summed over classes, averaged over batch.

    The T² keeps the gradient magnitude comparable across temperatures (gradients scale as 1/T²).
    """
    student_logits, teacher_logits = standardized_pair(student_logits, teacher_logits, standardize)
    kl = kl_divergence_per_sample(teacher_logits / temperature, student_logits / temperature).mean()
    return kl * temperature**2


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """-Σ_c p̄_c log softmax(z_s)_c, averaged over batch (MEAL V2's similarity loss).

    p̄ is typically the mean of several teachers' probabilities; equals KL(p̄‖p_s) + H(p̄), so the
    gradient in z_s is the same as KL's.
    """
    return -(teacher_probs * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()


def kl_divergence_per_sample(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(t) ‖ softmax(s)) per row, shape (B,): the evaluation's `kl/<output>` metric, and KD's
    loss on logits divided by the temperature."""
    log_p_t = F.log_softmax(teacher_logits, dim=1)
    log_p_s = F.log_softmax(student_logits, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
