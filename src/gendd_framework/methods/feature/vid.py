"""Variational Information Distillation (Ahn et al. CVPR'19): per stage pair, the teacher map is modelled
as a Gaussian whose mean a 1x1-conv net regresses from the student map and whose per-channel variance is
learned; the loss is its negative log-likelihood (`losses/vid.py`), summed over the pairs.

Defaults follow RepDistiller/mdistiller on CIFAR-100: weight 1, every default stage (no stem), the
regressor 1x1 conv (C_s -> m) - ReLU - 1x1 conv (m -> m) - ReLU - 1x1 conv (m -> C_t) without biases and
m = C_t, σ² = softplus(α) + 1e-5 with α initialised so that σ² = 5. A pair of different resolutions is
first brought to the smaller one by adaptive average pooling (of whichever map is larger).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.losses.vid import inverse_softplus, vid_nll, vid_variance
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.feature.layers import LayerSpec, pair_layers, resolve_layers
from gendd_framework.methods.feature.projectors import match_spatial
from gendd_framework.methods.terms import LossTerm, require_shapes
from gendd_framework.registry import LOSSES, METHODS


class VIDRegressor(nn.Module):
    """Mean μ(s) (three bias-free 1x1 convs with ReLUs) and per-channel log-scale α of σ² = softplus(α)+ε."""

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, init_pred_var: float, eps: float
    ):
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False),
        )
        self.log_scale = nn.Parameter(torch.full((out_channels,), inverse_softplus(init_pred_var - eps)))
        self.eps = eps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return vid_nll(self.mean(student), teacher, vid_variance(self.log_scale, self.eps))


def _same_direction(s_hw: Sequence[int], t_hw: Sequence[int]) -> bool:
    """Pooling reaches a common resolution only if one map is at least as large in both dimensions."""
    return (s_hw[0] >= t_hw[0] and s_hw[1] >= t_hw[1]) or (s_hw[0] <= t_hw[0] and s_hw[1] <= t_hw[1])


@LOSSES.register("vid")
class VIDLoss(LossTerm):
    """Σ over stage pairs of the Gaussian NLL of the teacher map given the student map; logs each pair."""

    def __init__(
        self,
        student_layers: LayerSpec = "auto",
        teacher_layers: LayerSpec = "auto",
        mid_channels: int | None = None,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if mid_channels is not None and (
            isinstance(mid_channels, bool) or not isinstance(mid_channels, int) or mid_channels < 1
        ):
            raise ConfigError(
                f"vid mid_channels must be null (teacher channels) or an int >= 1, got {mid_channels!r}"
            )
        try:
            eps, init_pred_var = float(eps), float(init_pred_var)
        except (TypeError, ValueError):
            raise ConfigError(
                f"vid eps and init_pred_var are numbers, got {eps!r} and {init_pred_var!r}"
            ) from None
        if not eps > 0 or not init_pred_var > eps:
            raise ConfigError(
                f"vid needs eps > 0 and init_pred_var > eps, got eps={eps}, init_pred_var={init_pred_var}"
            )
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        self.mid_channels = mid_channels
        self.init_pred_var, self.eps = init_pred_var, eps
        self.regressors = nn.ModuleList()

    def bind(self, student, teacher, facts) -> None:
        shape = facts.get("input_shape")
        s = resolve_layers(student, self.student_layers, shape, "student_layers")
        t = resolve_layers(teacher, self.teacher_layers, shape, "teacher_layers")
        if len(s) != len(t):
            if self.student_layers not in (None, "auto") and self.teacher_layers not in (None, "auto"):
                raise ConfigError(
                    f"vid pairs layers one to one: `student_layers` selects {len(s)} ({s}) and "
                    f"`teacher_layers` {len(t)} ({t})"
                )
            s, t = pair_layers(s, t, "vid")  # default stages of different depth: the deepest of each
        self.student_taps, self.teacher_taps = tuple(s), tuple(t)

    def setup(self, shapes) -> None:
        shapes = require_shapes(shapes, "vid")
        self.regressors = nn.ModuleList()
        for s_tap, t_tap in zip(self.student_taps, self.teacher_taps):
            s_shape, t_shape = tuple(shapes["student"][s_tap]), tuple(shapes["teacher"][t_tap])
            where = f"`student_layers` {s_tap} gives {s_shape}, `teacher_layers` {t_tap} gives {t_shape}"
            if len(s_shape) != 3 or len(t_shape) != 3:
                raise ConfigError(f"vid needs (C, H, W) maps: {where}")
            if not _same_direction(s_shape[1:], t_shape[1:]):
                raise ConfigError(f"vid pools the larger map to the smaller one, but neither is: {where}")
            mid = self.mid_channels or t_shape[0]
            self.regressors.append(VIDRegressor(s_shape[0], mid, t_shape[0], self.init_pred_var, self.eps))

    def forward(self, student, teacher, batch, ctx):
        parts: dict[str, torch.Tensor] = {}
        total = None
        pairs = zip(self.student_taps, self.teacher_taps, self.regressors)
        for i, (s_tap, t_tap, regressor) in enumerate(pairs):
            f_s, f_t = match_spatial(student[s_tap], teacher[t_tap])
            work = torch.promote_types(f_s.dtype, torch.float32)
            with torch.autocast(device_type=f_s.device.type, enabled=False):  # log σ² and the ratio in fp32
                value = regressor(f_s.to(work), f_t.to(work))
            parts[f"layer{i}"] = value
            total = value if total is None else total + value
        return {"loss": total, **parts}


@METHODS.register("vid")
class VIDMethod(ComposedMethod):
    """CE + w·Σ_stages NLL (CIFAR-100 defaults: w=1, every stage, mid = teacher channels, σ²₀=5, ε=1e-5)."""

    uses = (
        Use("ce", weight="ce_weight"),
        Use(
            "vid",
            weight="feature_weight",
            args=("student_layers", "teacher_layers", "mid_channels", "init_pred_var", "eps"),
        ),
    )
    defaults = {"ce_weight": 1.0, "feature_weight": 1.0}
