"""Where a result came from: package versions, the git commit and the device, recorded in summary.json
so a number in a table can be traced to the code and machine that produced it."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("gendd-framework", "torch", "torchvision", "timm", "hydra-core", "omegaconf", "numpy")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(root: Path = PROJECT_ROOT) -> dict[str, Any] | None:
    """HEAD of the checkout the package runs from, and whether it had uncommitted changes (None when the
    package is not installed from a git checkout or git is missing)."""
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(status.strip())}


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def provenance(device: torch.device) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "packages": package_versions(),
        "git": git_commit(),
        **device_info(device),
    }
