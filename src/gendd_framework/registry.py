"""Name -> component registries: the public vocabulary of YAML configs.

One `Registry` class, one instance per kind. A registered thing is a class or a factory function; its
keyword arguments are its config, so a YAML node `{name: kd, temperature: 4}` builds
`METHODS.get("kd")(temperature=4, **runtime_objects)`. Keyword arguments are checked against the
callable's signature *before* the call, so a typo fails with the accepted names, not deep inside torch.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from gendd_framework.errors import ConfigError

PrefixResolver = Callable[[str], Callable[..., Any]]


class Registry:
    """A named catalogue of factories of one kind (models, losses, methods, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}
        self._aliases: dict[str, str] = {}
        self._prefixes: dict[str, tuple[PrefixResolver, str]] = {}
        self._origins: dict[str, Origin | None] = {}  # where each entry was defined, read at registration

    # -- registration -------------------------------------------------------------------------
    def register(
        self, name: str | None = None, *, aliases: Iterable[str] = (), force: bool = False
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: `@MODELS.register("resnet20", aliases=["res20"])`; the name defaults to `__name__`."""

        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name or obj.__name__, obj, aliases=aliases, force=force)
            return obj

        return decorator

    def add(
        self, name: str, obj: Callable[..., Any], *, aliases: Iterable[str] = (), force: bool = False
    ) -> None:
        """Register `obj` under `name` (and `aliases`); re-registering a taken name needs `force=True`.

        The same definition registered again from a second copy of its file (same file name, same bytes:
        a second checkout, or an installed copy next to a checkout) is accepted and keeps the first one.
        """
        if not force:
            for key in (name, *aliases):
                target = self._resolve_alias(key)
                if target is None:
                    continue
                existing = self._entries[target]
                if existing is not obj and not same_definition(self._origins.get(target), origin(obj)):
                    raise ConfigError(
                        f"{self.kind} '{key}' is already registered by {_describe(existing)}; "
                        f"{_describe(obj)} is a different implementation under the same name: rename one, "
                        "or pass force=True to replace it"
                    )
            current = self._resolve_alias(name)
            if current is not None and self._entries[current] is not obj:
                return  # an identical copy (checked above): keep the first registration
        self._entries[name] = obj
        self._origins[name] = origin(obj)
        self._aliases.pop(name, None)
        for alias in aliases:
            self._aliases[alias] = name

    def add_prefix(self, prefix: str, resolver: PrefixResolver, doc: str = "") -> None:
        """Route every name `prefix:<rest>` to `resolver(rest)` (e.g. `tv:resnet18`, `timm:vit_tiny`)."""
        self._prefixes[prefix] = (resolver, doc)

    # -- lookup -------------------------------------------------------------------------------
    def _resolve_alias(self, name: str) -> str | None:
        if name in self._entries:
            return name
        return self._aliases.get(name)

    def __contains__(self, name: str) -> bool:
        return self._resolve_alias(name) is not None

    def get(self, name: str) -> Callable[..., Any]:
        """The factory registered as `name`; unknown names raise with the closest registered names."""
        if not isinstance(name, str):
            raise ConfigError(f"{self.kind} name must be a string, got {type(name).__name__}: {name!r}")
        key = self._resolve_alias(name)
        if key is not None:
            return self._entries[key]
        if ":" in name:
            prefix, rest = name.split(":", 1)
            if prefix in self._prefixes:
                return self._prefixes[prefix][0](rest)
        raise ConfigError(self._unknown_message(name))

    def _unknown_message(self, name: str) -> str:
        candidates = list(self._entries) + list(self._aliases)
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
        if not close:
            close = [c for c in candidates if name.lower() in c.lower()][:5]
        msg = f"unknown {self.kind} '{name}'."
        if close:
            msg += " Did you mean: " + ", ".join(repr(c) for c in close) + "?"
        prefixes = ", ".join(f"'{p}:<name>'" for p in self._prefixes)
        msg += f" Run `gendd-list {self.kind}` to see all {len(self._entries)} registered names"
        return msg + (f" (prefixed names: {prefixes})." if prefixes else ".")

    def names(self, pattern: str = "*", *, include_aliases: bool = False) -> list[str]:
        """Registered names matching a shell wildcard (`resnet*`), sorted."""
        pool = list(self._entries) + (list(self._aliases) if include_aliases else [])
        return sorted(n for n in pool if fnmatch.fnmatchcase(n, pattern))

    def aliases_of(self, name: str) -> list[str]:
        return sorted(a for a, target in self._aliases.items() if target == name)

    def prefixes(self) -> dict[str, str]:
        return {p: doc for p, (_, doc) in self._prefixes.items()}

    # -- building -----------------------------------------------------------------------------
    def build(self, spec: Mapping[str, Any] | DictConfig | str, **runtime: Any) -> Any:
        """Build from `{name: ..., **kwargs}` (or a bare name); `runtime` adds live objects (params, ...).

        Config kwargs are checked against the factory's signature; runtime kwargs win over config ones
        only where the config does not set them, so a YAML value is never silently ignored.
        """
        name, kwargs = split_spec(spec, self.kind)
        factory = self.get(name)
        merged = {**accepted_runtime(factory, runtime), **kwargs}
        check_kwargs(factory, merged, f"{self.kind} '{name}'", config_keys=set(kwargs))
        return factory(**merged)


def split_spec(spec: Mapping[str, Any] | DictConfig | str, kind: str) -> tuple[str, dict[str, Any]]:
    """`{name: x, a: 1}` -> ("x", {"a": 1}); plain containers out, so factories never see DictConfig."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)  # type: ignore[assignment]
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"a {kind} config needs a 'name' key, got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    return str(spec["name"]), kwargs


def accepted_runtime(factory: Callable[..., Any], runtime: Mapping[str, Any]) -> dict[str, Any]:
    """The runtime objects `factory` accepts: the build offers facts (input_shape, num_classes, ...) that
    a component may ignore, so a plugin written against fewer of them keeps working."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return dict(runtime)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(runtime)
    return {k: v for k, v in runtime.items() if k in params}


def check_kwargs(factory: Callable[..., Any], kwargs: Mapping[str, Any], what: str, config_keys=None) -> None:
    """Raise `ConfigError` naming the accepted arguments when `kwargs` does not fit `factory`."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, accepted, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(
            f"{what} got unknown argument(s) {', '.join(hints)}; "
            f"it accepts: {', '.join(accepted) or 'nothing'}"
        )
    missing = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and n not in kwargs
    ]
    if missing:
        raise ConfigError(f"{what} is missing required argument(s): {', '.join(missing)}")


