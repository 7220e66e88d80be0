"""ND loss (Wang et al., ICCV'23, "Improving KD via Regularizing Feature Norm and Direction").

A student embedding s (pooled penultimate feature) is asked to point along the teacher's class centre
of its label (the mean teacher embedding of that class over the training set, normalised: ê_y) and to
have a large projection on it, at least the teacher embedding's norm:

    L_ND = (1/B) Σ_i [ 1 − ⟨s_i, ê_{y_i}⟩ / max(‖s_i‖, ‖t_i‖) ].

When ‖s‖ >= ‖t‖ the term is 1 − cos(s, ê_y): direction only. When ‖s‖ < ‖t‖ it is 1 − ⟨s, ê_y⟩/‖t‖,
which also rewards growing the projection up to ‖t‖. The loss is 0 exactly when s points along ê_y
with ‖s‖ >= ‖t‖. Norms are floored at `eps` (an all-zero embedding would divide by zero).
"""

from __future__ import annotations

import torch


def centre_directions(centres: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(C, D) class centres -> unit rows ê_c = e_c / max(‖e_c‖, eps) (an all-zero centre stays zero)."""
    return centres / centres.norm(dim=1, keepdim=True).clamp_min(eps)


def nd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    centres: torch.Tensor,
    labels: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Mean over the batch of 1 − ⟨s, ê_y⟩ / max(‖s‖, ‖t‖, eps); s, t are (B, D), centres (C, D)."""
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(
            f"nd needs (B, D) embeddings of equal shape, got {tuple(student.shape)}, {tuple(teacher.shape)}"
        )
    if centres.ndim != 2 or centres.shape[1] != student.shape[1]:
        raise ValueError(f"nd centres must be (C, {student.shape[1]}), got {tuple(centres.shape)}")
    direction = centre_directions(centres, eps)[labels]
    scale = torch.maximum(student.norm(dim=1), teacher.norm(dim=1)).clamp_min(eps)
    return (1.0 - (student * direction).sum(dim=1) / scale).mean()
