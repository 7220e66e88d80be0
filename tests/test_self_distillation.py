"""The self-distillation family as methods: mean teacher (EMA update, views, buffers, export), DML (peers,
seeding, outputs), CTKD (the temperature optimised, fp32, curriculum per epoch) and SimKD (predictor,
export and `teacher=from_run`), then every one of them resumed after a kill equals the uninterrupted run
bit for bit (EMA weights, temperature, every peer)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import gendd_framework.components  # noqa: F401  (registrations)
from gendd_framework.context import StepContext
from gendd_framework.engine.trainer import Trainer
from gendd_framework.errors import ConfigError
from gendd_framework.losses.ctkd import cosine_lambda
from gendd_framework.losses.mean_teacher import softmax_mse
from gendd_framework.models import build_model
from gendd_framework.pipeline import run
from gendd_framework.registry import METHODS

TINY = ["trainer.epochs=2", "data.train_fraction=0.3"]


def cnn(channels=(4, 8), seed=0):
    torch.manual_seed(seed)
    return build_model({"name": "small_cnn", "channels": list(channels)}, num_classes=10)


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params]).double()


def two_view_batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    x, x1 = torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)
    target = torch.arange(n) % 10
    return {"input": x, "input_1": x1, "target": target, "all_labelled": True}


def train_rows(run_dir, stage="distill") -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage and "train/loss" in r]


# -- mean teacher -------------------------------------------------------------------------------------
@pytest.mark.parametrize("buffers", ["own", "ema"])
def test_mean_teacher_step_and_ema_update_follow_the_formulas(buffers):
    method = METHODS.build({"name": "mean_teacher", "buffers": buffers}, student=cnn(), num_classes=10)
    assert method.needs_teacher is False and method.teacher_is_frozen is False
    assert method.batch_keys == ("input", "input_1", "target")
    optimizer = torch.optim.SGD(method.param_groups(0.0)[0]["params"], lr=0.5)
    assert {id(p) for p in method.teacher.parameters()}.isdisjoint(
        {id(p) for g in method.param_groups(0.0) for p in g["params"]}
    )  # the EMA is never optimised
    ema_bn, student_bn = method.teacher.model.features[1], method.student.model.features[1]
    for step in range(2):
        batch = two_view_batch(step)
        method.train()
        assert method.teacher.training == (buffers == "own")  # upstream: the EMA runs in train mode
        with torch.no_grad():  # the independent computation: student on `input`, EMA on `input_1`
            want = softmax_mse(method.student.model(batch["input"]), method.teacher.model(batch["input_1"]))
        ema_before, ema_stats = flat(method.teacher.parameters()), ema_bn.running_mean.clone().double()
        out = method.training_step(batch, StepContext(step=step, steps_per_epoch=2, total_steps=2))
        assert out["consistency"].item() == pytest.approx(want.item(), rel=1e-5)
        if buffers == "own":  # its own forward pass (train mode) moved the EMA's BN statistics
            ema_stats = ema_bn.running_mean.clone().double()
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        method.after_optimizer_step(StepContext(step=step, steps_per_epoch=2, total_steps=2))
        decay = [0.5, 2 / 3][step]  # min(1 - 1/(n+1), 0.99) after n = 1, 2 updates
        expected = decay * ema_before + (1 - decay) * flat(method.student.parameters())
        assert torch.allclose(flat(method.teacher.parameters()), expected, atol=1e-6)
        if buffers == "ema":
            mixed = decay * ema_stats + (1 - decay) * student_bn.running_mean.double()
            assert torch.allclose(ema_bn.running_mean.double(), mixed, atol=1e-6)
        else:
            assert torch.equal(ema_bn.running_mean.double(), ema_stats)  # not averaged
    assert not torch.allclose(flat(method.teacher.parameters()), flat(method.student.parameters()))
    method.eval()
    out = method.predict(two_view_batch(5)["input"])
    assert set(out) == {"ema", "student"} and method.primary_output == "ema"
    assert method.export() is method.teacher.model


def test_mean_teacher_options_are_checked_and_dino_keeps_a_centre():
    with pytest.raises(ConfigError, match="consistency must be one of"):
        METHODS.build({"name": "mean_teacher", "consistency": "l2"}, student=cnn())
    with pytest.raises(ConfigError, match=r"ema_decay must be in \[0, 1\)"):
        METHODS.build({"name": "mean_teacher", "ema_decay": 1.0}, student=cnn())
    method = METHODS.build({"name": "mean_teacher", "consistency": "dino"}, student=cnn(), num_classes=10)
    batch = two_view_batch(1)
    method.train()
    with torch.no_grad():
        teacher = method.teacher.model(batch["input_1"])
    method.training_step(batch, StepContext())
    assert torch.allclose(method.center, 0.1 * teacher.mean(0), atol=1e-6) and "center" in method.state_dict()


def test_mean_teacher_runs_without_a_teacher_and_exports_the_ema(compose, tmp_path):
    from gendd_framework.cli.evaluate import run_eval

    summary = run(compose(["method=mean_teacher", "stages=[distill]", *TINY]), tmp_path)
    test = summary["distill"]["test"]
    assert summary["distill"]["select"] == "acc/ema" and "teacher" not in summary
    assert not any(k.startswith("agree/") for k in test)  # no teacher: nothing to agree with
    assert summary["export"]["predictor"] == "method"
    best = torch.load(tmp_path / "checkpoints" / "distill_best.pt", weights_only=True)["method"]
    exported = torch.load(tmp_path / "student.pt", weights_only=True)
    assert all(torch.equal(v, best[f"teacher.model.{k}"]) for k, v in exported.items())  # the EMA
    assert run_eval([f"run_dir={tmp_path}", "export=true", "device=cpu"])["acc/export"] == test["acc/ema"]
    # re-evaluated, the EMA model is not its own reference: no agreement with itself (was 100%)
    again = run_eval([f"run_dir={tmp_path}", "device=cpu"])
    assert again["acc/ema"] == test["acc/ema"] and not any(k.startswith("agree/") for k in again)


def test_a_teacher_stage_is_only_the_evaluation_reference_of_a_teacher_free_method(compose, tmp_path):
    summary = run(compose(["method=dml", *TINY]), tmp_path)
    test = summary["distill"]["test"]
    assert {"agree/student", "agree/peer_2", "acc/peer_mean"} <= set(test)  # compared with the teacher
    state = torch.load(tmp_path / "checkpoints" / "distill_last.pt", weights_only=True)["method"]
    assert not any(k.startswith("teacher.") for k in state)  # ... never trained against or saved


# -- DML ----------------------------------------------------------------------------------------------------
def test_dml_peers_have_their_own_seeded_initialisation():
    spec = {"name": "small_cnn", "channels": [4, 8]}

    def build(seed):
        torch.manual_seed(seed)
        method = METHODS.build(
            {"name": "dml", "peer": spec, "num_peers": 3},
            student=cnn(seed=seed),
            num_classes=10,
            input_shape=(1, 8, 8),
        )
        return method, torch.rand(1)  # the global stream after the build

    (a, draw_a), (b, _), (c, _) = build(0), build(0), build(1)
    weights = lambda m: [flat(p.parameters()) for p in (m.student, *m.peers)]  # noqa: E731
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(x, y) for x, y in zip(wa, wb))  # the same seed builds the same peers
    assert not any(torch.equal(x, y) for i, x in enumerate(wa) for y in wa[i + 1 :])  # all different
    assert not torch.equal(wa[1], wc[1])  # another run seed, other peers
    torch.manual_seed(0)
    cnn(seed=0)
    assert torch.equal(draw_a, torch.rand(1))  # building the peers drew nothing from the global stream
    a.eval()
    out = a.predict(torch.randn(4, 1, 8, 8))
    assert list(out) == ["student", "peer_2", "peer_3", "peer_mean"] == list(a.output_names())
    mean = torch.stack([out[k].softmax(1) for k in ("student", "peer_2", "peer_3")]).mean(0)
    assert torch.allclose(out["peer_mean"].softmax(1), mean, atol=1e-6)


def test_dml_refuses_peers_that_start_as_the_student(tmp_path):
    student = cnn()
    torch.save(student.state_dict(), tmp_path / "w.pt")
    spec = {"name": "small_cnn", "channels": [4, 8], "checkpoint": str(tmp_path / "w.pt")}
    with pytest.raises(ConfigError, match="peer 2 starts with the student's weights"):
        METHODS.build({"name": "dml", "peer": spec}, student=student, num_classes=10)
    with pytest.raises(ConfigError, match="dml needs `method.peer`"):
        METHODS.build({"name": "dml", "peer": None}, student=student)


# -- CTKD ---------------------------------------------------------------------------------------------------
def test_ctkd_optimises_its_temperature_in_its_own_group_in_fp32():
    method = METHODS.build({"name": "ctkd"}, student=cnn(), teacher=cnn((8, 16), seed=1))
    groups = method.param_groups(5e-4)
    (group,) = [g for g in groups if g.get("group") == "temperature"]
    assert group["params"] == [method.raw_temperature] and group["weight_decay"] == 5e-4  # as upstream
    assert method.temperature().item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)  # 15.62
    optimizer = torch.optim.SGD(groups, lr=0.1)
    batch = two_view_batch(2)
    method.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(batch, StepContext(epoch=4))  # epoch 5 of the curriculum: λ = -0.5
    assert out["temperature"].dtype == torch.float32 and out["kd"].dtype == torch.float32
    assert out["grl_lambda"].item() == pytest.approx(-0.5)
    raw = method.raw_temperature.detach().clone()
    out["loss"].backward()
    optimizer.step()
    assert not torch.equal(method.raw_temperature.detach(), raw)  # the direct parameter is optimised
    custom = METHODS.build({"name": "ctkd", "temperature_weight_decay": 0.0}, student=cnn(), teacher=cnn())
    assert [g["weight_decay"] for g in custom.param_groups(5e-4) if g.get("group") == "temperature"] == [0.0]


def test_ctkd_logs_the_temperature_and_the_curriculum_per_epoch(compose, tmp_path):
    run(compose(["method=ctkd", "trainer.epochs=3", "data.train_fraction=0.3"]), tmp_path)
    rows = train_rows(tmp_path)
    assert [r["train/grl_lambda"] for r in rows] == pytest.approx([cosine_lambda(e, 2.5) for e in (1, 2, 3)])
    temps = [r["train/temperature"] for r in rows]
    assert all(1.0 < t < 21.0 for t in temps) and len(set(temps)) == 3


# -- SimKD --------------------------------------------------------------------------------------------------
def test_simkd_predicts_through_a_copy_of_the_teachers_classifier():
    teacher = cnn((8, 16), seed=1)
    method = METHODS.build({"name": "simkd"}, student=cnn(), teacher=teacher, input_shape=(1, 8, 8))
    assert not any(p.requires_grad for p in method.student.model.fc.parameters())  # unused, frozen
    head = method.teacher_classifier
    assert torch.equal(head.weight, teacher.fc.weight) and head.weight is not teacher.fc.weight
    x = torch.randn(3, 1, 8, 8)
    method.eval()
    with torch.no_grad():
        fmap = method.student.model.features[:-2](x)  # the last stage map, before global pooling
        want = teacher.fc(method.projector(fmap).mean((2, 3)))
        assert torch.allclose(method.predict(x)["student"], want, atol=1e-6)
        assert torch.allclose(method.export()(x), want, atol=1e-6)
    keys = set(method.export().state_dict())
    assert {"classifier.weight", "classifier.bias"} <= keys and any(k.startswith("projector.") for k in keys)
    with pytest.raises(ConfigError, match="needs a teacher"):
        METHODS.build({"name": "simkd"}, student=cnn(), input_shape=(1, 8, 8))
    mlp = build_model({"name": "mlp", "in_features": 64, "hidden": [8]}, num_classes=10)
    with pytest.raises(ConfigError, match="student_layers"):
        METHODS.build({"name": "simkd"}, student=mlp, teacher=teacher, input_shape=(1, 8, 8))


def test_simkd_teacher_from_run_has_the_runs_accuracy(compose, tmp_path):
    first = run(compose(["method=simkd", "student=digits_cnn", *TINY]), tmp_path / "a")
    accuracy = first["distill"]["test"]["acc/student"]
    from_run = ["teacher=from_run", f"teacher.run_dir={tmp_path / 'a'}", "trainer.progress=false"]
    second = run(compose(["method=kd", *TINY, *from_run], fast=()), tmp_path / "b")
    assert second["teacher"]["test"]["acc/teacher"] == accuracy
    assert first["export"]["module"] == "ReusedClassifierPredictor"


def test_every_per_recipe_key_of_the_family_names_a_recipe():
    from omegaconf import OmegaConf

    from gendd_framework.cli import config_dir

    recipes = {OmegaConf.load(p).get("recipe") for p in (config_dir() / "experiment").rglob("*.yaml")}
    for name in ("mean_teacher", "dml", "ctkd", "simkd"):
        table = OmegaConf.load(config_dir() / "method" / f"{name}.yaml").per_recipe
        assert "digits" in table and set(table) - {"digits"} <= recipes, name


# -- exact resume after a kill ----------------------------------------------------------------------------
RESUMABLE = {
    "mean_teacher": (["method=mean_teacher", "stages=[distill]"], "teacher.model."),
    "dml": (["method=dml", "stages=[distill]"], "peers.0."),
    "ctkd": (["method=ctkd"], "raw_temperature"),
    "simkd": (["method=simkd", "student=digits_cnn"], "projector."),
}


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_resume_after_a_kill_equals_the_uninterrupted_run(compose, tmp_path, monkeypatch, name):
    overrides, own_state = RESUMABLE[name]
    overrides = [*overrides, "trainer.epochs=3", "data.train_fraction=0.3"]
    full = run(compose(overrides), tmp_path / "full")
    original = Trainer.train_one_epoch

    def killed_in_epoch_2(self, total_steps):
        if self.stage == "distill" and self.epoch == 1:
            raise KeyboardInterrupt
        return original(self, total_steps)

    monkeypatch.setattr(Trainer, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(compose(overrides), tmp_path / "cut")
    monkeypatch.setattr(Trainer, "train_one_epoch", original)
    resumed = run(compose([*overrides, "trainer.resume=true"]), tmp_path / "cut")
    a, b = (torch.load(tmp_path / d / "checkpoints" / "distill_last.pt", weights_only=True)["method"]
            for d in ("full", "cut"))  # fmt: skip
    assert any(k.startswith(own_state) for k in a)  # EMA weights / a peer / the temperature / projector
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, y = (torch.load(tmp_path / d / "student.pt", weights_only=True) for d in ("full", "cut"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert resumed["distill"]["test"] == full["distill"]["test"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]  # noqa: E731
    assert strip(train_rows(tmp_path / "cut")) == strip(train_rows(tmp_path / "full"))
