"""A finished run's teacher and predictor, rebuilt from its config and checkpoint (nothing retrained).

The student side is what the method deploys: `method.export()` when the method defines it, else the
student model. The teacher is the run's teacher stage: the method's own copy (saved in the
checkpoint) for a `distill` stage, else the weights the run's summary names as the teacher's source
(a cache file, a weights file or an earlier run's student; each member of an ensemble).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from gendd_framework.errors import ConfigError

SOURCE_PREFIXES = ("cache:", "trained:", "run:")


@dataclass
class ProbeSubject:
    """What the probes need from one run."""

    run_dir: Path
    teacher: nn.Module
    student: nn.Module
    dataset: Dataset
    device: torch.device
    describe: dict[str, Any] = field(default_factory=dict)


def predictor(method: nn.Module) -> tuple[nn.Module, str]:
    """The model a method deploys, and how it was obtained."""
    export = getattr(method, "export", None)
    if callable(export):
        return export(), "method.export()"
    return method.student_model, "student model"


def source_path(source: str) -> Path:
    for prefix in SOURCE_PREFIXES:
        if source.startswith(prefix):
            return Path(source[len(prefix) :]).expanduser()
    return Path(source).expanduser()


def teacher_from_summary(run_dir: Path, teacher_cfg: Any, num_classes: int) -> tuple[nn.Module, str]:
    """The run's teacher rebuilt from its config, loaded from the weights its summary records."""
    from gendd_framework.models import load_state_dict_file
    from gendd_framework.models.ensemble import EnsembleTeacher
    from gendd_framework.stages import teacher_architecture

    summary_path = run_dir / "summary.json"
    record = json.loads(summary_path.read_text()).get("teacher") if summary_path.is_file() else None
    if not teacher_cfg or not isinstance(record, dict):
        raise ConfigError(
            f"{run_dir} has no teacher stage in its summary.json: probes compare a student with its teacher"
        )
    model = teacher_architecture(teacher_cfg, num_classes)
    if isinstance(model, EnsembleTeacher):
        sources = [str(record.get(f"member_{i}", {}).get("source", "")) for i in range(len(model.members))]
        for member, source in zip(model.members, sources):
            member.load_state_dict(load_state_dict_file(source_path(source)))
        return model, ", ".join(sources)
    source = str(record.get("source", ""))
    if not source:
        raise ConfigError(f"{summary_path}: the teacher record names no weights source")
    model.load_state_dict(load_state_dict_file(source_path(source)))
    return model, source


def load_subject(
    run_dir: str | Path, stage: str = "distill", split: str = "test", device: str = "auto"
) -> ProbeSubject:
    """Teacher, deployed predictor and the split to probe, for one run directory."""
    from gendd_framework.cli.evaluate import RunEvaluator
    from gendd_framework.methods.base import freeze
    from gendd_framework.stages import stage_kind

    evaluator = RunEvaluator(run_dir, stage, device)
    method = evaluator.build_method()
    student, how = predictor(method)
    # Probes compare with the run's `teacher` stage: the stage's evaluation reference, unless the stage
    # is a born-again generation (its teacher is the previous student) or had none (teacher-free).
    if evaluator.teacher is not None and stage_kind(evaluator.cfg, stage) != "born_again":
        teacher, teacher_source = evaluator.teacher, f"checkpoint of stage '{stage}'"
    else:
        teacher, teacher_source = teacher_from_summary(
            evaluator.run_dir, evaluator.cfg.get("teacher"), evaluator.data.num_classes
        )
    if split not in ("val", "test"):
        raise ConfigError(f"split={split}: expected val or test")
    describe = {"stage": stage, "split": split, "predictor": how, "teacher": teacher_source}
    return ProbeSubject(
        evaluator.run_dir,
        freeze(teacher).to(evaluator.device),
        student.to(evaluator.device),
        getattr(evaluator.data, split),
        evaluator.device,
        describe,
    )


def same_teacher(a: nn.Module, b: nn.Module) -> bool:
    """Equal architectures and weights (a control run must share the probed run's teacher)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa
    )
