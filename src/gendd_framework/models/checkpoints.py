"""Weights from a file in the formats users bring, detected and converted by explicit key maps.

Formats (`weights_format` on a model node; `auto` detects):
- `gendd`: this framework's own state dicts (`student.pt`, the teacher cache, any `state_dict()`).
- `repdistiller` (alias `mdistiller`): the CIFAR distillation checkpoints (`<model>_vanilla/
  ckpt_epoch_240.pth`, a dict whose `model` entry is the state dict) with the upstream module names;
  converted by the per-family map in `official_keys.py`.
- `torchvision` / `timm`: a state dict of that library's model, names as they are; for timm, the
  model module's own `checkpoint_filter_fn` is tried too (timm's converter for foreign layouts).

A file is a bare state dict or a dict holding one under `model`, `state_dict`, `student`, `module`,
`net` or `method`; the `module.` (DataParallel) and `_orig_mod.` (torch.compile) prefixes are dropped,
and a state dict nested under `student.model.`, `student.` or `model.` (a distiller's or this
framework's method checkpoint) is found too. Detection scores every (nesting, format) candidate by how
many of the model's tensors it supplies with the right name and shape and keeps the best; a file that
does not fit raises a multi-line `ConfigError` naming the detected format, the missing and unexpected
keys and the shape mismatches. `strict: false` loads the tensors that fit, logs how many, and refuses
a file from which no layer beyond the classifier loaded. Files load with `weights_only=True`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gendd_framework.errors import ConfigError
from gendd_framework.models.official_keys import has_official_names, official_module_map
from gendd_framework.models.tap import find_classifier

log = logging.getLogger(__name__)

ENTRIES = ("model", "state_dict", "student", "module", "net", "method")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
NESTED_PREFIXES = ("student.model.", "student.", "model.")
FORMATS = ("auto", "gendd", "repdistiller", "mdistiller", "torchvision", "timm")
ALIASES = {"mdistiller": "repdistiller"}
DESCRIPTIONS = {
    "gendd": "this framework's module names",
    "repdistiller": "the RepDistiller/mdistiller CIFAR module names",
    "torchvision": "torchvision's module names",
    "timm": "timm's module names",
}
SHOW = 5  # keys listed per category in an error


@dataclass
class Checkpoint:
    """The tensors of a weights file and where in the file they were found."""

    path: Path
    state: dict[str, torch.Tensor]
    entry: str | None = None  # the container key holding the state dict, if any
    entries: list[str] = field(default_factory=list)  # every top-level key of a container

    def describe(self) -> str:
        where = (
            f"the '{self.entry}' entry of a dict with entries {self.entries}"
            if self.entry
            else "a state dict"
        )
        return f"{where}, {len(self.state)} tensors"


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The state dict in a `.pth`/`.pt`/`.safetensors` file (`weights_only=True`: loading runs no code)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return Checkpoint(path, _strip_wrappers(load_file(str(path))))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file or pickled code objects
        raise ConfigError(f"cannot load checkpoint {path} with weights_only=True: {exc}") from exc
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint {path} holds a {type(obj).__name__}, expected a state dict")
    entry = next((k for k in ENTRIES if isinstance(obj.get(k), dict)), None)
    entries = [str(k) for k in obj] if entry else []
    state = obj[entry] if entry else obj
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConfigError(f"checkpoint {path} holds no tensors (top-level entries: {list(obj)[:10]})")
    return Checkpoint(path, _strip_wrappers(tensors), entry, entries)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, container and wrapper prefixes removed, names unconverted."""
    return read_checkpoint(path).state


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = next(key[len(p) :] for p in WRAPPER_PREFIXES if key.startswith(p))
        out[key] = value
    return out


# ----------------------------------------------------------------------------- formats --
def formats_for(model: nn.Module) -> list[str]:
    """The formats `auto` tries for a model, its native one first (`gendd`, the framework's own
    names, may always be named explicitly: for torchvision/timm models it is their names)."""
    module = type(model).__module__
    if module.startswith("torchvision."):
        return ["torchvision"]
    if module.startswith("timm."):
        return ["timm"]
    return ["gendd", "repdistiller"] if has_official_names(model) else ["gendd"]


def file_names(model: nn.Module, fmt: str) -> dict[str, str]:
    """Model state-dict key -> the key a file in format `fmt` has for it."""
    keys = list(model.state_dict())
    if fmt != "repdistiller":
        return {k: k for k in keys}
    modules = official_module_map(model)
    out = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        out[key] = f"{modules[module]}.{leaf}" if module else key
    return out


