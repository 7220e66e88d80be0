"""The command-line tools: `gendd-train` (train.py), `gendd-list` (listing.py), `gendd-eval`
(evaluate.py); `gendd-report` and `gendd-probe` read finished runs and live with the analysis.
`python -m gendd_framework.cli` is gendd-train (what torchrun launches)."""

from gendd_framework.cli.evaluate import main as eval_main
from gendd_framework.cli.listing import list_main
from gendd_framework.cli.train import config_dir, search_dirs, torchrun_argv, train_main

__all__ = ["config_dir", "eval_main", "list_main", "search_dirs", "torchrun_argv", "train_main"]
