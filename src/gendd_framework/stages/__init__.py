"""The run's stages, one module each, in pipeline order: `teacher`, `pretrain` (GenDD stage 1), `hint`
(FitNets stage 1), `distill` and `born_again` (the configured method trains a student), `reflow`
(GenDD flow head straightened). The `probe` stage lives with the probes (analysis/probes/stage.py).

A stage is a registered function `(ctx, **settings) -> record`; an experiment lists them in `stages:`.
Each declares its preflight check and its evaluation rebuild with `stage_hooks` (hooks.py), which is
how preflight and `gendd-eval` treat built-in and plugin stages alike.
"""

from gendd_framework.stages import distill, hint, pretrain, reflow, teacher  # noqa: F401  (register)
from gendd_framework.stages.distill import student_method
from gendd_framework.stages.hooks import rebuild_stage_method, stage_entries, stage_hooks, stage_kind
from gendd_framework.stages.runs import architecture, referenced_plugins, run_predictor
from gendd_framework.stages.teacher import teacher_architecture, teacher_cache_key

__all__ = [
    "architecture",
    "rebuild_stage_method",
    "referenced_plugins",
    "run_predictor",
    "stage_entries",
    "stage_hooks",
    "stage_kind",
    "student_method",
    "teacher_architecture",
    "teacher_cache_key",
]
