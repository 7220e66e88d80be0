import math

import pytest
import torch

from gendd_framework.engine import optim  # noqa: F401
from gendd_framework.registry import OPTIMIZERS, SCHEDULERS


def lrs(name, steps, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = OPTIMIZERS.build({"name": "sgd", "lr": 1.0, "weight_decay": 0.0}, params=[p])
    sched = SCHEDULERS.build({"name": name, **kw}, optimizer=opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_matches_formula():
    got = lrs("cosine", 20, steps_per_epoch=2, epochs=10, warmup_epochs=1, min_lr_ratio=0.1)
    assert got[0] == pytest.approx(0.5) and got[1] == pytest.approx(1.0)
    for s in range(2, 20):
        progress = (s - 2) / 18
        assert got[s] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def test_multistep_decays_at_milestones_per_iteration():
    got = lrs("multistep", 12, steps_per_epoch=2, epochs=6, milestones=[2, 4], gamma=0.1)
    assert got[:4] == [1.0] * 4
    assert got[4:8] == pytest.approx([0.1] * 4)
    assert got[8:] == pytest.approx([0.01] * 4)


def test_adamw_param_groups_keep_their_weight_decay():
    from gendd_framework.methods.base import split_decay

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.LayerNorm(4))
    decay, no_decay = split_decay([net])
    assert [tuple(p.shape) for p in decay] == [(4, 3)]
    assert len(no_decay) == 5  # linear bias, BN weight+bias, LN weight+bias
    opt = OPTIMIZERS.build(
        {"name": "adamw", "weight_decay": 0.05},
        params=[{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
    )
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_constant_schedule_warms_up_linearly_then_holds():
    got = lrs("constant", 8, steps_per_epoch=2, epochs=4, warmup_epochs=2)
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_beta2_ramp_is_applied_only_through_the_optimizer_hook():
    p = torch.nn.Parameter(torch.zeros(1))
    plain = OPTIMIZERS.build({"name": "adamw", "betas": [0.9, 0.99]}, params=[p])
    assert not hasattr(plain, "before_step")
