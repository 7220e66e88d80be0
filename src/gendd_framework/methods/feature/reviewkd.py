"""ReviewKD (Chen et al. CVPR'21): student stage maps + pooled feature fused deep to shallow by ABFs,
each level compared with the teacher's map of the same depth by the hierarchical context loss.

Levels: the stage maps of each side (`student_layers` / `teacher_layers`, paired by depth when the
counts differ) plus the pooled feature as a 1x1 map. As in the authors' CIFAR code and mdistiller, the
student side defaults to the official `is_feat` maps and the teacher side (the regression target) to
the pre-activation maps (`preact=True` upstream; a family without them falls back to its stage maps);
`student_layers: preact` gives mdistiller's ImageNet setting. The ABFs are sized from the build-time probe:
input channels from the student level, output channels and resolution from the teacher level, and
`mid_channels` (`auto` = min(max_mid_channels, student feature dim), which reproduces every table of the
authors' code).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.losses.review import POOL_SIZES, AttentionFusion, hcl_levels, review_fuse
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.feature.layers import LayerSpec, pair_layers, resolve_layers
from gendd_framework.methods.terms import LossTerm, require_shapes
from gendd_framework.registry import LOSSES, METHODS


def check_pool_sizes(pool_sizes: Sequence[int], term: str) -> tuple[int, ...]:
    sizes = (
        tuple(pool_sizes) if isinstance(pool_sizes, Sequence) and not isinstance(pool_sizes, str) else None
    )
    if not sizes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in sizes):
        raise ConfigError(f"{term} pool_sizes must be a non-empty list of positive ints, got {pool_sizes!r}")
    return sizes


def mid_width(mid_channels: int | str, max_mid_channels: int, student_feature_dim: int) -> int:
    """ABF width: an int, or `auto` = min(max_mid_channels, student pooled-feature dim)."""
    if mid_channels == "auto":
        if (
            isinstance(max_mid_channels, bool)
            or not isinstance(max_mid_channels, int)
            or max_mid_channels < 1
        ):
            raise ConfigError(f"reviewkd max_mid_channels must be a positive int, got {max_mid_channels!r}")
        return min(max_mid_channels, student_feature_dim)
    if isinstance(mid_channels, bool) or not isinstance(mid_channels, int) or mid_channels < 1:
        raise ConfigError(f"reviewkd mid_channels must be a positive int or 'auto', got {mid_channels!r}")
    return mid_channels


@LOSSES.register("reviewkd")
class ReviewKDLoss(LossTerm):
    """Σ_levels HCL(ABF-fused student level, teacher level); logs `level<i>` (shallow to deep) as parts."""

    def __init__(
        self,
        student_layers: LayerSpec = "auto",
        teacher_layers: LayerSpec = "auto",
        mid_channels: int | str = "auto",
        max_mid_channels: int = 512,
        pool_sizes: Sequence[int] = POOL_SIZES,
    ) -> None:
        super().__init__()
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        self.mid_channels, self.max_mid_channels = mid_channels, max_mid_channels
        mid_width(mid_channels, max_mid_channels, 1)  # validate early, before any model is touched
        self.pool_sizes = check_pool_sizes(pool_sizes, "reviewkd")
        self.student_maps: list[str] = []
        self.teacher_maps: list[str] = []

    def bind(self, student, teacher, facts) -> None:
        shape = facts.get("input_shape")
        s = resolve_layers(student, self.student_layers, shape, "student_layers")
        t = resolve_layers(teacher, self.teacher_layers, shape, "teacher_layers", preact=True)
        self.student_maps, self.teacher_maps = pair_layers(s, t, "reviewkd")
        self.student_taps = (*self.student_maps, "feature")
        self.teacher_taps = (*self.teacher_maps, "feature")

    @staticmethod
    def _level_shape(side: dict, tap: str, key: str) -> tuple[int, int, int]:
        shape = tuple(side[tap])
        if tap == "feature":
            if len(shape) != 1:
                raise ConfigError(f"reviewkd needs a pooled feature vector, got 'feature' of shape {shape}")
            return (shape[0], 1, 1)
        if len(shape) != 3:
            raise ConfigError(
                f"reviewkd needs (C, H, W) maps: `{key}` tap '{tap}' has per-sample shape {shape}; "
                f"set `{key}` to convolutional layers"
            )
        return shape  # type: ignore[return-value]

    def setup(self, shapes) -> None:
        shapes = require_shapes(shapes, "reviewkd")
        s_shapes = [self._level_shape(shapes["student"], tap, "student_layers") for tap in self.student_taps]
        t_shapes = [self._level_shape(shapes["teacher"], tap, "teacher_layers") for tap in self.teacher_taps]
        mid = mid_width(self.mid_channels, self.max_mid_channels, s_shapes[-1][0])
        deepest = len(s_shapes) - 1
        self.abfs = nn.ModuleList(
            AttentionFusion(s[0], mid, t[0], fuse=i < deepest, out_size=t[1:])
            for i, (s, t) in enumerate(zip(s_shapes, t_shapes))
        )
        self.level_shapes = {"student": s_shapes, "teacher": t_shapes, "mid_channels": mid}

    def _maps(self, out: dict, maps: list[str]) -> list:
        feature = out["feature"]
        return [out[tap] for tap in maps] + [feature.reshape(feature.shape[0], -1, 1, 1)]

    def forward(self, student, teacher, batch, ctx):
        if not hasattr(self, "abfs"):
            raise ConfigError("reviewkd sizes its ABFs from tap shapes: build the method with input_shape")
        fused = review_fuse(self.abfs, self._maps(student, self.student_maps))
        targets = self._maps(teacher, self.teacher_maps)
        levels = hcl_levels(
            [f.float() for f in fused], [t.detach().float() for t in targets], self.pool_sizes
        )
        total = levels[0]
        for value in levels[1:]:
            total = total + value
        return {"loss": total, **{f"level{i}": v for i, v in enumerate(levels)}}


@METHODS.register("reviewkd")
class ReviewKDMethod(ComposedMethod):
    """CE + w·min(1, epoch/warmup)·Σ HCL (CIFAR-100: w = 5 for most pairs, 20 warm-up epochs)."""

    uses = (
        Use("ce", weight="ce_weight"),
        Use(
            "reviewkd",
            weight="reviewkd_weight",
            args=("student_layers", "teacher_layers", "mid_channels", "max_mid_channels", "pool_sizes"),
            schedule={"name": "linear_warmup", "epochs": "warmup_epochs"},
        ),
    )
    defaults = {"ce_weight": 1.0, "reviewkd_weight": 5.0, "warmup_epochs": 20.0}
