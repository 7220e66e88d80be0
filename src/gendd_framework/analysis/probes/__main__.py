"""`python -m gendd_framework.analysis.probes RUN_DIR ...` (the same as `gendd-probe`)."""

from gendd_framework.analysis.probes.cli import main

main()
