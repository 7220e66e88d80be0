"""`python -m gendd_framework.cli ...` (and `torchrun ... -m gendd_framework.cli ...`) is gendd-train."""

from gendd_framework.cli.train import train_main

train_main()
