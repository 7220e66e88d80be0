"""Speed options (engine/speed.py): parsing, channels_last, inference-mode teacher, compile,
fused/foreach optimizers, loader settings, head checkpointing, fp16 scaler resume, end-to-end runs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gendd_framework.components  # noqa: F401  (registrations)
from gendd_framework import config as config_lib
from gendd_framework.cli import config_dir
from gendd_framework.context import StepContext
from gendd_framework.data.base import BatchDataset
from gendd_framework.engine import checkpoint as ckpt
from gendd_framework.engine.loggers import JsonlLogger, LoggerGroup
from gendd_framework.engine.optim import adamw, sgd
from gendd_framework.engine.speed import SpeedConfig, apply_speed, loader_options
from gendd_framework.engine.statistics import TeacherStatistics
from gendd_framework.engine.trainer import Trainer, TrainerConfig
from gendd_framework.errors import ConfigError
from gendd_framework.generative.head import MLPAdaLNHead
from gendd_framework.models import build_model
from gendd_framework.models.ensemble import EnsembleTeacher
from gendd_framework.pipeline import run
from gendd_framework.registry import METHODS, split_spec

METHOD_FILES = sorted(p.stem for p in (config_dir() / "method").glob("*.yaml"))
TINY_GENDD = {"head": {"name": "mlp_adaln", "width": 32, "depth": 1}, "diffusion_batch_mul": 2}


def cnn(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model({"name": "small_cnn", "channels": [4, width]}, num_classes=10)


def kd_method(teacher_width: int = 16, **kwargs) -> nn.Module:
    return METHODS.build(
        {"name": kwargs.pop("name", "kd"), **kwargs},
        student=cnn(8, 0),
        teacher=cnn(teacher_width, 1).eval(),
        num_classes=10,
        input_shape=(1, 8, 8),
        num_samples=40,
    )


def batch(n: int = 20, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    target = torch.arange(n) % 10
    x = torch.randn(n, 1, 8, 8, generator=g)
    view = torch.randn(n, 1, 8, 8, generator=g)  # a second view (mean_teacher's `input_1`)
    return {"input": x, "input_1": view, "target": target, "index": torch.arange(n)}


def grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


# -- config -----------------------------------------------------------------------------------------
def test_speed_config_defaults_and_one_line_errors():
    cfg = SpeedConfig.from_mapping(None)
    assert not cfg.channels_last and not cfg.compile.any and cfg.teacher_mode == "no_grad"
    assert SpeedConfig.from_mapping({"compile": {"head": True, "mode": "max-autotune"}}).compile.head
    cases = [
        ({"channel_last": True}, "did you mean 'channels_last'"),
        ({"compile": {"mode": "fast"}}, "trainer.speed.compile.mode"),
        ({"compile": {"studnet": True}}, "did you mean 'student'"),
        ({"teacher_mode": "eval"}, "inference, no_grad"),
        ({"prefetch_factor": 0}, "prefetch_factor"),
        ({"channels_last": "yes"}, "true or false"),
    ]
    for node, expected in cases:
        with pytest.raises(ConfigError, match=expected):
            SpeedConfig.from_mapping(node)


def test_shipped_trainer_config_parses_and_bad_values_fail_validation(compose):
    cfg = compose()
    assert SpeedConfig.from_mapping(cfg.trainer.speed) == SpeedConfig()
    for override, expected in (
        ("trainer.speed.compile.mode=fast", "trainer.speed.compile.mode"),
        ("trainer.teacher_cache.mode=always", "trainer.teacher_cache.mode"),
        ("trainer.speed.teacher_mode=eval", "trainer.speed.teacher_mode"),
    ):
        with pytest.raises(ConfigError, match=expected):
            config_lib.validate(compose([override]))
    with pytest.raises(ConfigError, match="did you mean 'channels_last'"):
        config_lib.validate(compose(["+trainer.speed.channel_last=true"]))


# -- channels_last ----------------------------------------------------------------------------------
def test_channels_last_converts_weights_and_inputs_and_keeps_the_maths():
    plain, fast = kd_method(), kd_method()
    applied = apply_speed(fast, {"channels_last": True})
    assert "channels_last:student" in applied and "channels_last:teacher" in applied
    conv = fast.student.model.features[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    conv.register_forward_hook(
        lambda m, i, o: seen.append(i[0].is_contiguous(memory_format=torch.channels_last))
    )
    a = plain.training_step(batch(), StepContext())
    b = fast.training_step(batch(), StepContext())
    assert seen and all(seen)
    for key in ("loss", "ce", "kd_kl"):
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key
    a["loss"].backward()
    b["loss"].backward()
    for ga, gb in zip(grads(plain), grads(fast)):
        assert torch.allclose(ga, gb.contiguous(), rtol=1e-4, atol=1e-6)


# -- inference-mode teacher -------------------------------------------------------------------------
def test_inference_mode_teacher_outputs_are_ordinary_tensors():
    method = kd_method(8, name="distill", losses=[{"name": "ce"}, {"name": "feature_mse"}])
    x = batch()["input"]
    assert method.teacher_grad_mode == "no_grad"  # the default; inference mode is opt-in
    method.teacher_grad_mode = "inference"
    out = method.teacher_outputs(x)
    assert all(not v.is_inference() and not v.requires_grad for v in out.values())
    student = method.student(x)
    # a product saves the teacher tensor for backward: an inference tensor would raise here
    (student["logits"] * out["logits"]).sum().backward()
    method.teacher_grad_mode = "no_grad"
    again = method.teacher_outputs(x)
    assert all(torch.equal(out[k], again[k]) for k in out)


def _build(name: str, kwargs: dict):
    torch.manual_seed(1)
    make = lambda w: build_model({"name": "small_cnn", "channels": [8, w]}, num_classes=10)  # noqa: E731
    teacher = EnsembleTeacher([make(64).eval(), make(32).eval()]) if name == "meal_v2" else make(64).eval()
    method = METHODS.build(
        {"name": name, **kwargs},
        student=cnn(8, 0),
        teacher=teacher,
        num_classes=10,
        input_shape=(1, 8, 8),
        num_samples=40,
    )
    return method, teacher


@pytest.mark.parametrize("config_name", METHOD_FILES)
def test_inference_mode_teacher_gives_the_same_step_as_no_grad(compose, tmp_path, config_name):
    """Every method's losses and gradients are identical with the teacher under inference_mode."""
    name, kwargs = split_spec(config_lib.apply_recipe(compose([f"method={config_name}"])).method, "method")
    if name == "gendd":
        kwargs.update(TINY_GENDD)
    data = BatchDataset(TensorDataset(batch(40)["input"], torch.arange(40) % 10))
    results = []
    for mode in ("no_grad", "inference"):
        method, teacher = _build(name, kwargs)
        if method.teacher is None:
            pytest.skip(f"{config_name} has no teacher")
        method.prepare(TeacherStatistics(teacher, data, 10, torch.device("cpu"), tmp_path, {"tiny": 1}))
        apply_speed(method, {"teacher_mode": mode})
        method.train()
        torch.manual_seed(3)  # GenDD, CRD, ... draw noise / negatives
        out = method.training_step(batch(), StepContext(step=1, steps_per_epoch=2, total_steps=4))
        out["loss"].backward()
        results.append(({k: v.detach() for k, v in out.items()}, grads(method)))
    (la, ga), (lb, gb) = results
    assert la.keys() == lb.keys()
    for key in la:
        assert torch.equal(la[key], lb[key]), key
    assert len(ga) == len(gb) and all(torch.equal(a, b) for a, b in zip(ga, gb))


