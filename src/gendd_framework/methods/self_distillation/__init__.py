"""Teacher-free self-distillation: the model teaches itself (mean teacher: an EMA of the student) or
its peers (deep mutual learning). Neither needs a `teacher` stage (`needs_teacher = False`)."""

from gendd_framework.methods.self_distillation import dml, mean_teacher  # noqa: F401
