"""The published recipes (`published_recipes.yaml`): official settings and top-1 per (method, recipe).

Every row states the authors' settings as config paths of this framework, so one comparison serves the
audit test (the resolved `experiment=<recipe> method=<method>` must equal them, except the documented
deviations) and `gendd-report` (a run is shown next to the published figure, with whether it ran the
published settings). The file ships inside the package; nothing here imports torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from gendd_framework.errors import ConfigError

DATA = Path(__file__).with_name("published_recipes.yaml")
ROW_KEYS = {
    "method", "recipe", "experiment", "source", "protocol", "values", "layers", "deviations", "published",
    "notes",
}  # fmt: skip
_ABSENT = object()


@dataclass(frozen=True)
class Recipe:
    """One audited (method preset, recipe): official `values` by config path (unpublished ones left
    out), the `deviations` we run on purpose ({path: {ours, why}}) and the published top-1."""

    method: str
    recipe: str | None
    experiment: str | None
    repo: str | None
    commit: str | None
    files: tuple[str, ...]
    protocol: str | None
    values: dict[str, Any]
    deviations: dict[str, dict[str, Any]] = field(default_factory=dict)
    layers: str | None = None
    top1: float | None = None
    std: float | None = None
    paper: dict[str, str] | None = None
    notes: str | None = None
    protocol_keys: frozenset[str] = frozenset()  # the paths the protocol block gave (docs show its name)

    @property
    def key(self) -> tuple[str | None, str]:
        return self.recipe, self.method

    @property
    def source(self) -> str:
        """`owner/repo@commit`, or empty when there is no code to read."""
        return f"{self.repo}@{self.commit}" if self.repo else ""


def _protocol(name: str, blocks: Mapping[str, Any], seen: tuple[str, ...] = ()) -> tuple[dict, dict, str]:
    """(values, deviations, display name) of a protocol block, its `base` chain merged first."""
    if name not in blocks or name in seen:
        raise ConfigError(f"{DATA.name}: unknown or circular protocol '{name}'")
    block = blocks[name]
    values, deviations = {}, {}
    if block.get("base"):
        values, deviations, _ = _protocol(block["base"], blocks, (*seen, name))
    values.update(block.get("values") or {})
    deviations.update(block.get("deviations") or {})
    return values, deviations, block.get("name", name)


def _row(raw: Mapping[str, Any], data: Mapping[str, Any], index: int) -> Recipe:
    unknown = set(raw) - ROW_KEYS
    if unknown or "method" not in raw:
        raise ConfigError(f"{DATA.name}: row {index} has unknown keys {sorted(unknown)} or no method")
    values, deviations, protocol = {}, {}, None
    if raw.get("protocol"):
        values, deviations, protocol = _protocol(raw["protocol"], data["protocols"])
    protocol_keys = frozenset(values) - set(raw.get("values") or {})
    values.update(raw.get("values") or {})
    deviations.update(raw.get("deviations") or {})
    for path, dev in deviations.items():
        if path not in values or not isinstance(dev, Mapping) or not {"ours", "why"} <= set(dev):
            raise ConfigError(f"{DATA.name}: row {index}: deviation '{path}' needs official, ours and why")
    values = {k: v for k, v in values.items() if v is not None}  # null: not published, not compared
    deviations = {k: dict(v) for k, v in deviations.items() if k in values}
    source = raw.get("source") or {}
    repo = data["sources"].get(source.get("repo")) if source.get("repo") else None
    if source.get("repo") and repo is None:
        raise ConfigError(f"{DATA.name}: row {index} names unknown source '{source.get('repo')}'")
    published = raw.get("published") or {}
    paper = data["papers"].get(published.get("paper")) if published.get("paper") else None
    if published.get("paper") and paper is None:
        raise ConfigError(f"{DATA.name}: row {index} names unknown paper '{published.get('paper')}'")
    return Recipe(
        method=raw["method"],
        recipe=raw.get("recipe"),
        experiment=raw.get("experiment", raw.get("recipe")),
        repo=repo["repo"] if repo else None,
        commit=repo["commit"] if repo else None,
        files=tuple(source.get("files") or ()),
        protocol=protocol,
        values=values,
        deviations=deviations,
        layers=raw.get("layers"),
        top1=published.get("top1"),
        std=published.get("std"),
        paper=paper,
        notes=raw.get("notes"),
        protocol_keys=protocol_keys,
    )


@functools.lru_cache(maxsize=4)
def load(path: Path = DATA) -> tuple[Recipe, ...]:
    """Every row of the table, protocols merged; a (recipe, method) appears once."""
    data = yaml.safe_load(Path(path).read_text())
    rows = tuple(_row(raw, data, i) for i, raw in enumerate(data["rows"]))
    keys = [r.key for r in rows]
    repeated = sorted({k for k in keys if keys.count(k) > 1}, key=str)
    if repeated:
        raise ConfigError(f"{path.name}: (recipe, method) listed twice: {repeated}")
    return rows


def find(recipe: str | None, method: str) -> Recipe | None:
    """The row of `method` (a conf/method preset name) on `recipe`, if the table has one."""
    return next((r for r in load() if r.key == (recipe, method)), None)


def as_config(cfg: DictConfig | Mapping[str, Any]) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def resolved(cfg: DictConfig | Mapping[str, Any], path: str) -> Any:
    """The value at a dotted config path (list items by index); `None` when the key is absent."""
    value = OmegaConf.select(as_config(cfg), path, default=_ABSENT, throw_on_missing=False)
    if value is _ABSENT:
        return None
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def same(a: Any, b: Any) -> bool:
    """Config-value equality: numbers within 1e-9 relative (20 == 20.0), lists item by item."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (a == b and type(a) is type(b))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@dataclass
