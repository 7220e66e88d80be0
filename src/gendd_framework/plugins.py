"""Out-of-tree components: the top-level `registry/` folder, a `plugins:` config list, entry points.

A plugin is an ordinary Python module whose import registers things (`@LOSSES.register("my_loss")`).
Each file is imported once per process, however many times it is named.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path

from gendd_framework.errors import ConfigError

ENTRY_POINT_GROUP = "gendd_framework.plugins"
_loaded: set[str] = set()


def default_plugin_dirs() -> list[Path]:
    """`$GENDD_REGISTRY_DIR`, the project's top-level `registry/`, and `./registry` if present."""
    dirs = []
    if os.environ.get("GENDD_REGISTRY_DIR"):
        dirs += [Path(p) for p in os.environ["GENDD_REGISTRY_DIR"].split(os.pathsep) if p]
    project = Path(__file__).resolve().parents[2] / "registry"
    dirs += [project, Path.cwd() / "registry"]
    unique: dict[Path, None] = {}
    for d in dirs:
        if d.is_dir():
            unique[d.resolve()] = None
    return list(unique)


def import_file(path: Path) -> None:
    path = path.resolve()
    if str(path) in _loaded:
        return
    name = f"gendd_plugins.{path.parent.name}.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    _loaded.add(str(path))
    try:
        spec.loader.exec_module(module)
    except Exception:
        _loaded.discard(str(path))
        sys.modules.pop(name, None)
        raise


def import_plugin(target: str) -> None:
    """A `.py` file, a folder of them, or a dotted module name."""
    path = Path(target).expanduser()
    if target.endswith(".py") or path.is_dir():
        if not path.exists():
            raise ConfigError(f"plugin path not found: {path}")
        files = sorted(path.glob("*.py")) if path.is_dir() else [path]
        for file in files:
            if not file.name.startswith("_"):
                import_file(file)
        return
    if target in _loaded:
        return
    try:
        importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"plugin module '{target}' cannot be imported: {exc}") from exc
    _loaded.add(target)


def load_plugins(extra: Iterable[str] = (), *, scan_default_dirs: bool = True) -> None:
    """Import every plugin source in order: default folders, entry points, then `extra`."""
    import gendd_framework.components  # noqa: F401  (built-in registrations first)

    if scan_default_dirs:
        for folder in default_plugin_dirs():
            import_plugin(str(folder))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = f"entry_point:{ep.value}"
        if key not in _loaded:
            ep.load()
            _loaded.add(key)
    for target in extra:
        import_plugin(str(target))
