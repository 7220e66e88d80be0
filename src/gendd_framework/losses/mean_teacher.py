"""EMA self-distillation (mean teacher, Tarvainen & Valpola 2017; DINO-style targets, Caron et al. 2021):
the teacher is an exponential moving average of the student, and the student is pulled towards the
teacher's prediction on another augmentation of the same image.

Pure functions, input dtype kept: EMA decays and their schedules, the consistency ramp-up, the three
consistency costs (softmax MSE, KL, DINO's centred and sharpened cross-entropy) and the EMA update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def warmup_decay(updates: int, alpha: float) -> float:
    """min(1 − 1/(updates + 1), α): the mean teacher's EMA decay after `updates` optimizer updates.

    The first updates average with a true running mean (0.5 after one update, 2/3 after two), so a
    teacher started from random weights forgets them at once instead of over 1/(1 − α) steps."""
    return min(1.0 - 1.0 / (updates + 1), alpha)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """1 − (1 − m₀)·(1 + cos(π·k/K))/2: DINO's teacher momentum, m₀ at step 0 rising to 1 at the end."""
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * k / max(total_steps, 1))) / 2.0


def sigmoid_rampup(current: float, length: float) -> float:
    """exp(−5·(1 − clip(current, 0, L)/L)²), 1 when L = 0: the consistency weight's ramp-up (Laine &
    Aila 2017), from about 0.0067 at the start to 1 at `length`."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Σ_c (p_s − p_t)²/C averaged over the batch (the mean teacher's default consistency cost); the
    teacher side is a target (detached)."""
    p_s = F.softmax(student_logits, dim=1)
    p_t = F.softmax(teacher_logits.detach(), dim=1)
    return ((p_s - p_t) ** 2).mean()


def softmax_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_t ‖ p_s) summed over classes, averaged over the batch; teacher detached."""
    log_p_s = F.log_softmax(student_logits, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach(), dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
) -> torch.Tensor:
    """−Σ_c softmax((z_t − c)/τ_t)·log softmax(z_s/τ_s), averaged over the batch: DINO's cross-entropy
    with the teacher centred (towards uniform) and sharpened (τ_t < τ_s, towards one-hot)."""
    target = F.softmax((teacher_logits.detach() - center) / teacher_temperature, dim=1)
    return -(target * F.log_softmax(student_logits / student_temperature, dim=1)).sum(dim=1).mean()


def updated_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """c·m + mean_b(z_t)·(1 − m): the centre after one batch (computed after the loss, as DINO)."""
    return center * momentum + teacher_logits.detach().mean(dim=0) * (1.0 - momentum)


@torch.no_grad()
def ema_update_(averaged: Sequence[torch.Tensor], online: Sequence[torch.Tensor], decay: float) -> None:
    """θ' ← decay·θ' + (1 − decay)·θ in place, for each pair of tensors (a lerp towards θ)."""
    if len(averaged) != len(online):
        raise ValueError(f"EMA update of {len(averaged)} tensors from {len(online)}")
    if averaged:
        torch._foreach_lerp_(list(averaged), list(online), 1.0 - decay)
