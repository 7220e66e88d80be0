"""FitNets (Romero et al. ICLR'15): a regressor maps the student's guided-layer map onto the teacher's
hint map and the squared error between them is minimised.

- `fitnet` (method): CE + β·MSE(r(s), t) in one stage, as in CRD/RepDistiller/mdistiller (β = 100).
- `fitnet` (loss term): the hint term alone, for `method=distill` compositions.
- `fitnet_hint` (method): the hint loss only, training only the student's parameters up to the guided
  layer plus the regressor: stage 1 of the paper (the `hint` stage builds it).

Layers (`student_layers` / `teacher_layers`, one map each): `auto` is stage index 1 of each side's
default stages (the only stage when a model has one). With the stem-less stage lists of
`models/feature_stages.py` this is mdistiller's `hint_layer 2` of `[stem, s1, s2, ...]` on every family of
the zoo: the middle stage of 3-stage nets (CIFAR ResNets, WRNs, ShuffleNets, digits CNNs) and the
second stage of 4-stage ones (VGG, MobileNetV2, ResNet-50, torchvision ResNets).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import fx, nn

from gendd_framework.errors import ConfigError
from gendd_framework.losses.fitnet import hint_mse
from gendd_framework.methods.base import Method, split_decay
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.feature.layers import LayerSpec, resolve_layers
from gendd_framework.methods.feature.projectors import ConvRegressor
from gendd_framework.methods.terms import LossTerm, require_shapes
from gendd_framework.models.tap import SPECIAL_TAPS, parse_tap, unknown_path_message
from gendd_framework.registry import LOSSES, METHODS

HINT_STAGE = 1  # `auto`: the second default stage (mdistiller/RepDistiller hint_layer 2 counting the stem)
REGRESSORS = ("conv", "none")


def hint_layer(model: nn.Module, spec: LayerSpec, input_shape: Any, key: str) -> str:
    """The one tap FitNet reads on `model`: `auto` -> default stage HINT_STAGE (or the only stage)."""
    if spec is None or spec == "auto":
        stages = resolve_layers(model, "auto", input_shape, key)
        return stages[min(HINT_STAGE, len(stages) - 1)]
    layers = resolve_layers(model, spec, input_shape, key)
    if len(layers) != 1:
        raise ConfigError(f"fitnet guides one layer per side, but `{key}` selects {layers}")
    if layers[0] in SPECIAL_TAPS:
        raise ConfigError(
            f"fitnet reads a feature map: `{key}` must be a stage index or a module path, got '{layers[0]}'"
        )
    return layers[0]


@LOSSES.register("fitnet")
class FitNetHint(LossTerm):
    """MSE(r(student guided map), teacher hint map); r = conv+BN+ReLU regressor sized from the probe."""

    def __init__(
        self, student_layers: LayerSpec = "auto", teacher_layers: LayerSpec = "auto", regressor: str = "conv"
    ) -> None:
        super().__init__()
        if regressor not in REGRESSORS:
            raise ConfigError(f"fitnet regressor must be one of {REGRESSORS}, got '{regressor}'")
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        self.regressor_kind = regressor
        self.regressor: nn.Module = nn.Identity()

    def bind(self, student, teacher, facts) -> None:
        shape = facts.get("input_shape")
        self.student_taps = (hint_layer(student, self.student_layers, shape, "student_layers"),)
        self.teacher_taps = (hint_layer(teacher, self.teacher_layers, shape, "teacher_layers"),)

    def setup(self, shapes) -> None:
        shapes = require_shapes(shapes, "fitnet")
        (s_tap,), (t_tap,) = self.student_taps, self.teacher_taps
        s_shape, t_shape = tuple(shapes["student"][s_tap]), tuple(shapes["teacher"][t_tap])
        where = f"`student_layers` {s_tap} gives {s_shape}, `teacher_layers` {t_tap} gives {t_shape}"
        if len(s_shape) != 3 or len(t_shape) != 3:
            raise ConfigError(f"fitnet needs (C, H, W) maps: {where}")
        if self.regressor_kind == "none":
            if s_shape != t_shape:
                raise ConfigError(f"fitnet regressor: none needs equal maps: {where}")
            return
        try:
            self.regressor = ConvRegressor(s_shape, t_shape)
        except ConfigError as exc:
            raise ConfigError(f"fitnet: {where}; {exc}") from None

    def forward(self, student, teacher, batch, ctx) -> torch.Tensor:
        (s_tap,), (t_tap,) = self.student_taps, self.teacher_taps
        regressed, target = self.regressor(student[s_tap]), teacher[t_tap]
        work = torch.promote_types(regressed.dtype, torch.float32)  # the squared error in fp32 at least
        return hint_mse(regressed.to(work), target.to(work))


@METHODS.register("fitnet")
class FitNetMethod(ComposedMethod):
    """CE + β·MSE(r(s), t) on one hint layer per side (CIFAR-100 defaults: β=100, the second stage)."""

    uses = (
        Use("ce", weight="ce_weight"),
        Use("fitnet", weight="feature_weight", args=("student_layers", "teacher_layers", "regressor")),
    )
    defaults = {"ce_weight": 1.0, "feature_weight": 100.0}


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode for the block (probes must not move BN statistics), its mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class _CutTracer(fx.Tracer):
    """torch.fx tracer that keeps the module at `path` as one call, and timm's layers and helpers that
    torch.fx cannot trace through (its own notrace lists) as leaves."""

    def __init__(self, path: str) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.path, self.leaves = path, tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name == self.path
            or isinstance(m, self.leaves)
            or super().is_leaf_module(m, module_qualified_name)
        )


def cut_at(model: nn.Module, tap: str) -> fx.GraphModule:
    """`model`'s forward up to the module `tap` names, returning its output (or, `path:input`, its input).

    The forward is traced once with torch.fx and every operation after that call is dropped, so the
    layers after it never run: they get no gradient and, in train mode, their BN statistics do not
    move. The result shares the model's modules and parameters and adds no hooks, so the model is
    handed to later stages untouched; it is traced from the Python forward, so a model compiled in
    place (`trainer.speed.compile`) is cut alike. Control flow on `self.training` is fixed at trace
    time: trace again after switching train/eval mode."""
    _key, path, io = parse_tap(tap)
    if not path or path in SPECIAL_TAPS or path not in dict(model.named_modules()):
        raise ConfigError(unknown_path_message(model, path))
    try:
        graph = _CutTracer(path).trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the same config problem
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"the hint stage cuts {type(model).__name__} at '{tap}' with torch.fx, which cannot trace its "
            f"forward ({reason}); make the forward traceable or train FitNet in one stage (method=fitnet)"
        ) from None
    nodes = list(graph.nodes)
    calls = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == path]
    if not calls:
        raise ConfigError(f"layer '{tap}' of {type(model).__name__} did not run in its forward")
    guided = nodes[calls[0]]
    output = nodes[-1]
    output.args = (guided.args[0] if io == "input" else guided,)
    for node in reversed(nodes[calls[0] + (io == "output") : -1]):  # everything after the cut
        graph.erase_node(node)
    return fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Cut")


class FitNetHintMethod(Method):
    """Stage 1 of FitNets: loss = MSE(r(student guided map), teacher hint map), nothing else.

    Only the student's parameters on the path to the guided layer (found by one probe backward at
    build) and the regressor are optimised; both models run only up to their hint layers (`cut_at`)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        input_shape: tuple[int, ...] | None = None,
        student_layers: LayerSpec = "auto",
        teacher_layers: LayerSpec = "auto",
        regressor: str = "conv",
    ) -> None:
        if teacher is None:
            raise ConfigError("fitnet_hint regresses a teacher's hint map: build it with a teacher")
        term = FitNetHint(student_layers, teacher_layers, regressor)
        term.bind(student, teacher, {"input_shape": input_shape, "num_samples": None})
        # no hook taps: both models run cut at their hint layers (`cut_at`), the models stay untouched
        super().__init__(student, teacher, teacher_taps=("logits",), input_shape=input_shape)
        self.term = term
        self._cuts: dict[tuple[str, bool, torch.device], fx.GraphModule] = {}  # not submodules
        (self.guided,), (self.hint,) = term.student_taps, term.teacher_taps
        if input_shape is None:
            raise ConfigError("fitnet_hint sizes its regressor from a probe: build it with input_shape")
        example = torch.zeros(2, *input_shape, device=self._device())
        with torch.no_grad(), eval_mode(student):
            shapes = {
                "student": {self.guided: tuple(self.cut_forward("student", example).shape[1:])},
                "teacher": {self.hint: tuple(self.cut_forward("teacher", example).shape[1:])},
            }
        term.setup(shapes)
        self.hint_parameter_names = self._hint_path(example)
        self._cuts.clear()  # training traces afresh, after device moves, sync-BN swaps or compile

    def cut_forward(self, side: str, x: torch.Tensor) -> torch.Tensor:
        """The `side` ('student' or 'teacher') model's map at its layer, through a cut traced once per
        (train/eval mode, device) of that model."""
        model = getattr(self, side).model
        key = (side, model.training, x.device)
        if key not in self._cuts:
            self._cuts[key] = cut_at(model, self.guided if side == "student" else self.hint)
        return self._cuts[key](x)

    def _hint_path(self, example: torch.Tensor) -> list[str]:
        """Names of the trainable student parameters the guided map depends on (one probe backward)."""
        model = self.student.model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with torch.enable_grad(), eval_mode(model):
            out = self.cut_forward("student", example)
            params = [p for _, p in named]
            tracked = params and out.requires_grad  # else: nothing trainable before the guided layer
            grads = torch.autograd.grad(out.sum(), params, allow_unused=True) if tracked else []
        names = [n for (n, _), g in zip(named, grads) if g is not None]
        if not names:
            raise ConfigError(
                f"fitnet_hint: the guided layer '{self.guided}' depends on no trainable student parameter; "
                "pick a deeper `student_layers`"
            )
        return names

    def training_step(self, batch: Mapping[str, Any], ctx) -> dict[str, torch.Tensor]:
        x = batch["input"]
        with torch.no_grad():
            hint = self.cut_forward("teacher", x)
        guided = self.cut_forward("student", x)
        loss = self.term({self.guided: guided}, {self.hint: hint}, batch, ctx)
        return {"loss": loss, "hint": loss.detach()}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The hint path and the regressor only: later layers are not handed to the optimizer at all."""
        params = dict(self.student.model.named_parameters())
        allowed = {id(params[n]) for n in self.hint_parameter_names} | {id(p) for p in self.term.parameters()}
        decay, no_decay = split_decay(self.trainable_modules(), self.no_decay_modules())
        kept = [p for p in decay if id(p) in allowed]
        groups = [{"params": kept, "weight_decay": weight_decay, "group": "decay"}]
        kept_no_decay = [p for p in no_decay if id(p) in allowed]
        if kept_no_decay:
            groups.append({"params": kept_no_decay, "weight_decay": 0.0, "group": "no_decay"})
        return groups

    def excluded_parameters(self) -> list[nn.Parameter]:
        """The student's layers after the guided one: left to the next stage on purpose."""
        hinted = set(self.hint_parameter_names)
        return [p for n, p in self.student.model.named_parameters() if n not in hinted]

    def extra_repr(self) -> str:
        return f"loss = mse(regressor({self.guided}), teacher {self.hint})"


@METHODS.register("fitnet_hint")
def fitnet_hint(
    student: nn.Module,
    teacher: nn.Module | None = None,
    input_shape: tuple[int, ...] | None = None,
    student_layers: LayerSpec = "auto",
    teacher_layers: LayerSpec = "auto",
    regressor: str = "conv",
) -> FitNetHintMethod:
    """FitNets stage 1: the hint MSE only, on the student's guided path plus the regressor."""
    return FitNetHintMethod(student, teacher, input_shape, student_layers, teacher_layers, regressor)