class Comparison:
    """How a config relates to a row: `as_published` (every official value), else `documented` (only
    the documented deviations, each at our value) or `changed` (paths that match neither)."""

    deviations: list[str]
    changed: list[str]

    @property
    def status(self) -> str:
        """One table cell; long lists are cut after four paths (`... (+3 more)`)."""

        def paths(items: list[str]) -> str:
            more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
            return ", ".join(items[:4]) + more

        if self.changed:
            return "changed: " + paths(self.changed)
        if self.deviations:
            return "documented deviations: " + paths(self.deviations)
        return "as published"


def compare(row: Recipe, cfg: DictConfig | Mapping[str, Any]) -> Comparison:
    """Compare a resolved run config with the row, path by path."""
    cfg, deviations, changed = as_config(cfg), [], []
    for path, official in row.values.items():
        value = resolved(cfg, path)
        if same(value, official):
            continue
        if path in row.deviations and same(value, row.deviations[path]["ours"]):
            deviations.append(path)
        else:
            changed.append(path)
    return Comparison(deviations, changed)


def selection(cfg: DictConfig | Mapping[str, Any]) -> str:
    """Which split picked the reported epoch: `test` under the literature protocol
    (`data.val_fraction` 0: the validation split is the test split), else `val`."""
    fraction = resolved(cfg, "data.val_fraction")
    return "test" if fraction is not None and fraction == 0 else "val"


