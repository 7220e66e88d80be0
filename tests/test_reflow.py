"""The reflow stage: pairs come from the trained flow head's own ODE, only the head retrains, and its
checkpoint evaluates like any GenDD checkpoint; asking for reflow without a flow objective fails early."""

from __future__ import annotations

import pytest
import torch

from gendd_framework.engine.checkpoint import load as load_checkpoint
from gendd_framework.errors import ConfigError
from gendd_framework.pipeline import run

TINY = [
    "experiment=digits/gendd",
    "method/objective=flow",
    "method/sampler=euler",
    "method.sampler.steps=2",
    "method.head.width=32",
    "method.head.depth=1",
    "method.diffusion_batch_mul=2",
    "trainer.epochs=1",
    "data.train_fraction=0.3",
    "stages=[teacher,distill,{name:reflow,epochs:2,generate:{name:euler,steps:3}}]",
]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_reflow_retrains_only_the_head_and_evaluates_with_one_step(compose, tmp_path):
    summary = run(compose(TINY), tmp_path)
    record = summary["reflow"]
    assert record["eval_settings"]["steps"] == 1 and "acc/generative" in record["test"]
    assert record["pairs"]["images"] > 0
    before = load_checkpoint(tmp_path / "checkpoints" / "distill_best.pt")["method"]
    after = load_checkpoint(tmp_path / "checkpoints" / "reflow_last.pt")["method"]
    assert set(before) == set(after)  # GenDD's own state-dict layout
    student = [k for k in before if k.startswith(("student.", "norm."))]
    head = [k for k in before if k.startswith("head.") and before[k].is_floating_point()]
    assert student and all(torch.equal(before[k], after[k]) for k in student)
    assert any(not torch.equal(before[k], after[k]) for k in head)
    from gendd_framework.cli.evaluate import RunEvaluator

    again = RunEvaluator(tmp_path, stage="reflow", device="cpu").evaluate(
        {"sampler": {"name": "euler", "steps": 1}}
    )
    assert again["acc/generative"] == pytest.approx(record["test"]["acc/generative"], abs=1e-9)


def test_reflow_pairs_are_the_heads_own_ode_images(compose, tmp_path):
    from gendd_framework.registry import SAMPLERS
    from gendd_framework.stages.reflow import reflow_pairs

    run(compose(TINY[:-1]), tmp_path)  # no reflow: the trained method is rebuilt below
    from types import SimpleNamespace

    from gendd_framework.cli.evaluate import RunEvaluator

    evaluator = RunEvaluator(tmp_path, device="cpu")
    gendd = evaluator.build_method()
    ctx = SimpleNamespace(data=evaluator.data, device=torch.device("cpu"), loader_cfg={"eval_batch_size": 64})
    sampler = SAMPLERS.build({"name": "euler", "steps": 3})
    pairs = reflow_pairs(gendd, ctx, sampler, 2.0, seed=0)
    again = reflow_pairs(gendd, ctx, sampler, 2.0, seed=0)
    assert all(torch.equal(pairs[k], again[k]) for k in pairs)  # deterministic given the seed
    i = 5
    z, noise = pairs["cond"][i : i + 1], pairs["noise"][i : i + 1][None]
    model_fn, generator = gendd.head.make_model_fn(z), torch.Generator().manual_seed(1)
    tokens = sampler.sample(
        gendd.objective,
        model_fn,
        noise.shape,
        guidance_scale=2.0,
        generator=generator,
        device="cpu",
        noise=noise,
    )
    assert torch.allclose(tokens[0, 0], pairs["x0"][i], atol=1e-5)


def test_reflow_without_a_flow_objective_fails_before_training(compose, tmp_path):
    overrides = ["experiment=digits/gendd", "stages=[teacher,distill,reflow]", "trainer.epochs=1"]
    with pytest.raises(ConfigError, match="flow"):
        run(compose(overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
