"""Which intermediate maps a feature term reads: `auto`, `stages`, `preact`, stage indices, or paths.

A feature term takes `student_layers` / `teacher_layers`:
- `auto` (default): the term's published choice among the family's stage maps (see
  `models/feature_stages.py`): the official `is_feat` maps, or their pre-activation versions for a
  term whose authors regress those (ReviewKD's teacher side);
- `stages` / `preact`: every `is_feat` map / every pre-activation map of the family;
- an int or list of ints: indices into the term's default list (negative counts from the deepest);
- a string or list of strings: module paths, optionally `path:input` (read the module's input).
The pooled penultimate vector is the tap `feature`; logits are `logits`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.models.feature_stages import feature_stages, preact_stages
from gendd_framework.models.tap import parse_tap

LayerSpec = str | int | Sequence[str | int] | None
log = logging.getLogger(__name__)


def default_stages(model: nn.Module, input_shape: Sequence[int] | None, key: str, preact: bool) -> list[str]:
    """The family's stage maps; with `preact`, their pre-activation versions where the family has
    them (else the stage maps, logged: e.g. a ViT has no pre-activation maps)."""
    if preact:
        stages = preact_stages(model, input_shape, keys=f"`{key}`")
        if stages is not None:
            return stages
        log.info("%s has no pre-activation stage maps: `%s` reads its stage maps", type(model).__name__, key)
    return feature_stages(model, input_shape, keys=f"`{key}`")


def resolve_layers(
    model: nn.Module,
    spec: LayerSpec,
    input_shape: Sequence[int] | None,
    key: str,
    auto: slice | Sequence[int] = slice(None),
    preact: bool = False,
) -> list[str]:
    """Tap keys for `spec` on `model`; `auto` selects from the default stages when spec is `auto`/None.

    `preact` makes the term's default list (for `auto` and indices) the pre-activation maps. `key` is
    the config key (e.g. `student_layers`) named in errors.
    """
    if spec in ("stages", "preact"):
        return feature_stages(model, input_shape, keys=f"`{key}`", preact=spec == "preact")
    if spec is None or spec == "auto":
        stages = default_stages(model, input_shape, key, preact)
        if isinstance(auto, slice):
            return stages[auto]
        return [stages[i] for i in auto]
    items: list[Any] = [spec] if isinstance(spec, (str, int)) else list(spec)
    out: list[str] = []
    stages: list[str] | None = None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ConfigError(f"`{key}` entries are stage indices or module paths, got {item!r}")
        if isinstance(item, int):
            if stages is None:
                stages = default_stages(model, input_shape, key, preact)
            if not -len(stages) <= item < len(stages):
                raise ConfigError(
                    f"`{key}` index {item} is out of range: {type(model).__name__} has {len(stages)} "
                    f"default stages {stages}"
                )
            out.append(stages[item])
        else:
            out.append(parse_tap(item)[0])
    if not out:
        raise ConfigError(f"`{key}` selects no layer")
    return out


def pair_layers(student: list[str], teacher: list[str], what: str) -> tuple[list[str], list[str]]:
    """Pair stage lists of different lengths by depth: the deepest `min(len)` of each side."""
    k = min(len(student), len(teacher))
    if k == 0:
        raise ConfigError(f"{what} needs at least one student and one teacher layer")
    return student[len(student) - k :], teacher[len(teacher) - k :]