def _timm_filter(model: nn.Module) -> Callable | None:
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _candidates(state: dict[str, torch.Tensor], model: nn.Module, fmt: str) -> list[dict[str, torch.Tensor]]:
    """Ways `state` may be laid out in `fmt`, each already in the model's names where it can be."""
    if fmt != "timm":
        return [state]
    filtered = []
    fn = _timm_filter(model)
    if fn is not None:
        try:
            filtered = [fn(dict(state), model)]
        except Exception:  # a filter written for another layout: then that reading does not exist
            filtered = []
    return [state, *filtered]


@dataclass
class Match:
    """How one candidate reading of a file fits a model: what loads, what is missing, what clashes."""

    fmt: str
    nesting: str  # the prefix the state dict was nested under ('' for none)
    converted: dict[str, torch.Tensor]  # model key -> tensor, for every file key that maps
    names: dict[str, str]  # model key -> file key
    unexpected: list[str]  # file keys with no model counterpart
    missing: list[str]  # model keys (file naming) the file does not supply
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (file key, file shape, model shape)
    fits: list[str]  # model keys supplied with the right shape
    total: int  # model tensors, BN step counters aside (BN fills a missing one itself)

    @property
    def count(self) -> int:
        """Tensors that fit, BN step counters aside."""
        return sum(not _is_counter(k) for k in self.fits)

    @property
    def score(self) -> tuple[int, int]:
        return self.count, self.count + len(self.mismatched)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def match(state: dict[str, torch.Tensor], model: nn.Module, fmt: str, nesting: str = "") -> Match:
    model_state = model.state_dict()
    names = file_names(model, fmt)
    by_file = {v: k for k, v in names.items()}
    converted, unexpected = {}, []
    for key, value in state.items():
        target = by_file.get(key)
        if target is None:
            unexpected.append(key)
        else:
            converted[target] = value
    fits, mismatched, missing = [], [], []
    for key, ref in model_state.items():
        if key not in converted:
            if not _is_counter(key):  # BN fills a missing step counter itself
                missing.append(names[key])
        elif tuple(converted[key].shape) != tuple(ref.shape):
            mismatched.append((names[key], tuple(converted[key].shape), tuple(ref.shape)))
        else:
            fits.append(key)
    total = sum(not _is_counter(k) for k in model_state)
    return Match(fmt, nesting, converted, names, unexpected, missing, mismatched, fits, total)


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def detect(
    checkpoint: Checkpoint, model: nn.Module, weights_format: str = "auto"
) -> tuple[Match, list[Match]]:
    """The best-fitting reading of the file (and every reading scored) for `weights_format`."""
    fmt = ALIASES.get(weights_format, weights_format)
    allowed = [*formats_for(model), *(["gendd"] if "gendd" not in formats_for(model) else [])]
    if fmt not in FORMATS:
        raise ConfigError(f"weights_format '{weights_format}' is unknown; choose from {', '.join(FORMATS)}")
    if fmt != "auto" and fmt not in allowed:
        raise ConfigError(
            f"weights_format '{weights_format}' does not apply to {type(model).__name__}; "
            f"choose from auto, {', '.join(allowed)}"
        )
    formats = formats_for(model) if fmt == "auto" else [fmt]
    views = [("", checkpoint.state)]
    for prefix in NESTED_PREFIXES:
        nested = {k[len(prefix) :]: v for k, v in checkpoint.state.items() if k.startswith(prefix)}
        if nested:
            views.append((prefix, nested))
    scored = [
        match(candidate, model, f, prefix)
        for prefix, view in views
        for f in formats
        for candidate in _candidates(view, model, f)
    ]
    best = max(scored, key=lambda m: m.score)  # max keeps the first of equals: plain, native first
    return best, scored