# -- optimizers, loaders, head checkpointing --------------------------------------------------------
@pytest.mark.parametrize("make", [sgd, adamw])
def test_fused_and_foreach_updates_match_the_loop(make):
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(3)]
    finals = []
    for kernel in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        params = [nn.Parameter(t.clone()) for t in start]
        opt = make([{"params": params, "weight_decay": 1e-3}], lr=0.1, **kernel)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.sin(p.detach() * (step + 1 + i))
            opt.step()
        finals.append(params)
    for other in finals[1:]:
        for a, b in zip(finals[0], other):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="cannot both be true"):
        make([nn.Parameter(torch.zeros(1))], fused=True, foreach=True)


def test_loader_options_keep_train_workers_fresh_unless_asked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loader_options(2, None, train=True, device=cpu)["persistent_workers"] is False
    assert loader_options(2, None, train=False, device=cpu)["persistent_workers"] is True
    assert loader_options(0, None, train=False, device=cpu)["persistent_workers"] is False
    opts = loader_options(
        2, None, train=True, device=cuda, speed={"persistent_workers": True, "prefetch_factor": 4}
    )
    assert opts == {"num_workers": 2, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 4}
    assert (
        loader_options(0, False, train=True, device=cuda, speed={"prefetch_factor": 4})["pin_memory"] is False
    )
    assert "prefetch_factor" not in loader_options(
        0, None, train=True, device=cpu, speed={"prefetch_factor": 4}
    )


