"""Logit distillation: one file per method family (a registered term + a method with published defaults)."""

from gendd_framework.methods.logit import ctkd, dist, dkd, ensemble, kd, pld, wkd  # noqa: F401