def _read_yaml(path: Path) -> Any:
    """A run's YAML file, or None when it is missing or unreadable (a job killed while writing it)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # run configs are long: the C loader if built
    try:
        return yaml.load(path.read_text(), Loader=loader) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def method_preset(run_dir: Path, overrides: list[str] | None, summary: Mapping[str, Any]) -> str | None:
    """The conf/method preset a run used (`dkd_ls`, not its method name `dkd`): Hydra's recorded
    choice, else a `method=` override, else the summary's method name."""
    hydra = (_read_yaml(run_dir / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}
    choice = ((hydra.get("runtime") or {}).get("choices") or {}).get("method")
    if choice:
        return str(choice)
    given = [o.split("=", 1)[1] for o in overrides or [] if o.split("=", 1)[0].lstrip("+~") == "method"]
    return given[-1] if given else summary.get("method")


def for_run(run_dir: Path, overrides: list[str] | None, summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """The published figure for a finished run, when its (recipe, method preset) has one: top-1 (and
    std), the paper, which split selected the epoch on each side, and how its config relates to the
    published settings (`compare`)."""
    config = _read_yaml(run_dir / "config_resolved.yaml") or _read_yaml(run_dir / ".hydra" / "config.yaml")
    preset = method_preset(run_dir, overrides, summary) if isinstance(config, dict) else None
    row = find(config.get("recipe"), preset) if preset else None
    if row is None or row.top1 is None:
        return None
    config = as_config(config)
    paper = row.paper or {}
    ours = "test-selected" if selection(config) == "test" else "val-selected"
    return {
        "published": row.top1,
        "published_std": row.std,
        "paper": paper.get("short"),
        "selection": f"{ours} / {paper.get('selection', 'best test epoch')}",
        "recipe_status": compare(row, config).status,
    }


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "unset"}[value]
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _cells(row: Recipe) -> list[str]:
    """recipe | protocol | official values | published | source | deviations and notes"""
    own = {k: v for k, v in row.values.items() if k not in row.protocol_keys and k not in row.deviations}
    values = ", ".join(f"{k.removeprefix('method.')} {_fmt(v)}" for k, v in own.items())
    if row.layers:
        values += f"; layers: {row.layers}"
    top1 = (
        "–" if row.top1 is None else f"{row.top1:.2f}" + (f" ± {row.std:.2f}" if row.std is not None else "")
    )
    if row.top1 is not None and row.paper:
        top1 += f" ({row.paper['short']})"
    source = f"{row.source}: " + ", ".join(row.files) if row.repo else "–"
    notes = [
        f"`{k}` ours {_fmt(d['ours'])} (official {_fmt(row.values[k])})" for k, d in row.deviations.items()
    ]
    notes += [row.notes] if row.notes else []
    cells = [
        row.recipe or "(no pair)",
        row.protocol or "–",
        values or "–",
        top1,
        source,
        "; ".join(notes) or "–",
    ]
    return [c.replace("|", "\\|").replace("\n", " ") for c in cells]


def render_markdown(rows: tuple[Recipe, ...] | None = None) -> str:
    """The audited table as markdown, one section per method preset (docs/recipes.md embeds it), then
    the reasons of every deliberate deviation."""
    rows = load() if rows is None else rows
    numbers = sum(r.top1 is not None for r in rows)
    lines = [f"{len(rows)} rows, {numbers} with a published top-1.", ""]
    head = "| recipe | protocol | official values | published top-1 | source | deviations, notes |"
    for method in dict.fromkeys(r.method for r in rows):
        lines += [f"### `method={method}`", "", head, "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows if r.method == method]
        lines.append("")
    reasons: dict[str, list[str]] = {}
    for row in rows:
        for path, dev in row.deviations.items():
            reasons.setdefault(dev["why"], [])
            if path not in reasons[dev["why"]]:
                reasons[dev["why"]].append(path)
    lines += ["### Why the deviations", ""]
    lines += [f"- {', '.join(f'`{p}`' for p in paths)}: {why}" for why, paths in reasons.items()]
    papers = {(r.paper["cite"], r.paper["read_in"]): r.paper for r in rows if r.paper and r.top1 is not None}
    lines += ["", "### Where the published numbers were read", ""]
    lines += [
        f"- {p['short']}: {p['cite']}; read in {p['read_in']}; {p['selection']}" for p in papers.values()
    ]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- published-recipes:begin -->", "<!-- published-recipes:end -->"


def embed(doc: str, table: str) -> str:
    """`doc` with the text between the BEGIN/END markers replaced by `table`."""
    if BEGIN not in doc or END not in doc:
        raise ConfigError(f"the document has no {BEGIN} ... {END} block")
    head, rest = doc.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{table}{END}{rest.split(END, 1)[1]}"


if __name__ == "__main__":  # python -m gendd_framework.analysis.published docs/recipes.md
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if target is None:
        print(render_markdown(), end="")
    else:
        target.write_text(embed(target.read_text(), render_markdown()))
