"""The method ("distiller") contract every training recipe implements, built-in or plugin.

A method owns the student, the frozen teacher and any extra trainable parts. The Trainer needs only:
- `training_step(batch, ctx) -> {"loss": ..., <named terms>...}`: `batch` is a mapping
  (`input`, `target`, `index`, views `input_1`, ...), `ctx` a StepContext (step, epoch, totals);
- `predict(x) -> {name: logits}`: every output is evaluated;
- `param_groups(weight_decay)`: the no-decay group made explicit by parameter role, not by name, plus
  `custom_param_groups()` with their own settings (`lr`, `lr_scale`, `weight_decay`);
- hooks at fixed points: `after_optimizer_step(ctx)`, `on_epoch_start(epoch)`, `on_epoch_end(epoch)`,
  `on_evaluate_start()`.
What a method declares is checked before training, in one line: `needs_teacher`, `batch_keys` (views
and extra sample keys), and every parameter that requires grad must be in a param group
(`unoptimised_parameters`). `export()` is the deployable predictor (`student.pt`, `teacher=from_run`).
Taps are declared per side and shape-probed once at build (`tap_shapes`), so projectors are sized from
real shapes; `prepare(stats)` may compute teacher statistics once before training (cached).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from gendd_framework.context import StepContext, view_index
from gendd_framework.errors import ConfigError
from gendd_framework.models.tap import FeatureTap

NO_DECAY_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Embedding)
TapList = Iterable[str | Mapping[str, Any]]
GROUP_SETTINGS = ("lr", "lr_scale", "weight_decay")  # what a custom param group may set (see optim.py)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher never changes, not even its BN statistics."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def noop_hook(fn):
    """Marks a base-class hook that does nothing: the Trainer skips it instead of calling it per step."""
    fn.noop_hook = True
    return fn


def missing_teacher(what: str) -> str:
    """The one-line error of a method that needs a teacher in a stage that has none."""
    return (
        f"{what} needs a teacher, but this stage has none: put a `teacher` stage before it "
        "(stages: [teacher, distill]) and pick one with teacher=<name>, or use a teacher-free method "
        "(e.g. method=ce)"
    )


def split_decay(
    modules: Iterable[nn.Module],
    no_decay_modules: Iterable[nn.Module] = (),
    params: Iterable[nn.Parameter] = (),
    skip: Iterable[nn.Parameter] = (),
) -> tuple[list, list]:
    """(decay, no_decay) trainable parameters: biases, norm/embedding weights and every parameter of
    `no_decay_modules` skip weight decay; weight matrices and conv kernels get it. `params` are loose
    parameters (set directly on a method), sorted by shape alone; `skip` are left out (custom groups)."""
    excluded = {id(p) for m in no_decay_modules for p in m.parameters()}
    decay, no_decay, seen = [], [], {id(p) for p in skip}
    owned = [
        (sub, name, p)
        for m in modules
        for sub in m.modules()
        for name, p in sub.named_parameters(recurse=False)
    ]
    owned += [(None, "", p) for p in params]
    for sub, name, p in owned:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in excluded or isinstance(sub, NO_DECAY_TYPES) or name == "bias" or p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    return decay, no_decay


def unoptimised_parameters(method: nn.Module, param_groups: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names of the method's parameters that require grad but are in no param group: they would get
    gradients, be checkpointed and never change. A frozen teacher's never require grad; a method may
    leave some to a later stage on purpose (`excluded_parameters()`)."""
    grouped = {id(p) for g in param_groups for p in g["params"]}
    excluded = getattr(method, "excluded_parameters", None)
    grouped |= {id(p) for p in (excluded() if callable(excluded) else ())}
    names, seen = [], set()
    for name, p in method.named_parameters(remove_duplicate=False):
        if p.requires_grad and id(p) not in grouped and id(p) not in seen:
            seen.add(id(p))
            names.append(name)
    return names


def release_taps(method: nn.Module, keep: nn.Module | None = None) -> None:
    """Remove the forward hooks of the FeatureTaps inside a discarded `method`, except taps that are
    part of `keep` (an exported predictor that reads through them), so its models carry no stale hooks."""
    kept = {id(m) for m in keep.modules()} if keep is not None else set()
    for tap in method.modules():
        if isinstance(tap, FeatureTap) and id(tap) not in kept:
            for handle in tap._handles:
                handle.remove()
            tap._handles = []


