"""DIST (Huang et al., NeurIPS'22): match relations (Pearson correlations), not exact probabilities.

A stronger teacher's probabilities are hard to match point-wise; DIST asks only that the student's
probabilities be linearly correlated with the teacher's, per sample (inter-class: across classes) and
per class (intra-class: across the batch). Pearson is invariant to per-vector shift and scale.
"""

from __future__ import annotations

import torch

from gendd_framework.losses.kd import standardized_pair


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation along `dim` = cosine similarity of the mean-centred vectors.

    ρ = Σ a_c b_c / (max(‖a_c‖, eps)·max(‖b_c‖, eps)): each norm is floored at eps (torch's
    cosine_similarity convention, as torchdistill). The authors' code adds eps to the product of the
    norms instead, which pulls ρ of near-constant columns (rare classes at low τ) visibly below 1, so
    identical student and teacher would not give a zero loss; the floor only acts on degenerate
    (constant) vectors. The two conventions agree exactly at eps = 0.
    """
    a_c = a - a.mean(dim=dim, keepdim=True)
    b_c = b - b.mean(dim=dim, keepdim=True)
    norms = a_c.norm(dim=dim).clamp_min(eps) * b_c.norm(dim=dim).clamp_min(eps)
    return (a_c * b_c).sum(dim=dim) / norms


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    standardize: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """T²·(β·L_inter + γ·L_intra) on Y = softmax(z/T).

    L_inter = 1 - mean_i ρ(Y_s[i, :], Y_t[i, :]) (rows: a sample's class profile);
    L_intra = 1 - mean_j ρ(Y_s[:, j], Y_t[:, j]) (columns: a class across the batch).
    """
    student_logits, teacher_logits = standardized_pair(student_logits, teacher_logits, standardize)
    y_s = (student_logits / temperature).softmax(dim=1)
    y_t = (teacher_logits / temperature).softmax(dim=1)
    inter = 1 - pearson_correlation(y_s, y_t, dim=1, eps=eps).mean()
    intra = 1 - pearson_correlation(y_s, y_t, dim=0, eps=eps).mean()
    return temperature**2 * (beta * inter + gamma * intra)
