"""WKD-L (Lv et al., NeurIPS'24), logit part: Wasserstein distance between class distributions.

KL compares probabilities class by class; a Wasserstein distance with a class-to-class cost lets mass
on "similar" classes count as nearly right. Cost comes from category similarity (CKA of per-class
features, or cosine of classifier rows); the transport plan is entropic (Sinkhorn).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def sinkhorn_plan(
    p: torch.Tensor, q: torch.Tensor, cost: torch.Tensor, reg: float, iters: int
) -> torch.Tensor:
    """Entropic OT plan Π = diag(u) K diag(v), K = exp(-cost/reg), by plain Sinkhorn scaling.

    p, q: (B, n) marginals; cost: (B, n, n) or (n, n). Starts from u = 1/n, then `iters` times
    v = q / (Kᵀu + 1e-8), u = p / (K v + 1e-8); the last update is u, so row sums match p exactly.
    Not log-domain: keep cost/reg moderate. Differentiable through the iterations.
    """
    kernel = torch.exp(-cost / reg)
    if kernel.dim() == 2:
        kernel = kernel.unsqueeze(0).expand(p.shape[0], -1, -1)
    u = torch.full_like(p, 1.0 / p.shape[1])
    v = torch.ones_like(q)
    for _ in range(iters):
        v = q / (torch.einsum("bij,bi->bj", kernel, u) + 1e-8)
        u = p / (torch.einsum("bij,bj->bi", kernel, v) + 1e-8)
    return u.unsqueeze(2) * kernel * v.unsqueeze(1)


def _drop_target(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C-1) with each row's target column removed (order kept)."""
    keep = torch.ones_like(x, dtype=torch.bool).scatter_(1, target.view(-1, 1), False)
    return x[keep].view(x.shape[0], x.shape[1] - 1)


def wkd_logit_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    cost_matrix: torch.Tensor,
    temperature: float = 4.0,
    reg: float = 0.05,
    iters: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(target_term, wasserstein_term), both batch means, no T² factor.

    target_term = -p_t(y)·log p_s(y) at T=1 (teacher detached): the target class is handled like KD's
    binary part. wasserstein_term = Σ Π ⊙ cost between the non-target distributions at temperature T,
    with cost = relu(cost_matrix) + 1e-8 restricted to the non-target classes of each sample; rows of Π
    are the student's classes, columns the teacher's. The OT part runs in float32 at least (fp16/bf16
    upcast; float64 kept) because exp(-cost/reg) underflows in half precision.
    """
    log_p_s = F.log_softmax(student_logits, dim=1)
    p_t = F.softmax(teacher_logits.detach(), dim=1)
    idx = target.view(-1, 1)
    target_term = -(p_t.gather(1, idx) * log_p_s.gather(1, idx)).mean()

    work = torch.promote_types(student_logits.dtype, torch.float32)
    q_s = F.softmax(_drop_target(student_logits.to(work), target) / temperature, dim=1)
    q_t = F.softmax(_drop_target(teacher_logits.to(work), target) / temperature, dim=1)
    n_classes = student_logits.shape[1]
    classes = torch.arange(n_classes, device=student_logits.device).expand(len(target), -1)
    others = _drop_target(classes, target)  # (B, C-1) class ids
    cost = F.relu(cost_matrix.to(device=student_logits.device, dtype=work)) + 1e-8
    cost = cost[others.unsqueeze(2), others.unsqueeze(1)]  # (B, C-1, C-1)
    plan = sinkhorn_plan(q_s, q_t, cost, reg, iters)
    wasserstein = (plan * cost).sum(dim=(1, 2)).mean()
    return target_term, wasserstein


def _centred_stack(class_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """(C, n, d): every class truncated to the smallest n (rows paired by order), column-centred."""
    n = min(x.shape[0] for x in class_features)
    x = torch.stack([f[:n] for f in class_features])
    return x - x.mean(dim=1, keepdim=True)


def _cka_gram(x: torch.Tensor) -> torch.Tensor:
    """CKA via n×n Grams: ‖X_jᵀX_i‖_F² = ⟨X_iX_iᵀ, X_jX_jᵀ⟩_F, one flattened-Gram product."""
    grams = (x @ x.transpose(1, 2)).flatten(1)  # (C, n²)
    cross = grams @ grams.T  # (C, C): ‖X_jᵀX_i‖_F²; diagonal ‖X_iᵀX_i‖_F² = ‖X_iX_iᵀ‖_F²
    norms = cross.diagonal().sqrt()
    return cross / (norms.unsqueeze(1) * norms.unsqueeze(0))


def _cka_feature(x: torch.Tensor) -> torch.Tensor:
    """CKA via d×d cross-covariances X_jᵀX_i, one class i at a time (memory C·d², no n² Grams)."""
    rows = [torch.einsum("jnd,ne->jde", x, x_i).square().sum(dim=(1, 2)) for x_i in x]
    cross = torch.stack(rows)  # (C, C)
    norms = cross.diagonal().sqrt()
    return cross / (norms.unsqueeze(1) * norms.unsqueeze(0))


def linear_cka_cost(
    class_features: Sequence[torch.Tensor], sharpen: float | None = None, route: str = "auto"
) -> torch.Tensor:
    """Class-to-class cost D_ij = 1 - CKA_lin(X_i, X_j), shape (C, C), zero diagonal, symmetric.

    X_i (n_i, d) holds class i's features; CKA_lin = ‖X_jᵀX_i‖_F² / (‖X_iᵀX_i‖_F‖X_jᵀX_j‖_F) after
    truncating to a common n and centring columns. route: "gram" (n×n, cheap when n ≤ d), "feature"
    (d×d), or "auto" to pick by size. sharpen κ maps D to 1 - exp(-κ·D), stretching small distances.
    """
    x = _centred_stack(class_features)
    n, d = x.shape[1], x.shape[2]
    if route == "auto":
        route = "gram" if n <= d else "feature"
    if route == "gram":
        cka = _cka_gram(x)
    elif route == "feature":
        cka = _cka_feature(x)
    else:
        raise ValueError(f"linear_cka_cost route must be 'auto', 'gram' or 'feature', got {route!r}")
    dist = (1 - cka).clamp_min(0)
    dist = 0.5 * (dist + dist.T)
    dist.fill_diagonal_(0)
    if sharpen is not None:
        dist = 1 - torch.exp(-sharpen * dist)
    return dist


def fc_cosine_cost(weight: torch.Tensor) -> torch.Tensor:
    """D_ij = 1 - cos(w_i, w_j) over classifier weight rows (C, d): a cost from the teacher's head."""
    w = F.normalize(weight, dim=1)
    dist = 1 - w @ w.T
    dist.fill_diagonal_(0)
    return dist
