"""Evaluation metrics accumulated over a whole split: accuracy, CE, calibration and teacher agreement.

For every named output of `method.predict`: `acc` (top-1 %), `ce`, `ece` (expected calibration error,
15 equal-width confidence bins, in %) and, when a reference teacher is given, `agree` (% of samples
whose top-1 class equals the teacher's) and `kl` (mean KL(teacher ‖ output) at τ=1, in nats): what
knowledge got distilled, next to how accurate the student is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gendd_framework.losses.kd import kl_divergence_per_sample


def calibration_bins(
    logits: torch.Tensor, target: torch.Tensor, bins: int = 15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per confidence bin: (count, summed confidence, summed correctness) in float64 (sums over a whole
    split stay exact); bins are (k/n, (k+1)/n]."""
    probs = logits.double().softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == target).double()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    zeros = torch.zeros(bins, dtype=torch.float64, device=logits.device)
    count = zeros.index_add(0, index, torch.ones_like(confidence))
    conf_sum = zeros.index_add(0, index, confidence)
    acc_sum = zeros.index_add(0, index, correct)
    return count, conf_sum, acc_sum


def expected_calibration_error(count: torch.Tensor, conf_sum: torch.Tensor, acc_sum: torch.Tensor) -> float:
    """Σ_b (n_b/N)·|acc_b − conf_b| in %: the sample-weighted gap between confidence and accuracy."""
    total = count.sum().clamp_min(1)
    return float(100.0 * (acc_sum - conf_sum).abs().sum() / total)


class MetricAccumulator:
    """Sums per-output statistics batch by batch; `result()` gives the split's metrics."""

    def __init__(self, bins: int = 15) -> None:
        self.bins, self.total = bins, 0
        self.sums: dict[str, dict[str, torch.Tensor | float]] = {}

    def update(
        self,
        outputs: dict[str, torch.Tensor],
        target: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> None:
        self.total += target.numel()
        teacher_logits = teacher_logits.float() if teacher_logits is not None else None
        for name, logits in outputs.items():
            logits = logits.float()
            acc = self.sums.setdefault(name, {"correct": 0.0, "ce": 0.0, "bins": None})
            acc["correct"] += (logits.argmax(1) == target).sum().item()
            acc["ce"] += F.cross_entropy(logits, target, reduction="sum").item()
            bins = torch.stack(calibration_bins(logits, target, self.bins))
            acc["bins"] = bins if acc["bins"] is None else acc["bins"] + bins
            if teacher_logits is not None:
                kl = kl_divergence_per_sample(teacher_logits, logits)
                agree = (logits.argmax(1) == teacher_logits.argmax(1)).sum().item()
                acc["agree"] = acc.get("agree", 0.0) + agree
                acc["kl"] = acc.get("kl", 0.0) + kl.sum().item()

    def state(self) -> dict:
        """The running sums as plain Python values (picklable: gathered across ranks under DDP)."""
        sums = {
            name: {k: (v.cpu().tolist() if torch.is_tensor(v) else v) for k, v in acc.items()}
            for name, acc in self.sums.items()
        }
        return {"total": self.total, "sums": sums}

    def merge(self, states: list[dict]) -> None:
        """Replace the sums by the total of `states` (every rank's `state()`, this one's included),
        added in list order so that every rank computes bit-identical metrics."""
        self.total, self.sums = 0, {}
        for state in states:
            self.total += state["total"]
            for name, part in state["sums"].items():
                acc = self.sums.setdefault(name, {"correct": 0.0, "ce": 0.0, "bins": None})
                for key, value in part.items():
                    if key == "bins":
                        if value is not None:
                            bins = torch.tensor(value, dtype=torch.float64)
                            acc["bins"] = bins if acc["bins"] is None else acc["bins"] + bins
                    else:
                        acc[key] = acc.get(key, 0.0) + value

    def result(self) -> dict[str, float]:
        n = max(self.total, 1)
        metrics: dict[str, float] = {}
        for name, acc in self.sums.items():
            metrics[f"acc/{name}"] = 100.0 * acc["correct"] / n
            metrics[f"ce/{name}"] = acc["ce"] / n
            metrics[f"ece/{name}"] = expected_calibration_error(*acc["bins"])
            if "agree" in acc:
                metrics[f"agree/{name}"] = 100.0 * acc["agree"] / n
                metrics[f"kl/{name}"] = acc["kl"] / n
        return metrics
