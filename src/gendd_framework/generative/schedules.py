"""Noise schedules and timestep respacing for discrete Gaussian diffusion.

Everything is computed in float64 (the products of ~1000 factors close to 1 lose digits in float32) and
returned as CPU float64 tensors; the diffusion objective converts them to the working device and dtype.

Respacing keeps a subset S of the T training steps and builds a shorter Markov chain whose cumulative
products equal the original ᾱ at S: β'_j = 1 − ᾱ[S_j] / ᾱ[S_{j−1}] (with ᾱ[S_{−1}] = 1). The network
was trained on the original indices, so a respaced chain keeps `timestep_map = S` and always shows the
network the original index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gendd_framework.errors import ConfigError

SCHEDULES = ("cosine", "linear")


def cosine_betas(num_timesteps: int, max_beta: float = 0.999, offset: float = 0.008) -> torch.Tensor:
    """Cosine schedule: ᾱ(s) = cos²((s + offset)/(1 + offset) · π/2), β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max).

    Why: the cosine schedule destroys information more evenly over t than the linear one, and it is the
    schedule GenDD trains with (official code: cosine, T = 1000).
    """
    _check_positive_int(num_timesteps, "num_timesteps")

    def alpha_bar(s: float) -> float:
        return math.cos((s + offset) / (1.0 + offset) * math.pi / 2.0) ** 2

    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """Linear schedule of DDPM/IDDPM, scaled by 1000/T so any T gives roughly the same ᾱ curve."""
    _check_positive_int(num_timesteps, "num_timesteps")
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def make_betas(schedule: str, num_timesteps: int) -> torch.Tensor:
    """Betas of a named schedule ('cosine' or 'linear'), float64, shape (T,)."""
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    if schedule == "linear":
        return linear_betas(num_timesteps)
    raise ConfigError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def space_timesteps(num_timesteps: int, steps: int | str | Sequence[int]) -> list[int]:
    """Sorted indices of the T-step chain to keep for a `steps`-step sampler.

    `steps` is an int (or a string of digits, e.g. "100"): that many evenly spaced indices
    round(i·(T−1)/(steps−1)), i = 0..steps−1, so 0 and T−1 are always kept. A comma-separated string
    ("10,15,20") splits [0, T) into that many equal sections and spaces each section the same way.
    A sequence of ints is taken as the explicit list of indices.
    """
    _check_positive_int(num_timesteps, "num_timesteps")
    if isinstance(steps, str):
        text = steps.strip()
        if not text or not all(part.strip().isdigit() for part in text.split(",")):
            raise ConfigError(
                f"sampling steps {steps!r} must be an integer or comma-separated integers "
                "like '100' or '10,20'"
            )
        counts = [int(part) for part in text.split(",")]
    elif isinstance(steps, int) and not isinstance(steps, bool):
        counts = [steps]
    elif isinstance(steps, Sequence):
        kept = sorted({int(s) for s in steps})
        if not kept or kept[0] < 0 or kept[-1] >= num_timesteps:
            raise ConfigError(f"explicit timesteps must lie in [0, {num_timesteps - 1}], got {list(steps)!r}")
        return kept
    else:
        raise ConfigError(f"sampling steps must be an int or a string, got {type(steps).__name__}: {steps!r}")

    if len(counts) == 1:
        return _evenly_spaced(0, num_timesteps, counts[0])
    # Several sections: split [0, T) as evenly as possible, earlier sections take the remainder.
    base, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        kept += _evenly_spaced(start, size, count)
        start += size
    return sorted(set(kept))


def _evenly_spaced(start: int, size: int, count: int) -> list[int]:
    if count < 1 or count > size:
        raise ConfigError(f"cannot keep {count} sampling step(s) out of a chain (section) of {size} steps")
    if count == 1:
        return [start]
    stride = (size - 1) / (count - 1)
    return [start + round(i * stride) for i in range(count)]


def respace_betas(betas: torch.Tensor, use_timesteps: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(new_betas, timestep_map) of the chain that keeps `use_timesteps` and ᾱ at those indices.

    `timestep_map[j]` is the original index of the j-th kept step, the index the network must see.
    """
    betas = betas.to(torch.float64)
    kept = sorted({int(i) for i in use_timesteps})
    if not kept or kept[0] < 0 or kept[-1] >= len(betas):
        raise ConfigError(f"respaced timesteps must lie in [0, {len(betas) - 1}], got {kept[:5]}...")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    kept_t = torch.tensor(kept, dtype=torch.long)
    kept_ac = alphas_cumprod[kept_t]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), kept_ac[:-1]])
    return 1.0 - kept_ac / previous, kept_t


def _check_positive_int(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
