"""Similarity-preserving KD (Tung & Mori, ICCV'19): samples that look alike to the teacher should look
alike to the student.

Each side's activations are flattened to F (B, D) and compared through the batch similarity matrix
G = F·Fᵀ (B×B), whose rows are L2-normalised: Ĝ_i = G_i / max(‖G_i‖₂, 1e-12) (the paper's
Eq. 2-3, the official code's `F.normalize`). The loss is (1/B²)·‖Ĝ_t − Ĝ_s‖²_F. Because only B×B
matrices are compared, student and teacher may have any (different) widths and resolutions.

Invariances: a global rescaling of either side's features (G scales by c², the row norm removes it)
and any orthogonal map of the feature space (e.g. a channel permutation) leave the loss unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gendd_framework.errors import ConfigError


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, B): the Gram matrix of the flattened features with L2-normalised rows."""
    flat = features.flatten(1)
    return F.normalize(flat @ flat.t(), p=2.0, dim=1)


def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(1/B²)·‖Ĝ_t − Ĝ_s‖²_F for one pair of activations with the same batch size."""
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise ConfigError(
            f"similarity-preserving KD needs (B, ...) activations with the same batch size, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    batch = student.shape[0]
    diff = similarity_matrix(teacher) - similarity_matrix(student)
    return diff.pow(2).sum() / (batch * batch)
