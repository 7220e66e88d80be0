"""Reflow (2-rectified flow) for GenDD's flow head, as a registered stage.

A trained flow head defines a deterministic map noise -> feature. Reflow draws one noise per training
image, integrates the head's ODE from it (a few accurate steps) to get the paired feature, and retrains
the head on those fixed (noise, feature) couplings: their straight-line paths no longer cross, so the
retrained head's flow is nearly straight and one Euler step lands close to where many steps did.
The student is frozen; only the head trains. Checkpoints keep GenDD's own state-dict layout, so
`gendd-eval ... stage=reflow` evaluates them like any GenDD checkpoint.

    stages: [teacher, distill, {name: reflow, epochs: 20, generate: {name: heun, steps: 8}}]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from gendd_framework import config as config_lib
from gendd_framework.context import StepContext, to_device
from gendd_framework.data.base import BatchDataset
from gendd_framework.errors import ConfigError
from gendd_framework.registry import SAMPLERS, STAGES
from gendd_framework.runtime import RunContext, fit_method
from gendd_framework.stages.distill import rebuild_distill
from gendd_framework.stages.hooks import stage_hooks

if TYPE_CHECKING:
    from gendd_framework.preflight import StagePreflight

NEEDS_FLOW = "stage 'reflow' needs a GenDD stage with a flow objective before it (method/objective=flow)"


@torch.no_grad()
def reflow_pairs(
    gendd: nn.Module, ctx: RunContext, sampler: Any, guidance_scale: float, seed: int
) -> dict[str, torch.Tensor]:
    """Per training image (in split order): the condition, a noise draw and the head's ODE image of it."""
    gendd.eval()
    dataset = BatchDataset(ctx.data.train_plain or ctx.data.train)
    generator = torch.Generator(device=ctx.device).manual_seed(seed)
    conds, noises, targets = [], [], []
    n, k = gendd.tokenizer.num_tokens, gendd.tokenizer.token_dim
    for batch in DataLoader(dataset, batch_size=ctx.loader_cfg["eval_batch_size"], shuffle=False):
        x = to_device(batch, ctx.device)["input"]
        z = gendd.norm(gendd.student(x)["feature"].float())
        noise = torch.randn((1, len(x), n, k), generator=generator, device=ctx.device)
        model_fn = gendd.head.make_model_fn(z)
        tokens = sampler.sample(
            gendd.objective, model_fn, noise.shape, guidance_scale=guidance_scale,
            generator=generator, device=ctx.device, noise=noise,
        )  # fmt: skip
        conds.append(z.cpu()), noises.append(noise[0].cpu()), targets.append(tokens[0].cpu())
    return {"cond": torch.cat(conds), "noise": torch.cat(noises), "x0": torch.cat(targets)}


class ReflowHead(nn.Module):
    """Trains GenDD's head on fixed (noise, feature) couplings; everything else is GenDD's own."""

    primary_output = "generative"

    def __init__(self, gendd: nn.Module, pairs: Mapping[str, torch.Tensor], cond_drop_prob: float) -> None:
        super().__init__()
        self.__dict__["gendd"] = gendd  # not a child: checkpoints keep GenDD's state-dict layout
        self.pairs = {k: v.to(gendd.target_scale.device) for k, v in pairs.items()}
        self.cond_drop_prob = cond_drop_prob

    def train(self, mode: bool = True) -> ReflowHead:
        super().train(mode)
        self.gendd.eval()
        self.gendd.head.train(mode)  # the student, its norm and the teacher stay frozen in eval mode
        return self

    def training_step(self, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        index = batch["index"].to(self.pairs["x0"].device)
        z, noise, x0 = (self.pairs[k][index] for k in ("cond", "noise", "x0"))
        drop = torch.rand(x0.shape[:-1], device=x0.device) < self.cond_drop_prob
        losses = self.gendd.objective.training_losses(
            lambda x_t, t: self.gendd.head(x_t, t, z, drop=drop), x0, noise=noise
        )
        return {"reflow": losses["loss"], "loss": losses["loss"]}

    def param_groups(self, weight_decay: float) -> list[dict]:
        params = [p for p in self.gendd.head.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": 0.0, "group": "no_decay"}]  # GenDD's head: no decay

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.gendd.predict(x)

    def output_names(self) -> tuple[str, ...]:
        return self.gendd.output_names()

    def on_evaluate_start(self) -> None:
        self.gendd.on_evaluate_start()

    def eval_settings(self) -> dict[str, Any]:
        return self.gendd.eval_settings()

    def state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return self.gendd.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):  # noqa: ANN001
        return self.gendd.load_state_dict(state_dict, strict=strict)


def is_flow_gendd(method: nn.Module | None) -> bool:
    return getattr(getattr(method, "objective", None), "kind", None) == "flow"


def check_reflow(check: StagePreflight, **_: Any) -> None:
    """The method trained before it is GenDD with a flow head (reflow retrains that head)."""
    if not is_flow_gendd(check.models.get("method")):
        raise ConfigError(NEEDS_FLOW)


@STAGES.register("reflow")
@stage_hooks(preflight=check_reflow, rebuild=rebuild_distill)  # the GenDD method, its head retrained
def reflow_stage(
    ctx: RunContext,
    stage_name: str = "reflow",
    epochs: int = 20,
    generate: dict | None = None,
    sampler: dict | None = None,
    optim: dict | None = None,
    sched: dict | None = None,
) -> dict[str, Any]:
    """Reflow the flow head trained by the previous stage: pairs from `generate` (default Heun, 8
    steps), `epochs` of head-only training, evaluated with `sampler` (default one Euler step)."""
    gendd = ctx.models.get("method")
    if not is_flow_gendd(gendd):
        raise ConfigError(NEEDS_FLOW)
    cfg = ctx.cfg
    generator_sampler = SAMPLERS.build(generate or {"name": "heun", "steps": 8})
    pairs = reflow_pairs(gendd, ctx, generator_sampler, gendd.guidance_scale, int(cfg.seed))
    gendd.sampler = SAMPLERS.build(sampler or {"name": "euler", "steps": 1})
    method = ReflowHead(gendd, pairs, gendd.cond_drop_prob)
    trainer = config_lib.trainer_config(cfg.trainer, epochs=int(epochs))
    record = fit_method(
        ctx,
        method,
        stage_name,
        optim=optim or cfg.optim,
        sched=sched or cfg.sched,
        trainer=trainer,
        seed=int(cfg.seed),
        reference=ctx.models.get("teacher"),
    )
    record["pairs"] = {"images": len(pairs["x0"]), "generate": type(generator_sampler).__name__}
    return record