class Origin(NamedTuple):
    """Where a registered object was defined: its file, the sha256 of that file's bytes when it was
    registered, its qualified name and (functions) first line."""

    file: Path
    digest: str
    qualname: str
    line: int | None


_digests: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> sha256: each file read once


def _source_file(obj: Any) -> Path | None:
    try:
        file = inspect.getsourcefile(obj)
    except (TypeError, OSError):
        return None
    return Path(file) if file and Path(file).is_file() else None


def origin(obj: Any) -> Origin | None:
    """The `Origin` of `obj`, or None when it has no source file (builtins, `exec`-ed code)."""
    file = _source_file(obj)
    if file is None:
        return None
    stat = file.stat()
    key = (str(file), stat.st_mtime_ns, stat.st_size)
    if key not in _digests:
        _digests[key] = hashlib.sha256(file.read_bytes()).hexdigest()
    code = getattr(obj, "__code__", None)
    line = code.co_firstlineno if code is not None else None
    return Origin(file, _digests[key], getattr(obj, "__qualname__", ""), line)


def same_definition(a: Origin | None, b: Origin | None) -> bool:
    """Whether two origins are one definition imported twice (e.g. from two copies of a plugin file):
    the same qualified name and line in files of the same name with identical contents."""
    if a is None or b is None:
        return False
    return (a.file.name, a.digest, a.qualname, a.line) == (b.file.name, b.digest, b.qualname, b.line)


def _describe(obj: Any) -> str:
    where = _source_file(obj)
    name = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
    return f"{name} ({where})" if where else name


def one_line_doc(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def signature_text(obj: Any) -> str:
    """`(a: int = 1, b: float = 0.5)`: the config keys a component accepts, annotations evaluated."""
    try:
        try:
            sig = inspect.signature(obj, eval_str=True)
        except (NameError, TypeError, SyntaxError):  # unresolvable forward references
            sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    return str(sig.replace(return_annotation=inspect.Signature.empty))


MODELS = Registry("model")
DATASETS = Registry("dataset")
TOKENIZERS = Registry("tokenizer")
HEADS = Registry("head")
OBJECTIVES = Registry("objective")
SAMPLERS = Registry("sampler")
LOSSES = Registry("loss")
METHODS = Registry("method")
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")
LOGGERS = Registry("logger")
STAGES = Registry("stage")
WEIGHT_SCHEDULES = Registry("weight_schedule")

ALL: dict[str, Registry] = {
    r.kind: r
    for r in (
        MODELS,
        DATASETS,
        TOKENIZERS,
        HEADS,
        OBJECTIVES,
        SAMPLERS,
        LOSSES,
        METHODS,
        OPTIMIZERS,
        SCHEDULERS,
        LOGGERS,
        STAGES,
        WEIGHT_SCHEDULES,
    )
}
