"""The method contract: mapping batches, step context and weight schedules, per-side taps with module
inputs/outputs, the build-time shape probe, role-based weight decay, teacher ensembles and the prepare
hook's cache. Each test would fail with a wrong implementation of the piece it names."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import gendd_framework.components  # noqa: F401  (registrations)
from gendd_framework.context import UNLABELLED, StepContext, distill_targets
from gendd_framework.data.base import BatchDataset
from gendd_framework.engine.statistics import TeacherStatistics
from gendd_framework.errors import ConfigError
from gendd_framework.methods.base import Method, split_decay
from gendd_framework.methods.terms import labelled_cross_entropy
from gendd_framework.models import FeatureTap, build_model
from gendd_framework.models.ensemble import EnsembleTeacher
from gendd_framework.registry import METHODS, WEIGHT_SCHEDULES


def cnn(channels=(4, 8), seed=0):
    torch.manual_seed(seed)
    return build_model({"name": "small_cnn", "channels": list(channels)}, num_classes=10)


# -- batches ---------------------------------------------------------------------------------------
def test_pair_datasets_become_mappings_with_position_index_and_hidden_labels():
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 4])
    mask = torch.tensor([True, False, True, False, True])
    data = BatchDataset(TensorDataset(x, y), mask)
    sample = data[3]
    assert set(sample) == {"input", "target", "index"}
    assert sample["index"] == 3 and torch.equal(sample["input"], x[3])
    assert sample["target"] == UNLABELLED and data[2]["target"] == 2
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=5)))
    assert batch["index"].tolist() == [0, 1, 2, 3, 4]
    assert batch["target"].tolist() == [0, -1, 2, -1, 4]


def test_mapping_samples_keep_extra_fields_and_bad_samples_fail_clearly():
    class Extra(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"input": torch.zeros(2), "target": i, "weight": 0.5}

    sample = BatchDataset(Extra())[1]
    assert torch.equal(sample.pop("input"), torch.zeros(2))
    assert sample == {"target": 1, "weight": 0.5, "index": 1}
    with pytest.raises(ConfigError, match="'input'/'target'"):
        BatchDataset([torch.zeros(2)])[0]


def test_unlabelled_targets_come_from_the_teacher_and_ce_ignores_them():
    target = torch.tensor([2, UNLABELLED, 0])
    teacher = torch.tensor([[0.0, 0, 5], [0, 7, 0], [9, 0, 0]])
    assert distill_targets(target, teacher).tolist() == [2, 1, 0]
    logits = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    expected = -(logits[0].log_softmax(0)[2] + logits[2].log_softmax(0)[0]) / 2
    assert labelled_cross_entropy(logits, target).item() == pytest.approx(expected.item(), rel=1e-12)
    none = labelled_cross_entropy(logits, torch.full((3,), UNLABELLED))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(logits.grad).all()


# -- step context and schedules ----------------------------------------------------------------------
def test_warmup_and_cosine_decay_factors_match_hand_values():
    ctx = StepContext(step=25, epoch=2, steps_per_epoch=10, total_steps=100, epochs=10)
    assert ctx.epoch_progress == 2.5 and ctx.progress == 0.25
    assert WEIGHT_SCHEDULES.build({"name": "linear_warmup", "epochs": 4})(ctx) == 3 / 4  # 1-indexed epoch
    assert WEIGHT_SCHEDULES.build({"name": "linear_warmup", "epochs": 5, "granularity": "step"})(ctx) == 0.5
    assert WEIGHT_SCHEDULES.build({"name": "linear_warmup", "epochs": 2})(ctx) == 1.0
    decay = WEIGHT_SCHEDULES.build({"name": "cosine_decay", "start_epoch": 2})
    assert decay(ctx) == pytest.approx(0.5 * (1 + math.cos(math.pi * 1 / 8)))
    assert decay(StepContext(epoch=1, epochs=10)) == 1.0
    assert decay(StepContext(epoch=9, epochs=10)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="granularity"):
        WEIGHT_SCHEDULES.build({"name": "linear_warmup", "granularity": "batch"})


def test_scheduled_term_weight_follows_the_step_context():
    method = METHODS.build(
        {"name": "dkd", "warmup_epochs": 4},
        student=cnn((4, 8)),
        teacher=cnn((8, 16), seed=1),
        num_classes=10,
    )
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    for epoch, factor in ((0, 0.25), (1, 0.5), (7, 1.0)):
        out = method.training_step({"input": x, "target": y}, StepContext(epoch=epoch, epochs=8))
        assert out["weight/dkd"].item() == pytest.approx(factor)
        assert out["loss"].item() == pytest.approx(out["ce"].item() + factor * out["dkd"].item(), rel=1e-5)
        tckd, nckd = out["dkd/tckd"], out["dkd/nckd"]
        assert out["dkd"].item() == pytest.approx((1.0 * tckd + 8.0 * nckd).item(), rel=1e-5)


# -- taps and probe --------------------------------------------------------------------------------
def test_taps_read_module_inputs_and_outputs():
    model = cnn()
    tap = FeatureTap(model, ["features.3", "features.3:input", "fc:input", "feature", "logits"])
    x = torch.randn(2, 1, 8, 8)
    out = tap(x)
    pooled = model.features(x)
    assert torch.equal(out["feature"], pooled) and torch.equal(out["fc:input"], pooled)
    assert out["features.3"].shape == (2, 4, 4, 4) and out["features.3:input"].shape == (2, 4, 8, 8)
    assert torch.equal(out["logits"], model(x))


def test_unknown_tap_path_fails_with_close_matches():
    with pytest.raises(ConfigError, match=r"'featurs\.3' not found.*Did you mean: features\.3"):
        FeatureTap(cnn(), ["featurs.3"])
    with pytest.raises(ConfigError, match="'input' or 'output'"):
        FeatureTap(cnn(), ["fc:inputs"])


class HintProjector(Method):
    """A probe-sized 1x1 conv projector from a student stage to a teacher stage (what plugins write)."""

    def __init__(self, student, teacher, input_shape):
        super().__init__(
            student,
            teacher,
            student_taps=["features.3"],
            teacher_taps=["features.7"],
            input_shape=input_shape,
        )
        s, t = self.tap_shapes()["student"]["features.3"], self.tap_shapes()["teacher"]["features.7"]
        self.proj = nn.Sequential(nn.Conv2d(s[0], t[0], 1, bias=False), nn.BatchNorm2d(t[0]))
        self.pool = nn.AdaptiveAvgPool2d(t[1:])


def test_probe_gives_per_side_shapes_and_leaves_bn_statistics_alone():
    student, teacher = cnn((4, 8)), cnn((8, 16, 32), seed=1)
    before = student.features[1].running_mean.clone()
    method = HintProjector(student, teacher, input_shape=(1, 8, 8))
    shapes = method.tap_shapes()
    assert shapes["student"] == {"features.3": (4, 4, 4)}
    assert shapes["teacher"] == {"features.7": (16, 2, 2)}
    assert method.proj[0].weight.shape == (16, 4, 1, 1)
    assert torch.equal(student.features[1].running_mean, before) and student.training
    decay, no_decay = split_decay(method.trainable_modules())
    assert any(p is method.proj[0].weight for p in decay)
    assert any(p is method.proj[1].weight for p in no_decay)
    assert not any(p is q for p in decay + no_decay for q in teacher.parameters())


def test_probe_without_input_shape_is_a_clear_error():
    with pytest.raises(ConfigError, match="input_shape"):
        HintProjector(cnn(), cnn(), input_shape=None)


# -- teachers --------------------------------------------------------------------------------------
def test_ensemble_combines_probabilities_or_logits():
    members = [cnn(seed=s).eval() for s in (0, 1, 2)]
    x = torch.randn(3, 1, 8, 8)
    logits = torch.stack([m(x) for m in members]).double()
    probs = EnsembleTeacher(members, "probs")(x)
    assert torch.allclose(probs.double().softmax(1), logits.softmax(2).mean(0), atol=1e-6)
    assert torch.allclose(EnsembleTeacher(members, "logits")(x).double(), logits.mean(0), atol=1e-6)
    tap = FeatureTap(EnsembleTeacher(members), ["logits", "members.1.fc:input"])
    assert tap(x)["members.1.fc:input"].shape == (3, 8)
    with pytest.raises(ConfigError, match="no single classifier"):
        FeatureTap(EnsembleTeacher(members), ["feature"])
    with pytest.raises(ConfigError, match="combine"):
        EnsembleTeacher(members, "mean")


# -- prepare ---------------------------------------------------------------------------------------
def make_stats(teacher, tmp_path, data_key=None):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 1, 8, 8, generator=g), torch.arange(30) % 3
    mask = torch.ones(30, dtype=torch.bool)
    mask[::5] = False  # hidden labels: grouped under the teacher's prediction
    data = BatchDataset(TensorDataset(x, y), mask)
    return (
        TeacherStatistics(teacher, data, 3, torch.device("cpu"), tmp_path, data_key or {"d": 1}, 7),
        x,
        y,
        mask,
    )


def test_class_means_match_a_direct_computation_and_are_cached_per_teacher(tmp_path):
    teacher = build_model({"name": "mlp", "hidden": [6]}, num_classes=3).eval()
    stats, x, y, mask = make_stats(teacher, tmp_path)
    with torch.no_grad():
        feats, logits = teacher.features(x), teacher(x)
    classes = torch.where(mask, y, logits.argmax(1))
    expected = torch.stack([feats[classes == c].mean(0) for c in range(3)])
    assert torch.allclose(stats.class_means("feature"), expected, atol=1e-6)
    files = list((tmp_path / "statistics").glob("class_features-*.pt"))
    assert len(files) == 1
    calls = []
    again, *_ = make_stats(teacher, tmp_path)
    again.cached("class_features", {"tap": "feature"}, lambda: calls.append(1))
    assert calls == []  # same teacher + data: read from disk, not recomputed
    other = build_model({"name": "mlp", "hidden": [6]}, num_classes=3).eval()
    assert make_stats(other, tmp_path)[0].key != stats.key
    assert make_stats(teacher, tmp_path, {"d": 2})[0].key != stats.key


def test_wkd_cost_matrix_is_prepared_from_teacher_statistics(tmp_path):
    student, teacher = cnn((4, 8)), cnn((8, 16), seed=1).eval()
    method = METHODS.build({"name": "wkd_l"}, student=student, teacher=teacher, input_shape=(1, 8, 8))
    cost = dict(method.named_buffers())["terms.2.cost_matrix"]
    assert cost.shape == (10, 10) and cost.abs().sum() == 0
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.arange(40) % 10
    stats = TeacherStatistics(
        teacher, BatchDataset(TensorDataset(x, y)), 10, torch.device("cpu"), tmp_path, {}
    )
    method.prepare(stats)
    assert torch.allclose(cost.diagonal(), torch.zeros(10)) and cost.max() > 0
    assert torch.allclose(cost, cost.T, atol=1e-6)
