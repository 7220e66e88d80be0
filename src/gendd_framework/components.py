"""Import every built-in module that registers components, so all names are known."""

from gendd_framework import data, methods, models, stages  # noqa: F401
from gendd_framework.analysis.probes import stage as probe_stage  # noqa: F401
from gendd_framework.engine import loggers, optim  # noqa: F401
from gendd_framework.generative import contraction, diffusion, flow, head, samplers, tokenizers  # noqa: F401
