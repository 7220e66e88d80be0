"""The method contract's optimisation side, on the Trainer and the optimizer directly: parameters set on
a method are optimised (or refused by name), DDP's wrapper holds exactly the optimizer's parameters,
hooks run at their fixed points (an EMA teacher follows the student and resumes exactly), and param
groups with their own settings reach the optimizer and its LR schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gendd_framework.engine import distributed
from gendd_framework.engine.loggers import JsonlLogger, LoggerGroup
from gendd_framework.engine.trainer import Trainer, TrainerConfig
from gendd_framework.errors import ConfigError
from gendd_framework.methods.base import Method, freeze


class Points(Dataset):
    """Separable 3-class points in 4-D."""

    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 3
        self.x = F.one_hot(self.y, 4).float() * 2 + 0.3 * torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"input": self.x[i], "target": self.y[i]}


def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


class Scaled(Method):
    """CE on logits times a learnable scalar set directly on the method (CTKD's temperature shape)."""

    needs_teacher = False

    def __init__(self, student: nn.Module) -> None:
        super().__init__(student)
        self.t = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("seen", torch.zeros(()))

    def training_step(self, batch, ctx):
        logits = self.student(batch["input"])["logits"] * self.t
        return {"loss": F.cross_entropy(logits, batch["target"])}


class Forgetful(Scaled):
    """Overrides param_groups and leaves its own parameter out."""

    def param_groups(self, weight_decay):
        return [{"params": list(self.student.parameters()), "weight_decay": weight_decay}]


class EMASelf(Method):
    """A mean teacher: the EMA of the student, updated after each optimizer step; records hook calls."""

    needs_teacher = False
    teacher_is_frozen = False

    def __init__(self, student: nn.Module, decay: float = 0.5) -> None:
        ema = copy.deepcopy(student)  # before the student's taps are installed
        super().__init__(student)
        self.ema = freeze(ema)
        self.decay = decay
        self.calls: list[tuple] = []
        self.lrs: list[float] = []
        self.optimizer: torch.optim.Optimizer | None = None  # set by a test to read the LR at hook time

    def training_step(self, batch, ctx):
        return {"loss": F.cross_entropy(self.student(batch["input"])["logits"], batch["target"])}

    @torch.no_grad()
    def after_optimizer_step(self, ctx):
        for e, s in zip(self.ema.parameters(), self.student.model.parameters()):
            e.lerp_(s, 1.0 - self.decay)
        self.calls.append(("step", ctx.step, ctx.epoch))
        if self.optimizer is not None:
            self.lrs.append(self.optimizer.param_groups[0]["lr"])

    def on_epoch_start(self, epoch):
        self.calls.append(("start", epoch))

    def on_epoch_end(self, epoch):
        self.calls.append(("end", epoch))

    def predict(self, x):
        return {"student": self.student(x)["logits"], "ema": self.ema(x)}


def make_trainer(tmp_path, method, epochs=2, lr=0.1, sched=None, **cfg) -> Trainer:
    generator = torch.Generator()
    loader = DataLoader(Points(), batch_size=8, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD([p for g in method.param_groups(0.0) for p in g["params"]], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, sched or (lambda s: 1.0))
    logger = LoggerGroup([JsonlLogger(str(tmp_path))])
    logger.jsonl_path = logger.loggers[0].path
    return Trainer(
        method,
        optimizer,
        scheduler,
        loader,
        DataLoader(Points(9), batch_size=9),
        config=TrainerConfig(epochs=epochs, progress=False, log_every=100, **cfg),
        device=torch.device("cpu"),
        ckpt_dir=tmp_path / "checkpoints",
        stage="distill",
        logger=logger,
        shuffle_seed=1,
        shuffle_generator=generator,
    )


# -- 1. every trainable parameter is optimised, or refused by name -------------------------------------
def test_a_parameter_set_directly_on_a_method_is_optimised():
    method = Scaled(linear())
    groups = method.param_groups(5e-4)
    decay = next(g for g in groups if g["group"] == "decay")["params"]
    no_decay = next(g for g in groups if g["group"] == "no_decay")["params"]
    assert any(p is method.t for p in no_decay)  # a scalar: no weight decay, like a bias
    assert any(p is method.student.model.weight for p in decay)
    optimizer = torch.optim.SGD(groups, lr=0.1)
    batch = {"input": Points().x[:8], "target": Points().y[:8]}
    loss = method.training_step(batch, None)["loss"]
    (grad,) = torch.autograd.grad(loss, [method.t], retain_graph=True)
    loss.backward()
    before = method.t.detach().clone()
    optimizer.step()
    assert grad.abs() > 0 and torch.allclose(method.t.detach(), before - 0.1 * grad)  # plain SGD step


def test_a_parameter_in_no_group_is_named_and_refused_at_stage_start():
    from gendd_framework.methods.base import unoptimised_parameters
    from gendd_framework.runtime import check_parameters

    method = Forgetful(linear())
    groups = method.param_groups(0.0)
    assert unoptimised_parameters(method, groups) == ["t"]
    scaled = Scaled(linear())
    assert unoptimised_parameters(scaled, scaled.param_groups(0.0)) == []
    with pytest.raises(ConfigError, match=r"stage 'distill'.*in no param group.*: t;") as err:
        check_parameters(method, groups, "distill")
    assert "\n" not in str(err.value)
    method.t.requires_grad_(False)  # frozen on purpose: nothing to report
    assert unoptimised_parameters(method, groups) == []


def test_ddp_wrapper_holds_the_optimizers_parameters_and_rank_0_state(monkeypatch):
    """With two ranks (faked), DDP wraps exactly the optimizer's parameters and every rank starts
    from, and keeps, rank 0's copy of what the method owns outside its frozen teacher."""
    method = Scaled(linear())
    optimizer = torch.optim.SGD(method.param_groups(0.0), lr=0.1)
    broadcast: list[torch.Tensor] = []
    wrapped: list[nn.Module] = []
    monkeypatch.setattr(distributed, "info", lambda: distributed.DistInfo(rank=0, world_size=2))
    monkeypatch.setattr(distributed.dist, "broadcast", lambda t, src: broadcast.append(t))
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", lambda m, **kw: wrapped.append(m) or m)
    runner = distributed.StepRunner(method, optimizer, torch.device("cpu"))
    optimised = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in wrapped[0].parameters()} == {id(p) for p in optimised}
    assert any(t is method.t for t in wrapped[0].parameters())
    storage = lambda tensors: sorted(t.data_ptr() for t in tensors)  # noqa: E731  (broadcast gets .data)
    assert storage(broadcast) == storage([*optimised, method.seen])
    broadcast.clear()
    runner.sync_buffers()
    assert storage(broadcast) == storage([method.seen])


# -- 2. hooks at fixed points: an EMA teacher follows the student, resume restores it --------------------
def test_hooks_run_at_fixed_points_and_an_ema_teacher_follows_the_student(tmp_path):
    method = EMASelf(linear(), decay=0.5)
    factor = lambda s: 1.0 / (1 + s)  # noqa: E731
    trainer = make_trainer(tmp_path, method, sched=factor)
    seen: list[torch.Tensor] = []  # the student's weights after every update, read by torch itself
    trainer.optimizer.register_step_post_hook(
        lambda opt, args, kw: seen.append(
            torch.cat([p.detach().flatten() for p in method.student.parameters()])
        )
    )
    method.optimizer = trainer.optimizer
    ema0 = torch.cat([p.detach().flatten() for p in method.ema.parameters()]).double()
    trainer.fit()
    steps = len(seen)
    assert steps == 2 * 3  # 24 points, batch 8, two epochs
    expected = [("start", 0)] + [("step", s, 0) for s in range(3)] + [("end", 0), ("start", 1)]
    expected += [("step", s, 1) for s in range(3, 6)] + [("end", 1)]
    assert method.calls == expected
    assert method.lrs == pytest.approx([0.1 * factor(s + 1) for s in range(steps)])  # after the LR step
    ema = ema0
    for weights in seen:  # e <- d*e + (1-d)*s, in float64
        ema = 0.5 * ema + 0.5 * weights.double()
    got = torch.cat([p.detach().flatten() for p in method.ema.parameters()]).double()
    assert torch.allclose(got, ema, atol=1e-6) and not torch.allclose(got, ema0)
    assert any(k.startswith("ema.") for k in method.state_dict())  # checkpointed with the method


def test_base_hooks_are_skipped_and_plain_modules_need_none(tmp_path):
    trainer = make_trainer(tmp_path, Scaled(linear()))
    assert trainer.hooks == {"after_optimizer_step": None, "on_epoch_start": None, "on_epoch_end": None}


def test_resume_restores_the_ema_teacher_exactly(tmp_path, monkeypatch):
    full = EMASelf(linear())
    make_trainer(tmp_path / "full", full, epochs=3).fit()
    original = Trainer.train_one_epoch

    def interrupt(self, total_steps):
        if self.epoch == 2:
            raise KeyboardInterrupt
        return original(self, total_steps)

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "cut", EMASelf(linear()), epochs=3).fit()
    monkeypatch.setattr(Trainer, "train_one_epoch", original)
    resumed = EMASelf(linear())
    make_trainer(tmp_path / "cut", resumed, epochs=3, resume=True).fit()
    a, b = full.state_dict(), resumed.state_dict()
    assert any(k.startswith("ema.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [c for c in resumed.calls if c[0] == "step"] == [("step", s, 2) for s in range(6, 9)]


# -- 3. param groups with their own settings ----------------------------------------------------------
class WithExtras(Scaled):
    """A temperature at its own LR without weight decay, a projector at 10x the LR."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__(student)
        torch.manual_seed(1)
        self.proj = nn.Linear(3, 3)

    def training_step(self, batch, ctx):
        logits = self.proj(self.student(batch["input"])["logits"]) * self.t
        return {"loss": F.cross_entropy(logits, batch["target"])}

    def custom_param_groups(self):
        return [
            {"params": [self.t], "group": "temperature", "lr": 0.5, "weight_decay": 0.0},
            {"params": self.proj.parameters(), "group": "projector", "lr_scale": 10.0},
        ]


def test_custom_groups_reach_the_optimizer_and_follow_the_schedule():
    from gendd_framework.engine.optim import build_optimizer
    from gendd_framework.registry import SCHEDULERS

    method = WithExtras(linear())
    optim = {"name": "sgd", "lr": 0.05, "weight_decay": 1e-2, "momentum": 0.9}
    optimizer = build_optimizer(optim, method.param_groups(1e-2))
    groups = {g["group"]: g for g in optimizer.param_groups}
    assert (groups["temperature"]["lr"], groups["temperature"]["weight_decay"]) == (0.5, 0.0)
    assert groups["projector"]["lr"] == pytest.approx(0.5) and groups["projector"]["weight_decay"] == 1e-2
    assert (groups["decay"]["lr"], groups["no_decay"]["lr"]) == (0.05, 0.05)
    default = [p for g in ("decay", "no_decay") for p in groups[g]["params"]]
    assert not any(p is method.t or p is method.proj.weight for p in default)  # left the default groups
    # one update against the SGD formula (first momentum step = gradient): w <- w - lr*(g + wd*w)
    batch = {"input": Points().x[:8], "target": Points().y[:8]}
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    method.training_step(batch, None)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters()}
    optimizer.step()
    assert torch.allclose(method.t, before["t"] - 0.5 * grads["t"])
    w = before["proj.weight"]
    assert torch.allclose(method.proj.weight, w - 0.5 * (grads["proj.weight"] + 1e-2 * w))
    # the cosine schedule scales each group's own initial lr: lr_k = lr_0 * (1 + cos(pi k / 8)) / 2
    scheduler = SCHEDULERS.build({"name": "cosine"}, optimizer=optimizer, steps_per_epoch=4, epochs=2)
    for k in range(1, 5):
        optimizer.step()
        scheduler.step()
        shape = 0.5 * (1 + math.cos(math.pi * k / 8))
        assert groups["temperature"]["lr"] == pytest.approx(0.5 * shape)
        assert groups["projector"]["lr"] == pytest.approx(0.5 * shape)
        assert groups["decay"]["lr"] == pytest.approx(0.05 * shape)


def test_bad_custom_groups_are_one_line_errors():
    from gendd_framework.engine.optim import build_optimizer

    method = WithExtras(linear())
    method.custom_param_groups = lambda: [{"params": [method.t], "momentum_typo": 0.9}]
    with pytest.raises(ConfigError, match="momentum_typo"):
        method.param_groups(0.0)
    method.custom_param_groups = lambda: [{"params": [method.t], "group": "t", "lr_scale": -1}]
    with pytest.raises(ConfigError, match="param group 't': lr_scale must be a number > 0"):
        build_optimizer({"name": "sgd"}, method.param_groups(0.0))
