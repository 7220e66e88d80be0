"""Methods as weighted sums of registered loss terms, each with an optional weight schedule.

`loss = Σ weight_i · schedule_i(ctx) · term_i(student_taps, teacher_taps, batch, ctx)`. Every term is
logged by its key (and its parts as `key/part`); scheduled terms also log their effective weight.
This is the one mechanism behind `ce`, `kd`, `dkd`, `dist`, `wkd_l`, `pld`, `meal_v2` and any YAML
composition (`method=distill`), so a feature term adds to any logit method in config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gendd_framework.context import DataFacts, StepContext
from gendd_framework.errors import ConfigError
from gendd_framework.methods.base import Method, missing_teacher
from gendd_framework.registry import LOSSES, METHODS, WEIGHT_SCHEDULES, split_spec


class WeightedLossMethod(Method):
    """loss = Σ weight_i · schedule_i(ctx) · term_i; the terms' taps are collected per side.

    It needs a teacher exactly when one of its terms does (`needs_teacher`, set per instance); a
    teacher given to a method whose terms ignore it (CE) is not kept."""

    needs_teacher = False  # decided per instance from the terms, below

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        terms: Sequence[Mapping[str, Any]],
        input_shape: tuple[int, ...] | None = None,
        num_samples: int | None = None,
        facts: DataFacts | None = None,
    ):
        if not terms:
            raise ConfigError("a distillation method needs at least one loss term")
        built, weights, keys, schedules = [], [], [], []
        for spec in terms:
            name, kwargs = split_spec(spec, "loss")
            weights.append(float(kwargs.pop("weight", 1.0)))
            keys.append(str(kwargs.pop("key", name)))
            schedule = kwargs.pop("schedule", None)
            schedules.append(WEIGHT_SCHEDULES.build(schedule) if schedule else None)
            built.append(LOSSES.build({"name": name, **kwargs}))
        if len(set(keys)) != len(keys):
            raise ConfigError(f"loss term keys must be unique, got {keys}; set `key:` on repeated terms")
        needs_teacher = any(t.needs_teacher for t in built)
        if needs_teacher and teacher is None:
            users = [k for k, t in zip(keys, built) if t.needs_teacher]
            raise ConfigError(missing_teacher(f"this method (loss term {', '.join(users)})"))
        if facts is None:  # built without the run's facts (tests, scripts): what the caller gave
            facts = DataFacts(num_classes=None, input_shape=input_shape, num_samples=num_samples)
        else:
            input_shape = input_shape if input_shape is not None else facts.input_shape
        for term in built:
            term.bind(student, teacher if needs_teacher else None, facts)
        student_taps = ["logits", *(tap for t in built for tap in t.student_taps)]
        teacher_taps = ["logits", *(tap for t in built for tap in t.teacher_taps)]
        super().__init__(
            student,
            teacher if needs_teacher else None,
            student_taps=student_taps,
            teacher_taps=teacher_taps,
            input_shape=input_shape,
        )
        self.needs_teacher = needs_teacher
        self.terms = nn.ModuleList(built)
        self.weights, self.keys, self.schedules = weights, keys, schedules
        shapes = self.tap_shapes() if input_shape is not None else None
        for term in self.terms:
            term.setup(shapes)

    def prepare(self, stats: Any) -> None:
        for term in self.terms:
            term.prepare(stats)

    def training_step(self, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        x = batch["input"]
        teacher_out = self.teacher_outputs(x, batch) if self.teacher is not None else None  # frozen: first
        student_out = self.student(x)
        out: dict[str, torch.Tensor] = {}
        total = None
        for key, term, weight, schedule in zip(self.keys, self.terms, self.weights, self.schedules):
            value = term(student_out, teacher_out, batch, ctx)
            if isinstance(value, Mapping):
                out.update({f"{key}/{part}": v.detach() for part, v in value.items() if part != "loss"})
                value = value["loss"]
            out[key] = value
            if schedule is not None:
                weight = weight * schedule(ctx)
                out[f"weight/{key}"] = value.new_full((), weight)  # a fill, not a host-to-device copy
            total = weight * value if total is None else total + weight * value
        out["loss"] = total
        return out

    def extra_repr(self) -> str:
        parts = [
            f"{w:g}*{k}" + ("*schedule" if s is not None else "")
            for w, k, s in zip(self.weights, self.keys, self.schedules)
        ]
        return "loss = " + " + ".join(parts)


@METHODS.register("distill")
def distill(
    student: nn.Module,
    losses: list,
    teacher: nn.Module | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_samples: int | None = None,
    facts: DataFacts | None = None,
):
    """Any weighted sum of loss terms: `losses: [{name: ce, weight: 0.1}, {name: kd_kl, weight: 0.9}]`;
    a term may carry `schedule: {name: linear_warmup, epochs: 20}` and `key:` (for repeated terms)."""
    return WeightedLossMethod(
        student, teacher, losses, input_shape=input_shape, num_samples=num_samples, facts=facts
    )
