"""The shape of the commands that print JSON (`gendd-eval`, `gendd-probe`): the result on stdout, a
config error in one line on stderr with exit code 2."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from gendd_framework.errors import ConfigError


def json_command(prog: str, run: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Print `run(argv)` as JSON; a ConfigError or Hydra/OmegaConf error exits 2 with one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        result = run(sys.argv[1:] if argv is None else list(argv))
    except (ConfigError, HydraException, OmegaConfBaseException) as exc:
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result, indent=2))
