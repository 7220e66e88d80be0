"""One source per default: where a default is stated in more than one place, the places agree.

Every default is written once in Python: a loss term's in its `__init__`, a composed method's weights,
schedule settings and published differences in its declaration (`ComposedMethod.defaults`), a hand-written
method's in its signature, the trainer's in `schema`. The YAML presets spell them out (so the command
line can override any key and `config_resolved.yaml` shows every value); this file compares every key
that appears in more than one of those places, for every registered term and method and every
`conf/method/*.yaml`, and fails naming the key and both values.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

import gendd_framework
import gendd_framework.components  # noqa: F401  (every built-in registration)
from gendd_framework import schema
from gendd_framework.analysis.published import same
from gendd_framework.cli import config_dir
from gendd_framework.methods.compose import ComposedMethod, Pick, Use, term_parameters
from gendd_framework.registry import ALL, LOSSES, METHODS

CONF = config_dir()
PRESET_ONLY = ("per_recipe", "recipe_keeps")  # read by `config.apply_recipe`, never by the method
TERM_NODE_KEYS = ("name", "weight", "key", "schedule")  # a `losses:` item's keys besides the term's own


def defaults_of(factory: Callable[..., Any]) -> dict[str, Any]:
    """{parameter: default} of a registered factory or class (its derived signature for composed ones)."""
    params = inspect.signature(factory).parameters
    return {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}


def is_composed(factory: Any) -> bool:
    return inspect.isclass(factory) and issubclass(factory, ComposedMethod)


# -- the comparisons (pure: the tests below feed them the real registries and presets) ---------------
def composed_disagreements(cls: type[ComposedMethod]) -> list[str]:
    """A composed method's own `defaults` must not restate a term's default (one place for each value);
    the derived table itself refuses keys whose terms' defaults differ (TypeError)."""
    try:
        cls.key_table()
    except TypeError as err:
        return [str(err)]
    found = []
    for use in cls.uses:
        params = term_parameters(use.loss)
        for arg, source in use.arg_keys().items():
            key = source.key if isinstance(source, Pick) else source
            if key in cls.defaults and same(cls.defaults[key], params[arg].default):
                found.append(
                    f"{cls.__name__}.defaults['{key}'] = {cls.defaults[key]!r} restates the default of "
                    f"loss '{use.loss}' argument '{arg}': drop it"
                )
    return found


def preset_disagreements(where: str, factory: Callable[..., Any], preset: Mapping[str, Any]) -> list[str]:
    """A method preset (composed, `name` and `per_recipe` removed) against its factory: every key is a
    parameter, and a key with a Python default has that default; a nested `{name: ...}` component node
    (GenDD's head, sampler, ...) is compared with that component's own registered signature."""
    params = inspect.signature(factory).parameters
    defaults = defaults_of(factory)
    found = []
    for key, value in preset.items():
        if key not in params:
            found.append(f"{where}: '{key}' is not an argument of the method ({', '.join(params)})")
        elif key in defaults and defaults[key] is not None and not same(value, defaults[key]):
            found.append(f"{where}: {key} = {value!r}, the Python default is {defaults[key]!r}")
        elif isinstance(value, Mapping) and "name" in value and key in ALL:
            component = ALL[key].get(value["name"])
            node = {k: v for k, v in value.items() if k != "name"}
            found += preset_disagreements(f"{where}.{key}", component, node)
    return found


def custom_term_disagreements(name: str, factory: Callable[..., Any]) -> list[str]:
    """A hand-written method restating the arguments of its own loss term (registered under its name,
    or the name before its last `_`: fitnet_hint -> fitnet) must restate them with equal defaults."""
    term = name if name in LOSSES else name.rsplit("_", 1)[0]
    if term not in LOSSES:
        return []
    term_defaults = defaults_of(LOSSES.get(term))
    return [
        f"method '{name}': {key} = {value!r}, loss '{term}' has {term_defaults[key]!r}"
        for key, value in defaults_of(factory).items()
        if key in term_defaults and not same(value, term_defaults[key])
    ]


def term_node_disagreements(where: str, node: Mapping[str, Any]) -> list[str]:
    """A `losses:` item names a registered term and only that term's arguments (its values are the
    recipe's: a composition states what it runs)."""
    params = term_parameters(node["name"])
    extra = [k for k in node if k not in params and k not in TERM_NODE_KEYS]
    return [f"{where}: loss '{node['name']}' has no argument(s) {extra}"] if extra else []


