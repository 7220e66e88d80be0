"""Adversarial transfer: do images crafted to fool the teacher also fool the student?

I-FGSM (Kurakin et al.; Ojha et al.'s protocol) on the teacher: x <- clip_{x0 ± eps}(x + a·sign(∇x CE(t(x),
y))) for `steps` steps, in the input space the model sees (after the data's normalisation; eps is in
those units and recorded as a share of the inputs' std). Images whose teacher prediction changes are
kept; the fooling rate is the share of them whose student prediction also changes from its own clean
prediction, and `same_class` the share where the student moves to the teacher's adversarial class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gendd_framework.analysis.probes.common import (
    ProbeData,
    ProbeResult,
    batches,
    eval_mode,
    model_device,
    percent,
    predict,
)
from gendd_framework.analysis.probes.settings import AdversarialSettings


def ifgsm(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    value_range: tuple[float, float] | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Untargeted L-inf I-FGSM against `labels` (one step of size eps is FGSM); CPU result."""
    device = model_device(model)
    out = []
    with eval_mode(model):
        for part in batches(len(inputs), batch_size):
            x0, y = inputs[part].to(device), labels[part].to(device)
            x = x0.clone()
            for _ in range(steps):
                x.requires_grad_(True)
                with torch.enable_grad():
                    loss = F.cross_entropy(model(x).float(), y, reduction="sum")
                    (grad,) = torch.autograd.grad(loss, x)
                x = x.detach() + step_size * grad.sign()
                x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps)
                if value_range is not None:
                    x = x.clamp(*value_range)
            out.append(x.detach().cpu())
    return torch.cat(out)


def resolved_step(s: AdversarialSettings) -> float:
    """The step size used: as set, else 2.5·eps/steps (Madry et al.'s rule: the ball's edge is reachable)."""
    return float(s.step_size) if s.step_size is not None else 2.5 * s.eps / s.steps


def probe_adversarial(
    teacher: nn.Module, student: nn.Module, data: ProbeData, s: AdversarialSettings
) -> ProbeResult:
    labels = data.targets if s.target == "label" else data.teacher_pred
    step = resolved_step(s)
    adv = ifgsm(
        teacher,
        data.inputs,
        labels,
        s.eps,
        step,
        s.steps,
        data.value_range if s.clip else None,
        data.batch_size,
    )
    t_adv = predict(teacher, adv, data.batch_size).argmax(1)
    s_adv = predict(student, adv, data.batch_size).argmax(1)
    kept = t_adv != data.teacher_pred
    metrics = {
        "adversarial/teacher_flipped": percent(kept),
        "adversarial/fooling_rate": percent((s_adv != data.student_pred)[kept]),
        "adversarial/same_class": percent((s_adv == t_adv)[kept]),
        "adversarial/student_flipped_all": percent(s_adv != data.student_pred),
    }
    details = {
        "kept": int(kept.sum()),
        "step_size": step,
        "eps_over_input_std": s.eps / data.input_std,
        "input_std": data.input_std,
        "value_range": list(data.value_range) if s.clip else None,
    }
    return ProbeResult(metrics, details)