# ----------------------------------------------------------------------------- loading --
def _listing(items: list[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = ", ".join(items[:SHOW])
    more = f", ... (+{total - SHOW} more)" if total > SHOW else ""
    return f"{shown}{more}" if items else "none"


def explain(
    best: Match, scored: list[Match], checkpoint: Checkpoint, body_keys: set[str], strict: bool
) -> list[str]:
    """Detail lines for an error: file, detected format, missing/unexpected/mismatched keys, verdict."""
    nesting = f", nested under '{best.nesting}'" if best.nesting else ""
    lines = [
        f"  file: {checkpoint.describe()}",
        f"  detected format: {best.fmt} ({DESCRIPTIONS[best.fmt]}{nesting}); {best.count} of "
        f"{best.total} model tensors (BN step counters aside) found by name and shape",
    ]
    others = {(m.fmt, m.nesting): m.count for m in scored if (m.fmt, m.nesting) != (best.fmt, best.nesting)}
    if others:
        lines.append(
            "  other readings: "
            + ", ".join(f"{f}{' under ' + repr(n) if n else ''}: {k} tensors" for (f, n), k in others.items())
        )
    lines += [
        f"  missing keys ({len(best.missing)}): {_listing(best.missing)}",
        f"  unexpected keys ({len(best.unexpected)}): {_listing(best.unexpected)}",
        f"  shape mismatches ({len(best.mismatched)}): "
        + _listing([f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in best.mismatched]),
    ]
    named = set(best.converted) & body_keys  # body tensors the file names (any shape)
    if not named:
        found = "no tensor" if not best.converted else "only the classifier"
        model_keys = {m.fmt: list(m.names.values())[:SHOW] for m in scored}
        lines.append(
            f"  => {found} of this model is named in the file in the format(s) tried: the file's first "
            f"keys are {list(checkpoint.state)[:SHOW]}; "
            + "; ".join(f"in {f} names this model's are {keys}" for f, keys in model_keys.items())
        )
    elif best.mismatched or best.missing:
        lines.append(
            "  => the names fit but not the shapes or the depth: the file holds another architecture "
            "(check the model name)"
            + (", or set `strict: false` on the model node to load the tensors that fit" if strict else "")
        )
    elif best.unexpected:
        lines.append(
            "  => the file holds tensors this model does not have (another architecture, or more than "
            "one model)" + ("; `strict: false` ignores them" if strict else "")
        )
    return lines


def _summary(best: Match) -> str:
    return (
        f"detected {best.fmt} format; after conversion {len(best.missing)} missing keys, "
        f"{len(best.unexpected)} unexpected keys, {len(best.mismatched)} shape mismatches"
    )


def _classifier_keys(model: nn.Module) -> set[str]:
    try:
        head = find_classifier(model)
    except ConfigError:
        return set()
    prefix = next((n for n, m in model.named_modules() if m is head), None)
    return {f"{prefix}.{k}" for k in head.state_dict()} if prefix else set()


def load_weights(
    model: nn.Module,
    path: str | Path,
    name: str | None = None,
    weights_format: str = "auto",
    strict: bool = True,
) -> Match:
    """Load `path` into `model` (converting its names), or raise a ConfigError saying why it does not fit."""
    checkpoint = read_checkpoint(path)
    best, scored = detect(checkpoint, model, weights_format)
    label = f"model '{name or type(model).__name__}' ({type(model).__name__})"
    head = f"weights in {checkpoint.path} do not fit {label}"
    body_keys = {k for k in model.state_dict() if not _is_counter(k)} - _classifier_keys(model)
    if strict and not best.exact:
        lines = explain(best, scored, checkpoint, body_keys, strict)
        if weights_format != "auto":
            auto = detect(checkpoint, model)[0]
            if auto.score > best.score:
                lines.append(f"  => weights_format: auto reads it as {auto.fmt} ({auto.count} tensors fit)")
        raise ConfigError("\n".join([f"{head}: {_summary(best)}", *lines]))
    loadable = {k: best.converted[k] for k in best.fits}
    if not best.exact and not set(best.fits) & body_keys:
        raise ConfigError(
            "\n".join(
                [
                    f"{head}: no layer beyond the classifier would load ({best.count} of {best.total} "
                    "tensors fit, none outside the classifier; strict=false refuses a file that leaves the "
                    "whole body at random init)",
                    *explain(best, scored, checkpoint, body_keys, strict),
                ]
            )
        )
    model.load_state_dict(loadable, strict=False)
    message = (
        f"loaded {best.count} of {best.total} tensors of {label} from {checkpoint.path} "
        f"({best.fmt} format{', nested under ' + repr(best.nesting) if best.nesting else ''})"
    )
    if best.exact:
        log.info(message)
    else:
        log.warning(
            "%s; strict=false left %d at their initial values (%s), skipped %d unexpected and %d "
            "mismatched file tensors",
            message,
            len(best.missing),
            _listing(best.missing),
            len(best.unexpected),
            len(best.mismatched),
        )
    return best
