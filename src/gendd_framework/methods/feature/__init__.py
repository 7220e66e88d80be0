"""Feature distillation: one module per method family (registered terms + methods with published
defaults), plus the shared layer-selection (`layers.py`) and projector (`projectors.py`) helpers.

Every module of this package is imported here, so a new family registers by existing."""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    importlib.import_module(f"{__name__}.{_info.name}")
