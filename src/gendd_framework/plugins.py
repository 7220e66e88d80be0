"""Out-of-tree components: the top-level `registry/` folder, a `plugins:` config list, entry points.

A plugin is an ordinary Python module whose import registers things (`@LOSSES.register("my_loss")`).
Each file is imported once per process, however many times it is named.

Where plugins come from, in order (`load_plugins`):

1. `$GENDD_REGISTRY_DIR` (folders separated by `os.pathsep`);
2. the project's `registry/` folder, when the package runs from a source checkout (editable install);
3. `./registry` of the working directory, so a second checkout (or a project that only uses the
   installed package) is picked up without configuration. When the working directory *is* the project
   root this is the same folder as 2. and is read once;
4. `gendd_framework.plugins` entry points of installed distributions;
5. the run's `plugins:` list (files, folders or dotted module names). Relative paths resolve against the
   working directory at launch (Hydra does not change it); they are recorded as absolute paths.

The same plugin file reached from two places (two checkouts, or an installed copy and a checkout) is
the same component: a file whose name and contents match one already imported is skipped, and a
registry accepts a second registration from an identical file (`Registry.add`). A *different* file
registering a taken name fails, naming both files.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path

from gendd_framework.errors import ConfigError

ENTRY_POINT_GROUP = "gendd_framework.plugins"
_loaded: set[str] = set()  # resolved file paths, dotted module names and entry points already imported
_by_content: dict[tuple[str, str], Path] = {}  # (file name, sha256 of its bytes) -> first path imported
imported_files: list[Path] = []  # absolute paths of the plugin files imported, in order
_code_files: set[str] = set()  # real paths of plugin files (remembered before their import runs)
_code_dirs: set[str] = set()  # real paths of plugin packages' folders (dotted modules, entry points)


def project_root() -> Path | None:
    """The source checkout this package runs from (`<root>/src/gendd_framework`), or None when installed."""
    package = Path(__file__).resolve().parent
    root = package.parents[1]
    if package.parent.name == "src" and (root / "conf" / "train.yaml").is_file():
        return root
    return None


def default_plugin_dirs() -> list[Path]:
    """`$GENDD_REGISTRY_DIR`, the project's `registry/`, then `./registry`: resolved, deduplicated."""
    dirs = []
    if os.environ.get("GENDD_REGISTRY_DIR"):
        dirs += [Path(p).expanduser() for p in os.environ["GENDD_REGISTRY_DIR"].split(os.pathsep) if p]
    root = project_root()
    if root is not None:
        dirs.append(root / "registry")
    dirs.append(Path.cwd() / "registry")  # the same folder as above when the cwd is the project root
    unique: dict[Path, None] = {}
    for d in dirs:
        if d.is_dir():
            unique[d.resolve()] = None
    return list(unique)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def import_file(path: Path) -> None:
    """Import one plugin file (once per resolved path, and once per identical file name + contents)."""
    path = Path(path).expanduser().resolve()
    if str(path) in _loaded:
        return
    content_key = (path.name, file_digest(path))
    if content_key in _by_content:  # the same file reached through another checkout or folder
        _loaded.add(str(path))
        return
    name = f"gendd_plugins.{path.parent.name}.{path.stem}"
    if name in sys.modules:  # a different file named alike: never replace the first in sys.modules
        name += "_" + hashlib.sha256(str(path).encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    _code_files.add(os.path.realpath(path))
    _loaded.add(str(path))
    try:
        spec.loader.exec_module(module)
    except Exception:
        _loaded.discard(str(path))
        sys.modules.pop(name, None)
        raise
    _by_content[content_key] = path
    imported_files.append(path)


def import_plugin(target: str) -> str:
    """A `.py` file, a folder of them, or a dotted module name; relative paths resolve against the cwd.

    Returns the target as imported: a path made absolute, or the module name.
    """
    path = Path(target).expanduser()
    if target.endswith(".py") or path.is_dir():
        path = path.absolute()
        if not path.exists():
            raise ConfigError(f"plugin path not found: {path}")
        files = sorted(path.glob("*.py")) if path.is_dir() else [path]
        for file in files:
            if not file.name.startswith("_"):
                import_file(file)
        return str(path)
    if target in _loaded:
        return target
    remember_package(target)
    try:
        importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"plugin module '{target}' cannot be imported: {exc}") from exc
    _loaded.add(target)
    return target


def load_plugins(extra: Iterable[str] = (), *, scan_default_dirs: bool = True) -> list[str]:
    """Import every plugin source in order: default folders, entry points, then `extra`.

    Returns `extra` with relative paths made absolute, for a record that does not depend on the cwd;
    `imported_files` lists every plugin file imported so far.
    """
    import gendd_framework.components  # noqa: F401  (built-in registrations first)

    if scan_default_dirs:
        for folder in default_plugin_dirs():
            import_plugin(str(folder))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = f"entry_point:{ep.value}"
        if key not in _loaded:
            remember_package(ep.value.split(":")[0].strip())  # `pkg.mod:attr` -> pkg.mod
            ep.load()
            _loaded.add(key)
    return [import_plugin(str(target)) for target in extra]


def remember_package(module: str) -> None:
    """Mark the top-level package (or module file) of a dotted plugin name as plugin code."""
    top = module.split(".")[0]
    if top == "gendd_framework":
        return
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return
    if spec is None:
        return
    if spec.submodule_search_locations:
        _code_dirs.update(os.path.realpath(d) for d in spec.submodule_search_locations)
    elif spec.origin and os.path.isfile(spec.origin):
        _code_files.add(os.path.realpath(spec.origin))


def is_plugin_code(filename: str) -> bool:
    """Whether a traceback frame's file is a plugin file or lies in a plugin package."""
    path = os.path.realpath(filename)
    return path in _code_files or any(path.startswith(d + os.sep) for d in _code_dirs)


def plugin_traceback(exc: BaseException) -> tuple[str, str] | None:
    """(`file:line` of the innermost plugin frame, a short traceback of the plugin frames and the
    exception line) for the first exception in `exc`'s chain raised through plugin code, else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = [f for f in traceback.extract_tb(current.__traceback__) if is_plugin_code(f.filename)]
        if isinstance(current, SyntaxError) and current.filename and is_plugin_code(current.filename):
            text = "".join(traceback.format_exception_only(type(current), current))
            return f"{current.filename}:{current.lineno}", text.rstrip("\n")
        if frames:
            text = "".join(traceback.StackSummary.from_list(frames).format())
            text += "".join(traceback.format_exception_only(type(current), current))
            return f"{frames[-1].filename}:{frames[-1].lineno}", text.rstrip("\n")
        current = current.__cause__ or current.__context__
    return None
