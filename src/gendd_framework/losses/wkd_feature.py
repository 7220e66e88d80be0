"""WKD-F (Lv et al., NeurIPS'24), feature part: 2-Wasserstein distance between channel Gaussians.

Each channel of a feature map (B, C, H, W) is summarised by a 1-D Gaussian over its spatial positions:
mean μ_c and standard deviation σ_c = sqrt(var_c + eps) (unbiased variance). Two Gaussians with diagonal
covariances diag(σ²) have the closed-form squared 2-Wasserstein distance

    W₂²(N(μ₁, diag σ₁²), N(μ₂, diag σ₂²)) = ‖μ₁ − μ₂‖² + ‖σ₁ − σ₂‖²,

the diagonal case of ‖μ₁ − μ₂‖² + tr(S₁ + S₂ − 2 (S₂^½ S₁ S₂^½)^½). Unlike a KL divergence it stays
finite and smooth when the distributions barely overlap, and it splits into a mean part and a spread
part that can be weighted separately. With a spatial grid g > 1 the map is cut into g×g cells (adaptive
pooling's cell boundaries, which may overlap) and every cell gets its own Gaussian per channel.
"""

from __future__ import annotations

import math

import torch


def grid_cells(size: int, grid: int) -> list[tuple[int, int]]:
    """[start, end) of the `grid` cells along an axis of length `size`, as adaptive pooling cuts it:
    start = ⌊i·size/grid⌋, end = ⌈(i+1)·size/grid⌉ (cells overlap when grid does not divide size)."""
    if grid < 1 or size < 1:
        raise ValueError(f"grid_cells needs size >= 1 and grid >= 1, got size={size}, grid={grid}")
    return [(math.floor(i * size / grid), math.ceil((i + 1) * size / grid)) for i in range(grid)]


def smallest_cell(height: int, width: int, grid: int) -> int:
    """Number of positions in the smallest cell of a g×g grid on an H×W map (a variance needs >= 2)."""
    rows = min(end - start for start, end in grid_cells(height, grid))
    cols = min(end - start for start, end in grid_cells(width, grid))
    return rows * cols


def channel_gaussians(x: torch.Tensor, grid: int = 1, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of every channel over the positions of each grid cell, both (B, C, g, g).

    std = sqrt(unbiased variance + eps); eps keeps the square root differentiable at zero spread.
    """
    if x.dim() != 4:
        raise ValueError(f"channel_gaussians needs (B, C, H, W) maps, got shape {tuple(x.shape)}")
    if grid == 1:
        mean = x.mean(dim=(2, 3))
        std = torch.sqrt(x.var(dim=(2, 3)) + eps)
        return mean[..., None, None], std[..., None, None]
    means, stds = [], []
    for h0, h1 in grid_cells(x.shape[2], grid):
        for w0, w1 in grid_cells(x.shape[3], grid):
            cell = x[:, :, h0:h1, w0:w1]
            means.append(cell.mean(dim=(2, 3)))
            stds.append(torch.sqrt(cell.var(dim=(2, 3)) + eps))
    shape = (*x.shape[:2], grid, grid)
    return torch.stack(means, dim=2).view(shape), torch.stack(stds, dim=2).view(shape)


def diag_gaussian_w2(
    mean_1: torch.Tensor, std_1: torch.Tensor, mean_2: torch.Tensor, std_2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The squared 2-Wasserstein distance between diagonal Gaussians, one per leading index, as its mean
    and spread parts (Σ (μ₁ − μ₂)², Σ (σ₁ − σ₂)²) over the last dimension: W₂² is their sum."""
    return (mean_1 - mean_2).square().sum(dim=-1), (std_1 - std_2).square().sum(dim=-1)


def wkd_feature_terms(
    student: torch.Tensor, teacher: torch.Tensor, grid: int = 1, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_term, std_term) of WKD-F between equally shaped maps (B, C, H, W).

    mean_term = Σ_{b,c,cell} (μ_s − μ_t)² / (g²·B) and std_term = Σ_{b,c,cell} (σ_s − σ_t)² / (g²·B):
    the two parts of the diagonal-Gaussian W₂², summed over channels and averaged over samples and
    cells, so mean_term + std_term is the average W₂² per (sample, cell). The loss is ρ·mean_term +
    std_term. Computed in float32 at least (half-precision inputs are upcast); the teacher is detached.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"wkd_feature_terms needs equal map shapes, got student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)}"
        )
    work = torch.promote_types(student.dtype, torch.float32)
    mean_s, std_s = channel_gaussians(student.to(work), grid, eps)
    mean_t, std_t = channel_gaussians(teacher.detach().to(work), grid, eps)
    # one diagonal Gaussian per sample over its (channel, cell) pairs
    mean_w2, std_w2 = diag_gaussian_w2(
        mean_s.flatten(1), std_s.flatten(1), mean_t.flatten(1), std_t.flatten(1)
    )
    count = grid * grid * student.shape[0]
    return mean_w2.sum() / count, std_w2.sum() / count