def required_views(method: nn.Module, sample_keys: Iterable[str]) -> int:
    """How many augmented views of each training sample the loader must draw for `method` (1 = just
    `input`): `input_<k>` in the method's `batch_keys` asks for views 1..k. Any other key the method
    reads must be in `sample_keys` (what the data serves); else a one-line ConfigError."""
    wanted = tuple(getattr(method, "batch_keys", ("input", "target")))
    served = set(sample_keys)
    absent = {k: view_index(k) for k in wanted if k not in served}
    missing = [k for k, view in absent.items() if view is None]
    if missing:
        raise ConfigError(
            f"method {type(method).__name__} reads batch key(s) {missing} that the training data does not "
            f"serve (its samples carry {sorted(served)}); views are `input_1`, `input_2`, ... (drawn "
            "automatically), other keys need a dataset whose samples are mappings that carry them"
        )
    return 1 + max((v for v in absent.values() if v is not None), default=0)


class Method(nn.Module):
    """Base class: wraps student (and teacher) in FeatureTaps; subclasses define the training step.

    `student_taps`/`teacher_taps` list what each side exposes (`logits`, `feature`, `layer3`,
    `layer3:input`); `teacher_taps=None` reuses the student's list. `input_shape` (one sample, no batch
    dimension) lets `tap_shapes()` run the build-time probe.
    """

    primary_output = "student"  # the `predict` key used for model selection by default
    needs_teacher = True  # False: the method trains without one (a `teacher` given is kept as is)
    teacher_is_frozen = True  # False: the teacher changes during training (EMA): never cached
    batch_keys: tuple[str, ...] = ("input", "target")  # sample keys read; `input_1`, ... are views

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        student_taps: TapList = ("logits",),
        teacher_taps: TapList | None = None,
        input_shape: tuple[int, ...] | None = None,
    ):
        if teacher is None and self.needs_teacher:
            raise ConfigError(missing_teacher(f"method {type(self).__name__}"))
        super().__init__()
        student_taps = list(student_taps)
        self.student = FeatureTap(student, student_taps)
        taps = student_taps if teacher_taps is None else list(teacher_taps)
        self.teacher = FeatureTap(freeze(teacher), taps) if teacher is not None else None
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self._shapes: dict[str, dict[str, tuple[int, ...]]] | None = None
        # how `teacher_outputs` runs the frozen teacher (trainer.speed.teacher_mode) and an optional
        # teacher-output cache (engine/teacher_cache.py); plain attributes, not saved with the weights
        self.teacher_grad_mode = "no_grad"
        self.teacher_cache: Any = None

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        if self.teacher is not None:  # a method whose teacher should train (BN, dropout) overrides this
            self.teacher.eval()
        return self

    # -- build-time probe ---------------------------------------------------------------------------
    def tap_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """`{"student": {tap: shape}, "teacher": {...}}` per sample, from one dry forward (cached)."""
        if self._shapes is None:
            if self.input_shape is None:
                raise ConfigError(
                    f"{type(self).__name__} sizes its parts from tap shapes: build it with input_shape=..."
                )
            example = torch.zeros(2, *self.input_shape, device=self._device())
            self._shapes = {"student": self.student.probe(example)}
            if self.teacher is not None:
                self._shapes["teacher"] = self.teacher.probe(example)
        return self._shapes

    def _device(self) -> torch.device:
        param = next(self.student.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    # -- training ------------------------------------------------------------------------------------
    def teacher_outputs(
        self, x: torch.Tensor, batch: Mapping[str, Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """The frozen teacher's taps for `x`, never tracked by autograd.

        With a teacher-output cache attached (`trainer.teacher_cache`) and the `batch` given, the taps
        of samples seen before are read instead of recomputed, but only when `x` is one of the batch's
        own tensors (`batch["input"]`, a view `batch["input_1"]`, ...) and the teacher has not changed
        since the cache was attached; anything else is computed (engine/teacher_cache.py).
        `teacher_grad_mode="no_grad"` (the default) runs it under `torch.no_grad()`; `"inference"`
        runs it under `torch.inference_mode()` and returns clones: inference tensors may not be saved
        for backward, and terms multiply teacher taps with student tensors (KD's p_t * log p_s); a
        clone is an ordinary tensor without history.
        """
        if self.teacher is None:
            raise ConfigError(f"{type(self).__name__} was built without a teacher")
        cache = self.teacher_cache
        if cache is not None and batch is not None:
            return cache.lookup(batch, lambda: self._teacher_forward(x), x=x, teacher=self.teacher)
        return self._teacher_forward(x)

    def _teacher_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.teacher_grad_mode == "inference":
            with torch.inference_mode():
                out = self.teacher(x)
            return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        with torch.no_grad():
            return self.teacher(x)

    def prepare(self, stats: Any) -> None:
        """Compute teacher statistics once before training (`stats` is a TeacherStatistics)."""

    def training_step(self, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- hooks the Trainer calls (on every rank, on the method itself, never on a DDP wrapper) ----------
    @noop_hook
    def after_optimizer_step(self, ctx: StepContext) -> None:
        """After each optimizer update and its LR-schedule step; `ctx` is the StepContext of the step
        just taken (`ctx.step` + 1 updates are done). EMA / momentum teachers update here."""

    @noop_hook
    def on_epoch_start(self, epoch: int) -> None:
        """Before the first batch of `epoch` (0-indexed), after the model is put in train mode."""

    @noop_hook
    def on_epoch_end(self, epoch: int) -> None:
        """After the last update of `epoch` (0-indexed), before validation and the checkpoint."""

    def on_evaluate_start(self) -> None:
        """Called before each evaluation pass (stochastic methods re-seed their samplers here)."""

    # -- evaluation and export -----------------------------------------------------------------------
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"student": self.student(x)["logits"]}

    def output_names(self) -> tuple[str, ...]:
        """The keys `predict` returns (validation metrics are `<metric>/<name>`): checked at build."""
        return tuple(dict.fromkeys((self.primary_output, "student")))

    def eval_settings(self) -> dict:
        """Settings that determine `predict` (recorded next to every evaluation result)."""
        return {}

    def export(self) -> nn.Module:
        """The deployable predictor: `forward(x)` gives the primary output's logits; its `state_dict()`
        is `student.pt`. Built from the method's own modules (sharing their weights), so a method
        rebuilt from the run's config exports the same architecture. Default: the student network."""
        return self.student_model

    # -- optimisation --------------------------------------------------------------------------------
    def trainable_modules(self) -> list[nn.Module]:
        """Every child module the optimizer updates (the teacher is excluded by construction)."""
        return [m for name, m in self.named_children() if name != "teacher"]

    def direct_parameters(self) -> list[nn.Parameter]:
        """Parameters set directly on the method (`self.t = nn.Parameter(...)`), not in a child."""
        return [p for p in self._parameters.values() if p is not None]

    def no_decay_modules(self) -> list[nn.Module]:
        return []

    def custom_param_groups(self) -> list[dict]:
        """Param groups with their own optimizer settings, e.g.
        `[{"params": [self.t], "group": "temperature", "weight_decay": 0.0, "lr_scale": 10.0}]`:
        `lr` (absolute), `lr_scale` (x the optimizer's lr), `weight_decay` (default: the run's);
        LR schedules scale each group's own initial lr. Their parameters leave the default groups."""
        return []

    def param_groups(self, weight_decay: float) -> list[dict]:
        custom = [{"weight_decay": weight_decay, **g} for g in self.custom_param_groups()]
        for g in custom:
            unknown = sorted(set(g) - {"params", "group", *GROUP_SETTINGS})
            if unknown or "params" not in g:
                raise ConfigError(
                    f"{type(self).__name__}.custom_param_groups(): a group needs 'params' and may set "
                    f"{', '.join(('group', *GROUP_SETTINGS))}; got {unknown or 'no params'}"
                )
            g["params"] = list(g["params"])
        taken = [p for g in custom for p in g["params"]]
        decay, no_decay = split_decay(
            self.trainable_modules(), self.no_decay_modules(), self.direct_parameters(), skip=taken
        )
        groups = [{"params": decay, "weight_decay": weight_decay, "group": "decay"}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "group": "no_decay"})
        return groups + custom

    def excluded_parameters(self) -> list[nn.Parameter]:
        """Parameters that require grad yet this method leaves alone on purpose (e.g. the layers after
        FitNet's guided layer in the hint stage); `unoptimised_parameters` does not report them."""
        return []

    @property
    def student_model(self) -> nn.Module:
        return self.student.model