def test_head_checkpointing_gradients_equal_the_plain_ones_in_float64():
    torch.manual_seed(0)
    a = MLPAdaLNHead(token_dim=4, cond_dim=6, num_positions=2, width=16, depth=2).double()
    for p in a.parameters():  # non-zero adaLN/output weights, so every block carries gradient
        nn.init.normal_(p, std=0.3)
    b = MLPAdaLNHead(token_dim=4, cond_dim=6, num_positions=2, width=16, depth=2).double()
    b.load_state_dict(a.state_dict())
    method = type("M", (nn.Module,), {})()
    method.head = b
    assert (
        apply_speed(method, {"head_checkpointing": True}) == ["head_checkpointing"] and b.grad_checkpointing
    )
    x = torch.randn(3, 5, 2, 4, dtype=torch.float64)
    t = torch.randint(0, 1000, (3, 5, 2))
    z = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    outs = []
    for head in (a, b):
        z.grad = None
        head(x, t, z).pow(2).sum().backward()
        outs.append([*grads(head), z.grad.clone()])
    assert len(outs[0]) == len(outs[1])
    for ga, gb in zip(*outs):
        assert torch.allclose(ga, gb, rtol=1e-12, atol=1e-12)


def test_head_keeps_a_float32_interface_under_bf16_autocast():
    """Input projection, residual stream and output projection stay float32 under autocast, the
    blocks' matrix products run in bf16, and the result stays close to the float32 head's."""
    torch.manual_seed(0)
    head = MLPAdaLNHead(token_dim=4, cond_dim=6, num_positions=2, width=32, depth=2)
    for p in head.parameters():
        nn.init.normal_(p, std=0.2)
    seen = {}
    head.input_proj.register_forward_hook(lambda m, i, o: seen.update(proj=o.dtype))
    head.blocks[0].mlp[0].register_forward_hook(lambda m, i, o: seen.update(block=o.dtype))
    x, t, z = torch.randn(3, 5, 2, 4), torch.randint(0, 1000, (3, 5, 2)), torch.randn(5, 6)
    reference = head(x, t, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x, t, z)
    assert out.dtype == torch.float32 and seen == {"proj": torch.float32, "block": torch.bfloat16}
    assert torch.allclose(out, reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


# -- fp16 grad scaler: exact resume -----------------------------------------------------------------
class ConvCE(nn.Module):
    primary_output = "student"

    def __init__(self) -> None:
        super().__init__()
        self.net = cnn(8, 0)

    def training_step(self, batch, ctx):
        ce = F.cross_entropy(self.net(batch["input"]).float(), batch["target"])
        return {"loss": ce, "ce": ce.detach()}

    def predict(self, x):
        return {"student": self.net(x).float()}

    def on_evaluate_start(self) -> None:
        pass


def fp16_trainer(run_dir, epochs: int, resume: bool = False) -> Trainer:
    method = ConvCE()
    data = BatchDataset(TensorDataset(batch(40)["input"], torch.arange(40) % 10))
    gen = torch.Generator()
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=gen)
    opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    logger = LoggerGroup([JsonlLogger(str(run_dir))])
    logger.jsonl_path = logger.loggers[0].path
    cfg = TrainerConfig(epochs=epochs, precision="fp16", progress=False, resume=resume)
    loop = Trainer(
        method,
        opt,
        sched,
        loader,
        None,
        config=cfg,
        device=torch.device("cpu"),
        ckpt_dir=run_dir / "ckpt",
        stage="distill",
        logger=logger,
        shuffle_generator=gen,
    )
    loop.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    return loop


INIT_SCALE = 2.0**19  # this model's scaled fp16 gradients overflow twice: two skipped steps, then ×1/4


