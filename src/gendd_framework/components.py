"""Import every built-in module that registers components, so all names are known."""

from gendd_framework import (  # noqa: F401
    data,
    methods,
    models,
    stages,  # noqa: F401,E402
)
from gendd_framework.engine import loggers, optim  # noqa: F401
