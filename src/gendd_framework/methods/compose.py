"""Methods as weighted sums of registered loss terms, each with an optional weight schedule.

`loss = Σ weight_i · schedule_i(ctx) · term_i(student_taps, teacher_taps, batch, ctx)`. Every term is
logged by its key (and its parts as `key/part`); scheduled terms also log their effective weight.
This is the one mechanism behind `ce`, `kd`, `dkd`, `dist`, `wkd_l`, `pld`, `meal_v2`, the feature
methods and any YAML composition (`method=distill`), so a feature term adds to any logit method in config.

A named method that only combines terms is a `ComposedMethod`: a declaration of its terms (`Use`) and of
which method key feeds which term argument, weight or schedule setting. It writes no term default again:
a key that feeds a term argument takes the term's default, and `defaults` holds only the method's own
keys (weights, schedule settings, switches) and published values that differ from a term's default. Its
signature, which the registry checks YAML keys against and `gendd-list methods` shows, is derived.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from gendd_framework.context import DataFacts, StepContext
from gendd_framework.errors import ConfigError
from gendd_framework.methods.base import Method, missing_teacher
from gendd_framework.registry import LOSSES, METHODS, WEIGHT_SCHEDULES, check_kwargs, split_spec


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


# -- methods declared as data -----------------------------------------------------------------------
@dataclass(frozen=True)
class Pick:
    """A method key fed to a term argument through `fn` (e.g. one entry of a per-stage list); `fn` must
    return the term's default unchanged, so that default stays the key's default."""

    key: str
    fn: Callable[[Any], Any]


@dataclass(frozen=True)
class Use:
    """One loss term of a `ComposedMethod` and the method keys that configure it.

    `weight`: a method key whose value is the term's weight, or a fixed number. `args`: term arguments
    fed by the method key of the same name, or `{term argument: method key or Pick}`. `schedule`: the
    weight schedule, `{"name": <schedule>, <argument>: <method key>}`. `when`: a method key; the term is
    left out while its value is falsy (KD off at `kd_weight: 0`)."""

    loss: str
    weight: str | float = 1.0
    args: Sequence[str] | Mapping[str, str | Pick] = ()
    schedule: Mapping[str, str] | None = None
    when: str | None = None

    def arg_keys(self) -> dict[str, str | Pick]:
        return dict(self.args) if isinstance(self.args, Mapping) else {a: a for a in self.args}


RUNTIME = ("student", "teacher", "input_shape", "num_samples")  # what the build passes besides the keys
_KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD


def term_parameters(loss: str) -> Mapping[str, inspect.Parameter]:
    """A registered loss term's keyword arguments (annotations evaluated where possible)."""
    term = LOSSES.get(loss)
    try:
        return inspect.signature(term, eval_str=True).parameters
    except (NameError, TypeError, SyntaxError):  # unresolvable forward references
        return inspect.signature(term).parameters


class _DerivedSignature:
    """`ComposedMethod.__signature__`: the runtime arguments plus every method key with its default,
    computed from the declaration when read (terms may register after the method's module)."""

    def __get__(self, instance: Any, owner: type[ComposedMethod]) -> inspect.Signature:
        runtime = [
            inspect.Parameter(n, _KEYWORD, default=inspect.Parameter.empty if n == "student" else None)
            for n in RUNTIME
        ]
        keys = [
            inspect.Parameter(key, _KEYWORD, default=default, annotation=annotation)
            for key, (default, annotation) in owner.key_table().items()
        ]
        return inspect.Signature(runtime + keys)


class ComposedMethod(WeightedLossMethod):
    """A weighted sum of registered terms declared as data (`uses`, `defaults`); see the module docstring.

    Subclasses set `uses` and `defaults` and are registered with `@METHODS.register(name)`; unknown keys
    fail in one line naming the accepted ones (the registry checks them against the derived signature)."""

    uses: ClassVar[tuple[Use, ...]] = ()
    defaults: ClassVar[Mapping[str, Any]] = {}
    __signature__ = _DerivedSignature()

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        input_shape: tuple[int, ...] | None = None,
        num_samples: int | None = None,
        **keys: Any,
    ):
        check_kwargs(type(self), {"student": student, **keys}, f"method {type(self).__name__}")
        values = {key: default for key, (default, _) in self.key_table().items()} | keys
        super().__init__(
            student, teacher, self.term_specs(values), input_shape=input_shape, num_samples=num_samples
        )

    @classmethod
    def key_table(cls) -> dict[str, tuple[Any, Any]]:
        """{method key: (default, annotation)} in declaration order. A key feeding a term argument
        defaults to that argument's default unless `defaults` names it; every other key must be there."""
        table: dict[str, tuple[Any, Any]] = {}

        def add(key: str, default: Any, annotation: Any, where: str) -> None:
            if key in cls.defaults:
                default, annotation = cls.defaults[key], table.get(key, (None, annotation))[1]
            elif default is inspect.Parameter.empty:
                raise TypeError(f"{cls.__name__}: method key '{key}' ({where}) needs an entry in `defaults`")
            elif key in table and table[key][0] != default:
                raise TypeError(
                    f"{cls.__name__}: method key '{key}' feeds arguments whose defaults differ "
                    f"({table[key][0]!r} and {default!r}): state the published value in `defaults`"
                )
            table.setdefault(key, (default, annotation))

        for use in cls.uses:
            params = term_parameters(use.loss)
            if isinstance(use.weight, str):
                add(use.weight, inspect.Parameter.empty, float, f"weight of {use.loss}")
            if use.when is not None:
                add(use.when, inspect.Parameter.empty, inspect.Parameter.empty, f"switch of {use.loss}")
            for arg, source in use.arg_keys().items():
                if arg not in params:
                    raise TypeError(f"{cls.__name__}: loss '{use.loss}' has no argument '{arg}'")
                default = params[arg].default
                if isinstance(source, Pick):
                    if default is not inspect.Parameter.empty and source.fn(default) != default:
                        raise TypeError(f"{cls.__name__}: Pick for '{arg}' changes the term's default")
                    source = source.key
                add(source, default, params[arg].annotation, f"{use.loss}.{arg}")
            for arg, key in (use.schedule or {}).items():
                if arg != "name":
                    add(key, inspect.Parameter.empty, float, f"schedule of {use.loss}")
        unused = set(cls.defaults) - set(table)
        if unused:
            raise TypeError(f"{cls.__name__}: `defaults` names keys that feed no term: {sorted(unused)}")
        return {
            key: (default, type(default) if annotation is inspect.Parameter.empty else annotation)
            for key, (default, annotation) in table.items()
        }

    @classmethod
    def term_specs(cls, values: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The `{name, weight, <args>, schedule}` term list `WeightedLossMethod` builds from."""
        specs = []
        for use in cls.uses:
            if use.when is not None and not values[use.when]:
                continue
            weight = values[use.weight] if isinstance(use.weight, str) else use.weight
            spec: dict[str, Any] = {"name": use.loss, "weight": weight}
            for arg, source in use.arg_keys().items():
                spec[arg] = source.fn(values[source.key]) if isinstance(source, Pick) else values[source]
            if use.schedule:
                spec["schedule"] = {a: k if a == "name" else values[k] for a, k in use.schedule.items()}
            specs.append(spec)
        return specs
