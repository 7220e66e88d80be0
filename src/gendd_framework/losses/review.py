"""ReviewKD maths (Chen et al., CVPR'21): attention-based fusion (ABF) and the hierarchical context loss.

Knowledge review lets a shallow student level learn from the teacher's level of the same depth *and*
from everything deeper: the student's maps are fused from the deepest (the pooled feature as a 1x1 map)
to the shallowest. At each level an ABF turns the student map into `mid` channels (1x1 conv + BN),
mixes it with the deeper levels' running residual through a two-way spatial attention, and maps the
result to the teacher's channel count (3x3 conv + BN). Each output is compared with the teacher's map
of that level by the hierarchical context loss (HCL): the MSE of the maps plus the MSEs of their
adaptive-average-pooled pyramids, so global context is matched as well as positions.

Resizing (`resize_to`) grows a map by nearest-neighbour upsampling, as the authors' code does, and
shrinks it by adaptive average pooling (a case their hand-written shape tables never contain).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

POOL_SIZES = (4, 2, 1)


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, *size): identity, average pooling when both sides shrink, else nearest."""
    size = (int(size[0]), int(size[1]))
    h, w = x.shape[-2:]
    if (h, w) == size:
        return x
    if size[0] <= h and size[1] <= w:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="nearest")


def hcl_level(
    student: torch.Tensor, teacher: torch.Tensor, pool_sizes: Sequence[int] = POOL_SIZES
) -> torch.Tensor:
    """HCL of one level: (MSE(f_s, f_t) + Σ_k w_k·MSE(P_k f_s, P_k f_t)) / (1 + Σ_k w_k).

    P_k is adaptive average pooling to k×k; pyramid sizes k not smaller than the map (k >= min(H, W))
    are skipped, and the kept ones get weights 1/2, 1/4, ... in order. A 1x1 level is a plain MSE.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"hcl needs equal shapes, got student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    loss = F.mse_loss(student, teacher)
    side = min(student.shape[-2:])
    weight, total = 1.0, 1.0
    for k in pool_sizes:
        if k >= side:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(
            F.adaptive_avg_pool2d(student, k), F.adaptive_avg_pool2d(teacher, k)
        )
        total += weight
    return loss / total


def hcl_levels(
    students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], pool_sizes: Sequence[int] = POOL_SIZES
) -> list[torch.Tensor]:
    """HCL per level; the ReviewKD loss is their sum."""
    if len(students) != len(teachers):
        raise ValueError(
            f"hcl needs as many student as teacher levels, got {len(students)} and {len(teachers)}"
        )
    return [hcl_level(s, t, pool_sizes) for s, t in zip(students, teachers)]


class AttentionFusion(nn.Module):
    """One ABF: student map (C_in, h, w) [+ deeper residual] -> teacher-level map (C_out, *out_size).

    x = BN(conv1x1(f_s)); with a residual r (every level but the deepest), r is resized to (h, w) and
    [a0, a1] = sigmoid(conv1x1([x, r])) (two spatial maps), x = a0·x + a1·r. x is then resized to the
    teacher's resolution and y = BN(conv3x3(x)). Returns (y, x): x is the residual for the next,
    shallower level.
    """

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool, out_size: Sequence[int]
    ) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.att_conv = nn.Conv2d(2 * mid_channels, 2, 1) if fuse else None
        self.out_size = (int(out_size[0]), int(out_size[1]))
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)  # the authors' initialisation
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("a fusing ABF needs the residual of the deeper level")
            residual = resize_to(residual, x.shape[-2:])
            att = torch.sigmoid(self.att_conv(torch.cat([x, residual], dim=1)))
            x = x * att[:, 0:1] + residual * att[:, 1:2]
        x = resize_to(x, self.out_size)
        return self.conv2(x), x


def review_fuse(abfs: Sequence[AttentionFusion], maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run the ABFs deep to shallow; `abfs[i]` handles `maps[i]` (both ordered shallow to deep, the
    deepest ABF does not fuse). Returns the outputs shallow to deep, one per teacher level."""
    if len(abfs) != len(maps):
        raise ValueError(f"review_fuse needs one ABF per map, got {len(abfs)} ABFs and {len(maps)} maps")
    outputs: list[torch.Tensor] = [maps[0]] * len(maps)
    residual = None
    for i in reversed(range(len(maps))):
        outputs[i], residual = abfs[i](maps[i], residual)
    return outputs
