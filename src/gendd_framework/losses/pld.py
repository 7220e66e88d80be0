"""Plackett–Luce distillation (Bassam et al., 2025): list-wise KD as a teacher-weighted ranking loss.

The student's logits define a Plackett–Luce model over class orderings; the loss is the teacher-
weighted negative log-likelihood of the teacher's preferred ordering, one choice term per position.

Documented choices (the paper's exact normalisation is unconfirmed here):
- permutation π: the true label first, then every other class by descending teacher logit (stable
  sort, ties broken by lower class index);
- weights α_k = softmax(z_t / τ)[π_k], used as-is: no renormalisation, no truncation of the list;
- L = mean_b Σ_{k=1..C} α_k·[logsumexp_{m≥k} z_s[π_m] - z_s[π_k]]; the k = C term is identically 0,
  and the k = 1 term is p_t^τ(y)·CE(z_s, y).
"""

from __future__ import annotations

import torch


def teacher_permutation(teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """π (B, C): target first, then descending teacher logit; ties keep the lower class index first."""
    by_teacher = torch.sort(teacher_logits, dim=1, descending=True, stable=True).indices
    is_target = (by_teacher == target.view(-1, 1)).to(torch.int8)
    # A second stable sort moves the target to the front and leaves the others' order untouched.
    front = torch.sort(is_target, dim=1, descending=True, stable=True).indices
    return by_teacher.gather(1, front)


def pld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Teacher-weighted Plackett–Luce NLL of π under the student, O(C log C) via reversed logcumsumexp.

    Invariant to adding a per-row constant to the student logits (every term is a log-softmax).
    """
    perm = teacher_permutation(teacher_logits, target)
    z_s = student_logits.gather(1, perm)
    # tail[k] = logsumexp_{m >= k} z_s[π_m]
    tail = torch.logcumsumexp(z_s.flip(1), dim=1).flip(1)
    alpha = torch.softmax(teacher_logits / temperature, dim=1).gather(1, perm)
    return (alpha * (tail - z_s)).sum(dim=1).mean()
