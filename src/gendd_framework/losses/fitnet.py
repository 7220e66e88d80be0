"""FitNets (Romero et al. ICLR'15): the hint loss between the regressed student map and the teacher map.

    L_hint = mean over (batch, channel, position) of (r(s) − t)²

with r the regressor that maps the student's guided-layer map s to the shape of the teacher's hint map t.
The mean (not the paper's ½·sum) is the reduction of CRD/RepDistiller/mdistiller, whose weight β = 100
is tuned for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gendd_framework.errors import ConfigError


def hint_mse(regressed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of equal-shape maps (a shape mismatch is a layer/regressor config error)."""
    if regressed.shape != target.shape:
        raise ConfigError(
            f"fitnet: regressed student map {tuple(regressed.shape)} and teacher hint map "
            f"{tuple(target.shape)} differ; pick other layers or regressor: conv"
        )
    return F.mse_loss(regressed, target)
