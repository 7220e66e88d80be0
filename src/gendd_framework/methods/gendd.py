"""GenDD: the student's feature conditions a diffusion head that learns to generate the teacher's feature.

Composed from registered parts (tokenizer, head, objective, sampler) plus Distribution Contraction and
feature mixup. `predict` returns `generative` logits (teacher head on sampled features) and `student`
logits (the student's own CE-trained linear head, one pass). Follows the GenDD paper (Split Tokenization,
Distribution Contraction) and the official code's training and sampling settings.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gendd_framework.context import StepContext, distill_targets
from gendd_framework.errors import ConfigError
from gendd_framework.generative import flow  # noqa: F401  (registers flow_matching, euler, heun, one_step)
from gendd_framework.generative.contraction import contract, feature_mixup
from gendd_framework.generative.protocol import check_objective, check_sampler, require_kind
from gendd_framework.methods.base import Method
from gendd_framework.methods.terms import labelled_cross_entropy
from gendd_framework.models.builder import freeze_parameters
from gendd_framework.registry import HEADS, METHODS, OBJECTIVES, SAMPLERS, TOKENIZERS, Registry, split_spec

# The components a Python caller gets when leaving a slot out. Their settings are the components' own
# signature defaults (split: token_dim 64; mlp_adaln: width 1024, depth 3; gaussian_diffusion: T 1000,
# cosine, learned variance; ddpm: 100 steps), i.e. the official values, so they are stated once, there;
# conf/method/gendd.yaml spells the same values out as documentation of the published setting.
DEFAULT_TOKENIZER = "split"
DEFAULT_HEAD = "mlp_adaln"
DEFAULT_OBJECTIVE = "gaussian_diffusion"
DEFAULT_SAMPLER = "ddpm"


@METHODS.register("gendd")
class GenDD(Method):
    """Generative Distribution Distillation: diffusion loss on the (contracted) teacher feature + CE probe.

    lam: Distribution Contraction λ (x0 = (1-λ)·f_t + λ·W_t[y]); 0 with `use_labels: false` is the
    unsupervised variant. mixup_beta: feature mixup Beta(β,β) (0 = off). cond_drop_prob: condition
    dropout for classifier-free guidance. diffusion_batch_mul: M replicas of every token row.
    ce_weight: weight of the student-head CE (0 disables it). objective_overrides: settings per
    objective name, merged over the objective config only when that objective is chosen (a recipe can
    tune the diffusion schedule without breaking `method/objective=flow`). The remaining keys are
    evaluation knobs. GenDD talks to objective and sampler only through generative/protocol.py.
    """

    primary_output = "generative"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        num_classes: int = 0,
        tokenizer: dict | None = None,
        head: dict | None = None,
        objective: dict | None = None,
        sampler: dict | None = None,
        lam: float = 0.9,
        use_labels: bool = True,
        mixup_beta: float = 1.0,
        cond_drop_prob: float = 0.2,
        diffusion_batch_mul: int = 30,
        ce_weight: float = 1.0,
        guidance_scale: float = 2.0,
        num_sampling: int = 1,
        eval_seed: int = 0,
        official_weight_decay: bool = False,
        target_scale: float | str = 1.0,
        objective_overrides: dict[str, dict] | None = None,
    ) -> None:
        if teacher is None:
            raise ConfigError("method 'gendd' needs a teacher: add the `teacher` stage before `distill`")
        super().__init__(student, teacher, student_taps=("feature",), teacher_taps=("feature", "logits"))
        if not use_labels and lam != 0:
            raise ConfigError(f"gendd without labels (use_labels=false) needs lam=0, got lam={lam}")
        if diffusion_batch_mul < 1 or num_sampling < 1:
            raise ConfigError("diffusion_batch_mul and num_sampling must be >= 1")
        if target_scale != "auto" and not (isinstance(target_scale, (int, float)) and target_scale > 0):
            raise ConfigError(f"target_scale must be a number > 0 or 'auto', got {target_scale!r}")
        teacher_dim, student_dim = self.teacher.feature_dim, self.student.feature_dim
        self.tokenizer = TOKENIZERS.build(tokenizer or DEFAULT_TOKENIZER, feature_dim=teacher_dim)
        self.norm = nn.LayerNorm(student_dim)
        objective_name, objective_kwargs = split_spec(objective or DEFAULT_OBJECTIVE, "objective")
        objective_kwargs.update(_overrides_for(objective_name, objective_overrides))
        self.objective = OBJECTIVES.build({"name": objective_name, **objective_kwargs})
        check_objective(self.objective, objective_name)
        sampler_spec = sampler or DEFAULT_SAMPLER
        self.sampler = SAMPLERS.build(sampler_spec)
        sampler_name = split_spec(sampler_spec, "sampler")[0]
        check_sampler(self.sampler, sampler_name)
        require_kind(self.sampler, self.objective, sampler_name, objective_name)
        # The head's output channels follow the objective's learn_sigma unless the head config sets it.
        self.head = HEADS.build(
            head or DEFAULT_HEAD,
            token_dim=self.tokenizer.token_dim,
            cond_dim=student_dim,
            num_positions=self.tokenizer.num_tokens,
            learn_sigma=self.objective.learn_sigma,
        )
        if getattr(self.head, "learn_sigma", self.objective.learn_sigma) != self.objective.learn_sigma:
            raise ConfigError(
                f"head learn_sigma={self.head.learn_sigma} but objective '{objective_name}' has "
                f"learn_sigma={self.objective.learn_sigma}; drop learn_sigma from the head config"
            )
        # A detached copy of the teacher head (the official code's choice): contraction centres and test-time
        # classifier.
        self.register_buffer("class_weight", self.teacher.classifier.weight.detach().clone())
        bias = self.teacher.classifier.bias
        self.register_buffer("class_bias", bias.detach().clone() if bias is not None else None)
        self.lam, self.use_labels, self.mixup_beta = float(lam), use_labels, float(mixup_beta)
        self.cond_drop_prob, self.mul, self.ce_weight = (
            float(cond_drop_prob),
            int(diffusion_batch_mul),
            ce_weight,
        )
        self.guidance_scale, self.num_sampling, self.eval_seed = (
            float(guidance_scale),
            int(num_sampling),
            eval_seed,
        )
        self.official_weight_decay = official_weight_decay
        # Diffusion runs on target_scale * x0 and samples are divided by it again (as latent diffusion
        # scales its latents): features far smaller than the unit noise leave most timesteps at
        # near-zero SNR, where a deterministic (DDIM eta=0) sampler needs an almost exact eps.
        # 'auto' = 1/RMS(x0) of the first training batch. A buffer, so evaluation and resume reuse
        # the scale the head was trained with (0 = not measured yet).
        auto = target_scale == "auto"
        self.register_buffer("target_scale", torch.tensor(0.0 if auto else float(target_scale)))
        self._scale_checked = not auto
        self._sampling_generator: torch.Generator | None = None

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        x, target = batch["input"], batch["target"]
        with torch.no_grad():
            teacher_out = self.teacher_outputs(x, batch)
            f = teacher_out["feature"].float()
            # unlabelled samples (transfer set) contract toward the teacher's predicted class
            labels_seen = batch.get("all_labelled")
            y = distill_targets(target, teacher_out["logits"], labels_seen) if self.use_labels else None
            x0 = contract(f, y, self.class_weight, self.lam)
            if not self._scale_checked:
                self._measure_target_scale(x0)
        h = self.student(x)["feature"]
        z = self.norm(h.float())
        z, x0 = feature_mixup(z, x0, self.mixup_beta)
        tokens = self.tokenizer.tokenize(x0 * self.target_scale)  # (B, n, k)
        rows = tokens.unsqueeze(0).expand(self.mul, *tokens.shape)  # (M, B, n, k): no copy
        drop = torch.rand(rows.shape[:-1], device=x.device) < self.cond_drop_prob
        # Call the head module itself (not a cached closure) so DDP wrappers see a forward.
        losses = self.objective.training_losses(lambda x_t, t: self.head(x_t, t, z, drop=drop), rows)
        # "diffusion" is the generative loss whatever the objective (a stable name for logs and benchmarks);
        # every other term the objective reports is logged, detached, under its own name.
        out = {name: value.detach() for name, value in losses.items() if name != "loss"}
        out["diffusion"] = losses["loss"]
        loss = losses["loss"]
        if self.use_labels and self.ce_weight > 0:
            logits = self.student.classifier(h.detach())
            out["ce"] = labelled_cross_entropy(logits, target, all_labelled=batch.get("all_labelled"))
            loss = loss + self.ce_weight * out["ce"]
        out["loss"] = loss
        return out

    def _measure_target_scale(self, x0: torch.Tensor) -> None:
        """Set an 'auto' scale (still 0) to 1/RMS(x0), averaged over ranks when distributed."""
        if self.target_scale.item() <= 0:
            mean_square = x0.float().pow(2).mean()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(mean_square)
                mean_square /= torch.distributed.get_world_size()
            self.target_scale.fill_(float(mean_square.clamp_min(1e-12).rsqrt()))
        self._scale_checked = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002
        # checkpoints written before target_scale existed trained on unscaled targets
        state_dict.setdefault(prefix + "target_scale", torch.tensor(1.0))
        self._scale_checked = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- evaluation -----------------------------------------------------------------------------
    def on_evaluate_start(self) -> None:
        """Re-seed the sampling generator so every evaluation pass draws the same noise."""
        self._sampling_generator = None

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._sampling_generator
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(int(self.eval_seed))
            self._sampling_generator = gen
        return gen

    @torch.no_grad()
    def sample_features(self, z: torch.Tensor, num_sampling: int | None = None) -> torch.Tensor:
        """Teacher-space features (NS, B, D_t) sampled per token with guidance, given conditions (B, D_s)."""
        ns = num_sampling or self.num_sampling
        model_fn = self.head.make_model_fn(z.float())  # condition/position embeddings cached across steps
        shape = (ns, z.shape[0], self.tokenizer.num_tokens, self.tokenizer.token_dim)
        tokens = self.sampler.sample(
            self.objective,
            model_fn,
            shape,
            guidance_scale=self.guidance_scale,
            generator=self._generator(z.device),
            device=z.device,
        )
        scale = float(self.target_scale)
        if scale <= 0:
            raise ConfigError("target_scale='auto' is measured on the first training batch; train first")
        return self.tokenizer.detokenize(tokens) / scale

    def teacher_head(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.class_weight, self.class_bias)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.student(x)["feature"]
        student_logits = self.student.classifier(h)
        features = self.sample_features(self.norm(h.float())).mean(0)  # averaging features = averaging logits
        return {"generative": self.teacher_head(features), "student": student_logits}

    def eval_settings(self) -> dict[str, Any]:
        """Recorded next to every evaluation result. `sampler` stays the class name and the sampler's
        settings stay flat (older summaries); `nfe` = head calls per predict batch (protocol.py)."""
        sampler = _settings(self.sampler)
        return {
            "sampler": type(self.sampler).__name__,
            **sampler,
            "sampler_name": _registered_name(SAMPLERS, self.sampler),
            "objective": _registered_name(OBJECTIVES, self.objective),
            "objective_settings": _settings(self.objective),
            "nfe": int(self.sampler.nfe(self.objective)),
            "guidance_scale": self.guidance_scale,
            "num_sampling": self.num_sampling,
            "eval_seed": self.eval_seed,
            "target_scale": float(self.target_scale),
        }

    # -- optimisation ---------------------------------------------------------------------------
    def no_decay_modules(self) -> list[nn.Module]:
        return [self.head] if self.official_weight_decay else [self.head, self.norm]

    def param_groups(self, weight_decay: float) -> list[dict]:
        if not self.official_weight_decay:
            return super().param_groups(weight_decay)
        # Official code: only the diffusion head skips decay (student BN, biases and the LN get it).
        head = [p for p in self.head.parameters() if p.requires_grad]
        head_ids = {id(p) for p in head}
        rest = [
            p
            for m in self.trainable_modules()
            for p in m.parameters()
            if p.requires_grad and id(p) not in head_ids
        ]
        return [
            {"params": rest, "weight_decay": weight_decay, "group": "decay"},
            {"params": head, "weight_decay": 0.0, "group": "no_decay"},
        ]


def _overrides_for(name: str, overrides: dict[str, dict] | None) -> dict[str, Any]:
    """The `objective_overrides` entry of objective `name` (aliases resolved); unknown keys fail."""
    if not overrides:
        return {}
    unknown = [key for key in overrides if key not in OBJECTIVES]
    if unknown:
        raise ConfigError(f"objective_overrides names unknown objectives {unknown}: {OBJECTIVES.names()}")
    target = OBJECTIVES.get(name)
    merged: dict[str, Any] = {}
    for key, values in overrides.items():
        if OBJECTIVES.get(key) is target:
            merged.update(dict(values or {}))
    return merged


def _registered_name(registry: Registry, component: Any) -> str:
    """The registered name of a built component (its class name if it was registered elsewhere)."""
    for name in registry.names():
        if registry.get(name) is type(component):
            return name
    return type(component).__name__


def _settings(component: Any) -> dict[str, Any]:
    """A component's public plain-value attributes (its config, as recorded with results)."""
    plain = (bool, int, float, str, type(None))
    return {k: v for k, v in vars(component).items() if not k.startswith("_") and isinstance(v, plain)}


@METHODS.register("teacher_head_ce")
class TeacherHeadCE(Method):
    """GenDD stage 1 ("pretrain"): the student learns through the frozen teacher classifier via a
    projection Linear(D_s, D_t) (identity when equal); the projection is discarded afterwards."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, num_classes: int = 0) -> None:
        if teacher is None:
            raise ConfigError("method 'teacher_head_ce' (GenDD pretrain) needs a teacher")
        super().__init__(student, teacher, student_taps=("feature",), teacher_taps=("feature",))
        ds, dt = self.student.feature_dim, self.teacher.feature_dim
        self.proj = nn.Identity() if ds == dt else nn.Linear(ds, dt)
        freeze_parameters(student, ["classifier"])

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        logits = self.teacher.classifier(self.proj(self.student(batch["input"])["feature"]))
        ce = labelled_cross_entropy(logits, batch["target"], all_labelled=batch.get("all_labelled"))
        return {"ce": ce, "loss": ce}

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"student": self.teacher.classifier(self.proj(self.student(x)["feature"]))}
