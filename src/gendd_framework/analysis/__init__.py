"""Analyses of a trained run beyond its accuracy: what the student took from its teacher (`probes`)."""
