"""Probe settings: one typed tree with recorded defaults, set by `key=value` overrides (CLI) or by the
`probe` stage's keyword arguments; every bad key or value fails in one line naming it."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gendd_framework.errors import ConfigError

PROBE_NAMES = ("localization", "adversarial", "invariance", "corruption", "calibration")


@dataclass
class LocalizationSettings:
    target: str = "teacher"  # Grad-CAM of the teacher's predicted class (`label`: the true class)
    topk: float = 0.2  # share of pixels in each map's top set for the IoU
    stage: int = -1  # index into the model's feature stages (-1: the last one)
    teacher_layer: str | None = None  # a module path (`layer3`, `blocks.5:input`) instead of `stage`
    student_layer: str | None = None


@dataclass
class AdversarialSettings:
    eps: float = 0.25  # L-inf radius, in the units of the input the model sees (after normalisation)
    steps: int = 5  # I-FGSM steps (1 step with step_size = eps is FGSM)
    step_size: float | None = None  # None: 2.5 * eps / steps
    target: str = "label"  # the attack raises the teacher's CE on the true label (`teacher`: its clean class)
    clip: bool = True  # keep adversarial inputs inside the probed images' value range


@dataclass
class InvarianceSettings:
    shift: list[int] = field(default_factory=lambda: [1])  # ± pixels along each axis (edge replicated)
    contrast: list[float] = field(default_factory=lambda: [0.7, 1.3])  # about each image's channel mean
    brightness: list[float] = field(default_factory=lambda: [-0.3, 0.3])  # added, in input-std units
    saturation: list[float] = field(default_factory=lambda: [0.5, 1.5])  # about the grey image (C >= 3)


@dataclass
class CorruptionSettings:
    noise: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])  # Gaussian std, input-std units
    blur: list[float] = field(default_factory=lambda: [0.4, 0.5, 0.6])  # Gaussian blur sigma, pixels


@dataclass
class CalibrationSettings:
    bins: int = 15  # equal-width confidence bins (the run's ECE uses 15)


@dataclass
class ProbeSettings:
    probes: list[str] = field(default_factory=lambda: list(PROBE_NAMES))
    images: int = 1000  # at most this many test images (a seeded random subset when the split is larger)
    batch_size: int = 256
    seed: int = 0  # image subset and corruption noise
    localization: LocalizationSettings = field(default_factory=LocalizationSettings)
    adversarial: AdversarialSettings = field(default_factory=AdversarialSettings)
    invariance: InvarianceSettings = field(default_factory=InvarianceSettings)
    corruption: CorruptionSettings = field(default_factory=CorruptionSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)


def all_keys(cls: type = ProbeSettings, prefix: str = "") -> list[str]:
    """Every dotted settings key (for did-you-mean hints and the docs)."""
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += all_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown(key: str) -> ConfigError:
    keys = all_keys()
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return ConfigError(f"unknown probe setting '{key}'{hint}; settings: {', '.join(keys)}")


def _flatten(node: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in node.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def parse_settings(
    overrides: Mapping[str, Any] | Iterable[str] | None = None, where: str = "probe setting"
) -> ProbeSettings:
    """`ProbeSettings` from a nested mapping (stage kwargs) or `key=value` strings (the CLI), typed
    and range-checked."""
    base = OmegaConf.structured(ProbeSettings)
    if overrides is None:
        overrides = {}
    if isinstance(overrides, Mapping):
        pairs = list(_flatten(OmegaConf.to_container(OmegaConf.create(dict(overrides)), resolve=True)))
    else:
        pairs = []
        for arg in overrides:
            key, eq, value = str(arg).partition("=")
            if not eq:
                raise ConfigError(f"{where} '{arg}' is not key=value")
            pairs.append((key, OmegaConf.from_dotlist([f"v={value}"]).v))
    for key, value in pairs:
        if key not in all_keys():
            raise _unknown(key)
        try:
            OmegaConf.update(base, key, value, merge=False)
        except OmegaConfBaseException as exc:
            detail = str(exc).splitlines()[0]
            raise ConfigError(f"{where} '{key}' = {value!r}: {detail}") from None
    settings: ProbeSettings = OmegaConf.to_object(base)
    check_settings(settings)
    return settings


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"probe setting '{key}' = {value!r}: {what}")


def check_settings(s: ProbeSettings) -> None:
    """Ranges and choices; the first violation raises naming its key."""
    for name in s.probes:
        if name not in PROBE_NAMES:
            close = difflib.get_close_matches(name, PROBE_NAMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"probe setting 'probes': unknown probe '{name}'{hint}; probes: {PROBE_NAMES}")
    _require(s.images >= 1, "images", s.images, "must be >= 1")
    _require(s.batch_size >= 1, "batch_size", s.batch_size, "must be >= 1")
    loc, adv = s.localization, s.adversarial
    _require(loc.target in ("teacher", "label"), "localization.target", loc.target, "teacher or label")
    _require(0.0 < loc.topk <= 1.0, "localization.topk", loc.topk, "must be in (0, 1]")
    _require(adv.eps > 0, "adversarial.eps", adv.eps, "must be > 0")
    _require(adv.steps >= 1, "adversarial.steps", adv.steps, "must be >= 1")
    step = adv.step_size
    _require(step is None or step > 0, "adversarial.step_size", step, "must be > 0 (or null)")
    _require(adv.target in ("label", "teacher"), "adversarial.target", adv.target, "label or teacher")
    inv, cor = s.invariance, s.corruption
    _require(all(v >= 1 for v in inv.shift), "invariance.shift", inv.shift, "pixel shifts must be >= 1")
    _require(all(v > 0 for v in inv.contrast), "invariance.contrast", inv.contrast, "factors must be > 0")
    _require(all(v >= 0 for v in inv.saturation), "invariance.saturation", inv.saturation, "must be >= 0")
    _require(all(v >= 0 for v in cor.noise), "corruption.noise", cor.noise, "std must be >= 0")
    _require(all(v >= 0 for v in cor.blur), "corruption.blur", cor.blur, "sigma must be >= 0")
    _require(s.calibration.bins >= 1, "calibration.bins", s.calibration.bins, "must be >= 1")


def as_dict(settings: ProbeSettings) -> dict[str, Any]:
    """Plain nested dict (recorded in probe.json)."""
    return dataclasses.asdict(settings)
