"""Value checks for the composed config: one declarative table, one line per bad value.

Each `Rule` names a dotted key (`*` matches every list item or mapping key) and what it allows, so a
bad value fails at start-up as `config key 'trainer.epochs' = -1: must be an integer >= 1` instead of
silently running (1.5 epochs ran 2) or failing deep inside torch after the teacher has trained.
Component names and keyword arguments are not checked here: plugins can add them, so the registry
checks them when `pipeline.preflight` builds every component.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from gendd_framework.errors import ConfigError
from gendd_framework.schema import (
    CACHE_DTYPES,
    CACHE_MODES,
    COMBINE,
    COMPILE_MODES,
    PRECISIONS,
    TEACHER_MODES,
)

ABSENT: Any = object()


@dataclass(frozen=True)
class Allowed:
    """A predicate on a value plus the phrase a failing value is told ('an integer >= 1')."""

    test: Callable[[Any], bool]
    text: str

    def or_null(self) -> Allowed:
        return Allowed(lambda v: v is None or self.test(v), f"null or {self.text}")


@dataclass(frozen=True)
class Rule:
    """`key` must satisfy `allowed` when present; `required` keys must also be present whenever their
    parent node is (a null or absent parent is left to the parent's own rule)."""

    key: str
    allowed: Allowed
    required: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_mapping(v: Any) -> bool:
    return isinstance(v, (DictConfig, Mapping))


def _is_list(v: Any) -> bool:
    return isinstance(v, (ListConfig, list, tuple))


def _is_named(v: Any) -> bool:
    return _is_mapping(v) and "name" in v and isinstance(v["name"], str) and v["name"] != ""


def integer(lo: int | None = None) -> Allowed:
    if lo is None:
        return Allowed(_is_int, "an integer")
    return Allowed(lambda v: _is_int(v) and v >= lo, f"an integer >= {lo}")


def number(*, gt: float | None = None, ge: float | None = None, le: float | None = None) -> Allowed:
    """A finite int or float (never a bool or a quoted string) within the given bounds."""

    def test(v: Any) -> bool:
        return (
            _is_number(v) and (gt is None or v > gt) and (ge is None or v >= ge) and (le is None or v <= le)
        )

    if gt is not None and le is not None:
        text = f"a number in ({gt}, {le}]"
    elif ge is not None and le is not None:
        text = f"a number in [{ge}, {le}]"
    elif gt is not None:
        text = f"a number > {gt}"
    elif ge is not None:
        text = f"a number >= {ge}"
    else:
        text = "a number"
    return Allowed(test, text)


def one_of(*choices: str) -> Allowed:
    return Allowed(lambda v: isinstance(v, str) and v in choices, "one of " + ", ".join(choices))


def list_of(item: Allowed, *, non_empty: bool = False) -> Allowed:
    def test(v: Any) -> bool:
        return _is_list(v) and (len(v) > 0 or not non_empty) and all(item.test(x) for x in v)

    return Allowed(test, ("a non-empty list of " if non_empty else "a list of ") + item.text)


BOOL = Allowed(lambda v: isinstance(v, bool), "true or false")
STRING = Allowed(lambda v: isinstance(v, str) and v != "", "a non-empty string")
MAPPING = Allowed(_is_mapping, "a mapping")
NAMED = Allowed(_is_named, "a mapping with a 'name' key, e.g. {name: ...}")
NAME_OR_NAMED = Allowed(
    lambda v: (isinstance(v, str) and v != "") or _is_named(v), "a name or a {name: ...} mapping"
)
NON_EMPTY_LIST = Allowed(lambda v: _is_list(v) and len(v) > 0, "a non-empty list")
FRACTION = number(gt=0, le=1)
DEVICE = Allowed(
    lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None,
    "auto, cpu, cuda, cuda:N or mps",
)
SELECT = Allowed(
    lambda v: isinstance(v, str) and re.fullmatch(r"[^/\s]+/\S+", v) is not None,
    "a '<metric>/<output>' name such as acc/student",
)


def optimizer_rules(at: str) -> tuple[Rule, ...]:
    """The optimizer keys every optimizer shares, wherever an optimizer is configured."""
    return (
        Rule(at, NAMED),
        Rule(f"{at}.lr", number(gt=0)),
        Rule(f"{at}.weight_decay", number(ge=0)),
        Rule(f"{at}.momentum", number(ge=0, le=1)),
        Rule(f"{at}.betas", list_of(number(ge=0, le=1))),
        Rule(f"{at}.beta2_min", number(ge=0, le=1).or_null()),
        Rule(f"{at}.fused", BOOL.or_null()),
        Rule(f"{at}.foreach", BOOL.or_null()),
    )


def scheduler_rules(at: str) -> tuple[Rule, ...]:
    return (
        Rule(at, NAMED),
        Rule(f"{at}.warmup_epochs", number(ge=0)),
        Rule(f"{at}.min_lr_ratio", number(ge=0, le=1)),
        Rule(f"{at}.gamma", number(gt=0)),
        Rule(f"{at}.milestones", list_of(number(ge=0))),
    )


def train_recipe_rules(at: str) -> tuple[Rule, ...]:
    """A `train:` recipe (teacher or member); completeness is checked on the merged recipe."""
    return (
        Rule(at, MAPPING.or_null()),
        Rule(f"{at}.seed", integer()),
        Rule(f"{at}.epochs", integer(1)),
        *optimizer_rules(f"{at}.optim"),
        *scheduler_rules(f"{at}.sched"),
    )


RULES: tuple[Rule, ...] = (
    Rule("seed", integer()),
    Rule("stages", NON_EMPTY_LIST),
    Rule("stages.*", Allowed(NAME_OR_NAMED.test, "a stage name or a {name: ...} mapping")),
    Rule("data", NAMED),
    Rule("student", NAMED),
    Rule("method", NAMED),
    Rule("trainer", MAPPING),
    Rule("trainer.epochs", integer(1)),
    Rule("trainer.eval_every", integer(1)),
    Rule("trainer.accum_steps", integer(1)),
    Rule("trainer.log_every", integer(1)),
    Rule("trainer.grad_clip", number(gt=0).or_null()),
    Rule("trainer.precision", one_of(*PRECISIONS)),
    Rule("trainer.progress", BOOL),
    Rule("trainer.resume", Allowed(lambda v: isinstance(v, bool) or v == "auto", "true or false, or auto")),
    Rule("trainer.select", SELECT.or_null()),
    Rule("trainer.device", DEVICE),
    Rule("trainer.sync_bn", BOOL),
    Rule("trainer.find_unused_parameters", BOOL),
    Rule("trainer.speed", MAPPING.or_null()),  # keys: schema.SpeedConfig (closed in config.py)
    Rule("trainer.speed.channels_last", BOOL),
    Rule("trainer.speed.compile", MAPPING.or_null()),
    *(Rule(f"trainer.speed.compile.{k}", BOOL) for k in ("student", "teacher", "head", "fullgraph")),
    Rule("trainer.speed.compile.mode", one_of(*COMPILE_MODES)),
    Rule("trainer.speed.compile.backend", STRING),
    Rule("trainer.speed.compile.dynamic", BOOL.or_null()),
    Rule("trainer.speed.teacher_mode", one_of(*TEACHER_MODES)),
    Rule("trainer.speed.head_checkpointing", BOOL),
    Rule("trainer.speed.persistent_workers", BOOL),
    Rule("trainer.speed.prefetch_factor", integer(1).or_null()),
    Rule("trainer.teacher_cache", MAPPING.or_null()),  # keys: schema.CacheConfig
    Rule("trainer.teacher_cache.mode", one_of(*CACHE_MODES)),
    Rule("trainer.teacher_cache.dir", STRING.or_null()),
    Rule("trainer.teacher_cache.views", integer(1).or_null()),
    Rule("trainer.teacher_cache.seed", integer()),
    Rule("trainer.teacher_cache.dtype", one_of(*CACHE_DTYPES).or_null()),
    Rule("trainer.teacher_cache.verify", BOOL),
    Rule("data.loader", MAPPING.or_null()),
    Rule("data.loader.batch_size", integer(1)),
    Rule("data.loader.eval_batch_size", integer(1)),
    Rule("data.loader.num_workers", integer(0)),
    Rule("data.loader.pin_memory", BOOL.or_null()),
    Rule("data.root", STRING),
    Rule("data.split_seed", integer()),
    Rule("data.augment", BOOL),
    Rule("data.train_fraction", FRACTION),
    Rule("data.label_fraction", FRACTION),
    Rule("data.val_fraction", number(ge=0, le=1)),  # 0: the literature protocol (val is the test split)
    Rule("data.test_fraction", FRACTION),
    *optimizer_rules("optim"),
    *scheduler_rules("sched"),
    Rule("teacher", MAPPING.or_null()),
    Rule("teacher.model", NAMED.or_null()),
    Rule("teacher.weights", STRING.or_null()),
    Rule("teacher.cache_dir", STRING),
    Rule("teacher.train_if_missing", BOOL),
    Rule("teacher.combine", one_of(*COMBINE)),
    Rule("teacher.run_dir", STRING.or_null()),
    Rule("teacher.members", Allowed(_is_list, "a list").or_null()),
    Rule("teacher.members.*", MAPPING),
    Rule("teacher.members.*.model", NAMED, required=True),
    Rule("teacher.members.*.weights", STRING.or_null()),
    *train_recipe_rules("teacher.train"),
    *train_recipe_rules("teacher.members.*.train"),
    Rule("pretrain", MAPPING.or_null()),
    Rule("pretrain.epochs", integer(1), required=True),
    Rule("pretrain.handover", one_of("last", "best")),
    *optimizer_rules("pretrain.optim"),
    *scheduler_rules("pretrain.sched"),
    Rule("pretrain.optim", NAMED, required=True),
    Rule("pretrain.sched", NAMED, required=True),
    Rule("hint", MAPPING.or_null()),
    Rule("hint.epochs", integer(1), required=True),
    *optimizer_rules("hint.optim"),
    *scheduler_rules("hint.sched"),
    Rule("hint.optim", NAMED, required=True),
    Rule("hint.sched", NAMED, required=True),
    Rule("logger", MAPPING.or_null()),
    Rule("logger.backends", Allowed(_is_list, "a list").or_null()),
    Rule("logger.backends.*", Allowed(NAME_OR_NAMED.test, "a logger name or a {name: ...} mapping")),
    Rule("plugins", list_of(STRING).or_null()),
)


def show(value: Any) -> str:
    """A value as the user wrote it, on one line: null/true/false, strings quoted, long values cut."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    else:
        text = repr(value)
    text = text.replace("\n", "\\n")
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
        text += " (a quoted string, not a number)"
    return text if len(text) <= 100 else text[:97] + "..."


def fail(key: str, value: Any, allowed: str) -> ConfigError:
    """The one-line error every check raises: key, value, what is allowed."""
    if value is ABSENT:
        return ConfigError(f"config key '{key}' is missing: must be {allowed}")
    return ConfigError(f"config key '{key}' = {show(value)}: must be {allowed}")


def child(node: Any, key: str | int, path: str) -> Any:
    """`node[key]` with interpolations resolved, ABSENT when not there; a failing interpolation is a
    ConfigError naming the key rather than an omegaconf traceback."""
    if isinstance(node, ListConfig | list | tuple):
        if not isinstance(key, int) and not str(key).isdigit():
            return ABSENT
        index = int(key)
        if index >= len(node):
            return ABSENT
        key = index
    elif isinstance(node, DictConfig):
        if key not in node.keys():  # noqa: SIM118 - `in` hides '???' and broken interpolations
            return ABSENT
    elif isinstance(node, Mapping):
        return node.get(key, ABSENT)
    else:
        return ABSENT
    try:
        return node[key]
    except Exception as err:  # any resolver failure becomes the key's one-line error
        raise unresolvable(err, path) from None


def unresolvable(err: Exception, key: str | None = None) -> ConfigError:
    """An interpolation that cannot be resolved (`${oc.env:X}` unset, a typo'd `${...}` path) as one line."""
    key = key or getattr(err, "full_key", None) or "?"
    text = str(err).strip()
    reason = text.splitlines()[0] if text else type(err).__name__
    return ConfigError(f"config key '{key}' cannot be resolved: {reason}")


def lookup(node: Any, parts: list[str], path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every key matching `parts`; an absent last part yields ABSENT."""
    if not parts:
        yield path, node
        return
    head, rest = parts[0], parts[1:]
    if not isinstance(node, DictConfig | ListConfig | Mapping | list | tuple):
        return
    if head == "*":
        keys: list[Any] = list(range(len(node))) if _is_list(node) else list(node.keys())
    else:
        keys = [head]
    for key in keys:
        sub = f"{path}.{key}" if path else str(key)
        value = child(node, key, sub)
        if value is ABSENT:
            if not rest:
                yield sub, ABSENT
            continue
        yield from lookup(value, rest, sub)


def check_rules(cfg: DictConfig, rules: tuple[Rule, ...] = RULES) -> None:
    """Raise the first rule violation: a present key with a disallowed value, or a required key absent."""
    for rule in rules:
        for key, value in lookup(cfg, rule.key.split(".")):
            if value is ABSENT:
                if rule.required:
                    raise fail(key, value, rule.allowed.text)
            elif not rule.allowed.test(value):
                raise fail(key, value, rule.allowed.text)


def check_teacher(cfg: DictConfig) -> None:
    """Cross-key teacher checks: a model unless `members`/`run_dir`, and a complete `train` recipe for
    every model that may be trained (a member's `train` refines the shared one key by key)."""
    teacher = cfg.get("teacher")
    if teacher is None:
        return
    members = teacher.get("members") or []
    if not members and not teacher.get("run_dir") and not _is_named(teacher.get("model")):
        raise fail(
            "teacher.model",
            teacher.get("model", ABSENT),
            "a mapping with a 'name' key (e.g. {name: small_cnn}) unless teacher.members or "
            "teacher.run_dir is set",
        )
    shared = teacher.get("train")
    if not members:
        if shared is not None:
            _require_recipe(shared, "teacher.train", "teacher.train")
        return
    for i, member in enumerate(members):
        own = member.get("train")
        merged = {**(dict(shared) if shared else {}), **(dict(own) if own else {})}
        if merged:
            where = f"teacher.members.{i}.train" if own else "teacher.train"
            _require_recipe(merged, where, f"teacher.train or teacher.members.{i}.train")


RECIPE_ALLOWED = {"seed": integer(), "epochs": integer(1), "optim": NAMED, "sched": NAMED}


def _require_recipe(recipe: Mapping[str, Any], where: str, sources: str) -> None:
    for key, allowed in RECIPE_ALLOWED.items():
        if recipe.get(key) is None:
            raise ConfigError(
                f"config key '{where}.{key}' is missing: must be {allowed.text} (set it in {sources}, "
                "or drop the train recipe and give teacher weights)"
            )


STAGE_NEEDS = {"teacher": "teacher", "pretrain": "pretrain", "hint": "hint"}  # stage -> config node it reads
STAGE_NODE_HELP = {
    "hint": "add a `hint:` node (epochs, optim, sched) as experiment=digits/fitnet_stagewise does"
}


def check_stages(cfg: DictConfig) -> None:
    """A listed built-in stage whose config node is absent would fail only when its turn comes."""
    for i, spec in enumerate(cfg.stages):
        name = spec if isinstance(spec, str) else spec.get("name")
        node = STAGE_NEEDS.get(name)
        if node is not None and cfg.get(node) is None:
            raise ConfigError(
                f"config key '{node}' is missing: stage '{name}' (stages.{i}) needs it "
                f"({STAGE_NODE_HELP.get(name, f'pick one with {node}=<name>')}, or drop the stage)"
            )


CROSS_CHECKS: tuple[Callable[[DictConfig], None], ...] = (check_stages, check_teacher)


def check_values(cfg: DictConfig) -> None:
    """Every value rule, then the cross-key checks; the first problem raises a one-line ConfigError."""
    check_rules(cfg)
    for check in CROSS_CHECKS:
        check(cfg)