def test_fp16_grad_scaler_state_makes_resume_exact(tmp_path):
    full = fp16_trainer(tmp_path / "full", epochs=2)
    start = [p.detach().clone() for p in full.method.parameters()]
    full.fit()
    assert any(not torch.equal(a, b) for a, b in zip(start, full.method.parameters()))
    cut = fp16_trainer(tmp_path / "cut", epochs=1)
    cut.fit()
    saved = ckpt.load(tmp_path / "cut" / "ckpt" / "distill_last.pt")
    assert saved["scaler"]["scale"] < INIT_SCALE  # epoch 1 backed the scale off: the state matters
    resumed = fp16_trainer(tmp_path / "cut", epochs=2, resume=True)
    resumed.fit()
    for a, b in zip(full.method.parameters(), resumed.method.parameters()):
        assert torch.equal(a, b)
    assert resumed.scaler.state_dict() == full.scaler.state_dict()
    # control: the same resume with the scaler state reset to its initial value does not match
    saved["scaler"] = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE).state_dict()
    ckpt.atomic_save(saved, tmp_path / "cut" / "ckpt" / "distill_last.pt")
    reset = fp16_trainer(tmp_path / "cut", epochs=2, resume=True)
    reset.fit()
    assert any(not torch.equal(a, b) for a, b in zip(full.method.parameters(), reset.method.parameters()))


# -- end to end -------------------------------------------------------------------------------------
def test_bf16_channels_last_run_end_to_end(compose, tmp_path):
    """bf16 autocast + channels_last + foreach AdamW against the same run in plain fp32: within bf16's
    precision (2^-8 relative per rounding; a 2% bound after an epoch of training), and off by more
    than fp32 reorderings (< 1e-6 here: channels_last and foreach alone keep the maths), so bf16 ran."""
    base = ["experiment=digits/transfer_cnn", "method=kd", "trainer.epochs=1", "data.train_fraction=0.3"]
    fast = ["trainer.precision=bf16", "trainer.speed.channels_last=true", "optim.foreach=true"]
    runs = {}
    for name, extra in (("fp32", []), ("bf16", fast)):
        summary = run(compose([*base, *extra]), tmp_path / name)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        (train,) = [r for r in rows if r["stage"] == "distill" and "train/loss" in r]
        runs[name] = {**train, **summary["distill"]["test"]}
    keys = ("train/loss", "train/ce", "train/kd_kl", "ce/student", "kl/student")
    relative = {key: abs(runs["bf16"][key] / runs["fp32"][key] - 1) for key in keys}
    assert max(relative.values()) < 0.02, relative
    assert max(relative.values()) > 1e-4, relative


# -- compile ------------------------------------------------------------------------------------------
def test_compiled_student_teacher_and_head_match_eager():
    """`trainer.speed.compile` on all three parts of GenDD, traced by dynamo and AOT autograd (the
    `aot_eager` backend skips only code generation): the same loss and gradients as eager, graphs
    compiled for each part, and interchangeable checkpoints."""

    def gendd():
        return METHODS.build(
            {"name": "gendd", **TINY_GENDD}, student=cnn(8, 0), teacher=cnn(64, 1).eval(), num_classes=10
        )

    eager, compiled = gendd(), gendd()
    options = {"student": True, "teacher": True, "head": True, "backend": "aot_eager"}
    torch._dynamo.utils.counters.clear()
    applied = apply_speed(compiled, {"compile": options})
    assert {"compile:student(default)", "compile:teacher(default)", "compile:head(default)"} <= set(applied)
    assert list(eager.state_dict()) == list(compiled.state_dict())  # checkpoints interchangeable
    for method in (eager, compiled):
        method.train()
        torch.manual_seed(5)
        out = method.training_step(batch(), StepContext())
        out["loss"].backward()
        method.result = (out, grads(method))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3  # the three parts ran compiled
    (la, ga), (lb, gb) = eager.result, compiled.result
    for key in ("loss", "diffusion", "ce"):
        torch.testing.assert_close(la[key], lb[key], msg=key)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b)


def test_inductor_compiles_a_student_forward():
    """One small case through the default backend (inductor: C++ kernels built on the CPU)."""
    eager, compiled = kd_method().eval(), kd_method().eval()
    assert "compile:student(default)" in apply_speed(compiled, {"compile": {"student": True}})
    x = batch()["input"]
    with torch.no_grad():
        torch.testing.assert_close(compiled.student.model(x), eager.student.model(x))