# -- the presets ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def presets() -> dict[str, dict[str, Any]]:
    """Every conf/method/*.yaml by file stem, as a run composes it (Hydra only for the presets with a
    defaults list: composing is slow, and the flat ones compose to their own contents)."""
    out = {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for path in sorted((CONF / "method").glob("*.yaml")):
            node = OmegaConf.load(path)
            if "defaults" in node:
                node = hydra_compose(config_name=f"method/{path.stem}").method
            out[path.stem] = OmegaConf.to_container(node, resolve=False)  # dml's peer: ${student}
    return out


def split_preset(preset: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(method name, the values, per_recipe table)."""
    values = {k: v for k, v in preset.items() if k != "name" and k not in PRESET_ONLY}
    return preset["name"], values, dict(preset.get("per_recipe") or {})


def term_nodes(values: Mapping[str, Any], table: Mapping[str, Any], stem: str) -> Iterator[tuple[str, dict]]:
    for where, losses in [
        (stem, values.get("losses")),
        *((f"{stem}@{r}", e.get("losses")) for r, e in table.items()),
    ]:
        for i, node in enumerate(losses or []):
            yield f"{where}.losses.{i}", node


# -- the tests --------------------------------------------------------------------------------------------
def test_built_in_methods_that_only_combine_terms_are_declared_not_written():
    """No built-in method factory restates its terms' keys: the forwarding ones are declarations."""
    package = Path(gendd_framework.__file__).parent
    composed = [n for n in METHODS.names() if is_composed(METHODS.get(n))]
    assert len(composed) >= 19
    for name in composed:
        assert package in Path(inspect.getsourcefile(METHODS.get(name))).parents
        assert composed_disagreements(METHODS.get(name)) == [], name


def test_every_method_preset_agrees_with_its_python_defaults(presets):
    found = []
    for stem, preset in presets.items():
        name, values, table = split_preset(preset)
        factory = METHODS.get(name)
        if name == stem:  # the method's own preset: its values are the defaults
            found += preset_disagreements(f"conf/method/{stem}.yaml", factory, values)
        else:  # a variant (kd_ls, dkd_ls, gendd_unsup, ...): another published recipe, keys only
            found += [m for m in preset_disagreements(stem, factory, values) if "not an argument" in m]
        for recipe, entry in table.items():  # per-recipe values differ on purpose: keys only
            found += [
                m for m in preset_disagreements(f"{stem}@{recipe}", factory, entry) if "not an argument" in m
            ]
        for where, node in term_nodes(values, table, stem):
            found += term_node_disagreements(where, node)
    assert found == []


def test_hand_written_methods_agree_with_their_terms():
    found = []
    for name in METHODS.names():
        factory = METHODS.get(name)
        if not is_composed(factory):
            found += custom_term_disagreements(name, factory)
    assert found == []


def test_the_temperature_divergences_are_gone(presets):
    """DIST: the term said τ 1, `method=dist` runs τ 4; WKD-L: the term said τ 4, the method τ 8."""
    for name, tau in (("dist", 4.0), ("wkd_l", 8.0)):
        term = defaults_of(LOSSES.get(name))["temperature"]
        method = defaults_of(METHODS.get(name))["temperature"]
        assert term == method == presets[name]["temperature"] == tau, name
    assert defaults_of(METHODS.get("meal_v2"))["discriminator"] is presets["meal_v2"]["discriminator"] is True


def test_a_divergence_is_reported():
    """The comparisons are not vacuous: each kind of disagreement is named with its key and values."""
    kd = METHODS.get("kd")
    preset = {"alpha": 0.1, "beta": 0.9, "temperature": 2.0, "standardize": False}
    assert preset_disagreements("kd.yaml", kd, preset) == [
        "kd.yaml: temperature = 2.0, the Python default is 4.0"
    ]
    assert "'temprature' is not an argument" in preset_disagreements("kd.yaml", kd, {"temprature": 4.0})[0]
    old_dist = {"ce_weight": 1.0, "kd_weight": 2.0, "temperature": 1.0}  # the term's former τ
    assert preset_disagreements("dist.yaml", METHODS.get("dist"), old_dist) != []

    class Restating(ComposedMethod):
        uses = (Use("ce", weight="ce_weight"), Use("kd_kl", args=("temperature",)))
        defaults = {"ce_weight": 1.0, "temperature": 4.0}

    assert "restates the default of loss 'kd_kl'" in composed_disagreements(Restating)[0]

    class Clashing(ComposedMethod):  # one key feeding two arguments whose defaults differ
        uses = (Use("kd_kl", args=("temperature",)), Use("pld", args=("temperature",)))

    assert "defaults differ" in composed_disagreements(Clashing)[0]
    gendd = {"head": {"name": "mlp_adaln", "width": -1}}
    default_width = defaults_of(ALL["head"].get("mlp_adaln"))["width"]
    assert preset_disagreements("gendd.yaml", METHODS.get("gendd"), gendd) == [
        f"gendd.yaml.head: width = -1, the Python default is {default_width!r}"
    ]
    assert term_node_disagreements("x", {"name": "dist", "tau": 4.0}) == [
        "x: loss 'dist' has no argument(s) ['tau']"
    ]


def test_trainer_preset_agrees_with_the_schema():
    """conf/trainer/default.yaml spells out every loop setting with the schema's defaults."""
    preset = OmegaConf.to_container(OmegaConf.load(CONF / "trainer" / "default.yaml"))
    assert set(preset) == set(schema.TRAINER_KEYS)
    python = {f.name: f.default for f in dataclasses.fields(schema.TrainerConfig)}
    python["speed"] = dataclasses.asdict(schema.SpeedConfig())
    python["teacher_cache"] = dataclasses.asdict(schema.CacheConfig())
    for key, default in python.items():
        assert same(preset[key], default) or preset[key] == default, (key, preset[key], default)
    assert schema.trainer_config(preset).epochs == preset["epochs"]


def test_loader_keys_are_one_list():
    """Every dataset's `loader:` uses the schema's keys, and the runtime merges over its defaults."""
    for path in (CONF / "data").glob("*.yaml"):
        loader = OmegaConf.load(path).get("loader") or {}
        assert set(loader) <= set(schema.LOADER_KEYS), path.name
    assert schema.loader_config({"batch_size": 8}) == {**schema.LOADER_DEFAULTS, "batch_size": 8}
    with pytest.raises(
        Exception, match=r"unknown config key 'data.loader.batchsize' \(did you mean 'batch_size'\?\)"
    ):
        schema.loader_config({"batchsize": 8})


def test_the_cache_folder_default_is_written_once():
    """`paths.cache_dir`'s default lives in conf/train.yaml only; the engine gets the folder as a value."""
    package = Path(gendd_framework.__file__).parent
    sources = [p for p in package.rglob("*.py") if ".cache/gendd" in p.read_text()]
    assert sources == []
    assert ".cache/gendd" in (CONF / "train.yaml").read_text()
    assert schema.cache_dir({"cache_dir": "~/x"}) == Path("~/x").expanduser()
    assert schema.cache_dir({}) is None
