"""Calibration picture: reliability bins of teacher and student, and the per-class agreement matrix.

Reliability bins are the run metrics' own (`engine/metrics.py`: equal-width confidence bins
(k/n, (k+1)/n], per bin count, mean confidence and accuracy); the agreement matrix counts images by
(teacher class, student class), and its row-normalised diagonal is each teacher class's agreement.
"""

from __future__ import annotations

import torch

from gendd_framework.analysis.probes.common import ProbeData, ProbeResult
from gendd_framework.analysis.probes.settings import CalibrationSettings
from gendd_framework.engine.metrics import calibration_bins, expected_calibration_error


def reliability(logits: torch.Tensor, targets: torch.Tensor, bins: int) -> dict[str, list]:
    """Per bin: count, mean confidence and accuracy (NaN for an empty bin), plus the ECE in %."""
    count, conf_sum, acc_sum = calibration_bins(logits, targets, bins)
    safe = count.clamp_min(1)
    empty = count == 0
    conf = torch.where(empty, torch.nan, conf_sum / safe)
    acc = torch.where(empty, torch.nan, acc_sum / safe)
    return {
        "count": count.long().tolist(),
        "confidence": conf.tolist(),
        "accuracy": acc.tolist(),
        "ece": expected_calibration_error(count, conf_sum, acc_sum),
    }


def agreement_matrix(
    teacher_pred: torch.Tensor, student_pred: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """(num_classes, num_classes) counts: row = teacher class, column = student class."""
    flat = teacher_pred.long() * num_classes + student_pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def probe_calibration(data: ProbeData, s: CalibrationSettings) -> ProbeResult:
    num_classes = data.teacher_logits.shape[1]
    rel_t = reliability(data.teacher_logits, data.targets, s.bins)
    rel_s = reliability(data.student_logits, data.targets, s.bins)
    matrix = agreement_matrix(data.teacher_pred, data.student_pred, num_classes)
    rows = matrix.sum(1)
    seen = rows > 0
    per_class = torch.where(seen, matrix.diag().double() / rows.clamp_min(1), torch.nan)
    metrics = {
        "calibration/ece_teacher": rel_t["ece"],
        "calibration/ece_student": rel_s["ece"],
        "calibration/agree": float(100.0 * matrix.diag().sum().double() / matrix.sum()),
        "calibration/min_class_agree": float(100.0 * per_class[seen].min()),
        "calibration/mean_class_agree": float(100.0 * per_class[seen].mean()),
    }
    details = {
        "reliability_teacher": rel_t,
        "reliability_student": rel_s,
        "class_agree": [None if v != v else 100.0 * v for v in per_class.tolist()],
    }
    return ProbeResult(metrics, details, {"agreement_matrix": matrix})
