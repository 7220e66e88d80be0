"""A frozen teacher ensemble whose output is one set of logits, so every method treats it as one teacher.

`combine: probs` averages the members' probabilities and returns their log (softmax of the output is
exactly the mean probability: MEAL V2's soft target); `combine: logits` averages the logits. Members'
modules stay addressable by path (`members.0.fc:input`); there is no single `feature` tap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.schema import COMBINE, DEFAULT_COMBINE


class EnsembleTeacher(nn.Module):
    """Several classifiers over the same classes, combined into one output."""

    has_single_classifier = False

    def __init__(self, members: Sequence[nn.Module], combine: str = DEFAULT_COMBINE) -> None:
        super().__init__()
        if combine not in COMBINE:
            raise ConfigError(f"teacher.combine must be one of {COMBINE}, got '{combine}'")
        if len(members) < 1:
            raise ConfigError("a teacher ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([member(x).float() for member in self.members])  # (M, B, C)
        if self.combine == "logits":
            return logits.mean(0)
        return torch.logsumexp(logits.log_softmax(dim=-1), dim=0) - math.log(len(self.members))
