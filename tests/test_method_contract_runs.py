"""The method contract end to end, through small plugin methods on digits: teacher-free runs and the
one-line error of a method that needs a teacher, extra sample keys and augmented views, a predictor
that is more than the student (student.pt, `teacher=from_run`, `gendd-eval export=true`), and a
teacher-output cache that never serves another view's or a changed teacher's outputs."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from gendd_framework.context import as_batch
from gendd_framework.data.base import BatchDataset, DataSplits, TensorImages
from gendd_framework.errors import ConfigError
from gendd_framework.pipeline import run
from gendd_framework.registry import METHODS

TINY = ["trainer.epochs=1", "data.train_fraction=0.3"]

PLUGIN = '''
"""Test plugin methods for the method contract."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from gendd_framework.methods.base import Method, freeze
from gendd_framework.registry import METHODS


@METHODS.register("contract_teacher_free")
class TeacherFree(Method):
    """CE through a learnable logit scale set directly on the method: no teacher."""

    needs_teacher = False

    def __init__(self, student, teacher=None):
        super().__init__(student, teacher)  # kept when a stage has one (then its state is saved too)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def training_step(self, batch, ctx):
        logits = self.student(batch["input"])["logits"] * self.scale
        return {"loss": F.cross_entropy(logits, batch["target"])}


@METHODS.register("contract_reads_teacher")
class ReadsTeacher(Method):
    """Sizes a projector from the teacher's feature: it needs one (and does not say so)."""

    def __init__(self, student, teacher=None, input_shape=None):
        super().__init__(student, teacher, student_taps=["feature"], input_shape=input_shape)
        shapes = self.tap_shapes()
        self.proj = nn.Linear(shapes["student"]["feature"][0], shapes["teacher"]["feature"][0])


@METHODS.register("contract_needs_mask")
class NeedsMask(TeacherFree):
    batch_keys = ("input", "target", "mask")

    def training_step(self, batch, ctx):
        return {"loss": super().training_step(batch, ctx)["loss"] * batch["mask"].float().mean()}


@METHODS.register("contract_two_views")
class TwoViews(TeacherFree):
    """CE on one view plus agreement with a second augmented view of the same samples."""

    batch_keys = ("input", "input_1", "target")
    differing = 0  # batches whose two views differed (class-level: read by the test)

    def training_step(self, batch, ctx):
        x1, x2 = batch["input"], batch["input_1"]
        type(self).differing += int(not torch.equal(x1, x2))
        a, b = self.student(x1)["logits"], self.student(x2)["logits"]
        agree = F.mse_loss(a.softmax(1), b.softmax(1).detach())
        return {"loss": F.cross_entropy(a, batch["target"]) + agree, "agree": agree.detach()}


class Projected(nn.Module):
    """Student feature -> projector -> the teacher's frozen classifier."""

    def __init__(self, student, proj, head):
        super().__init__()
        self.student, self.proj, self.head = student, proj, head

    def forward(self, x):
        return self.head(self.proj(self.student(x)["feature"]))


@METHODS.register("contract_teacher_head")
class TeacherHead(Method):
    """SimKD's shape: the prediction goes through a projector and the teacher's frozen classifier, so
    the student's own head stays untrained and the predictor is not the student."""

    primary_output = "projected"

    def __init__(self, student, teacher=None, input_shape=None):
        super().__init__(student, teacher, student_taps=["feature"], input_shape=input_shape)
        s, t = self.tap_shapes()["student"]["feature"][0], self.tap_shapes()["teacher"]["feature"][0]
        self.proj = nn.Linear(s, t)

    def projected(self):
        return Projected(self.student, self.proj, self.teacher.classifier)

    def training_step(self, batch, ctx):
        return {"loss": F.cross_entropy(self.projected()(batch["input"]), batch["target"])}

    def predict(self, x):
        return {"projected": self.projected()(x), "student": self.student(x)["logits"]}

    def export(self):
        return self.projected()


@METHODS.register("contract_ema_teacher")
class EMATeacher(Method):
    """Self-distillation from an EMA of the student held as `teacher`, read through teacher_outputs
    (so a teacher cache sees it); `declare=False` forgets to say that the teacher changes, and
    `in_step=True` updates it at the start of each step instead of in the hook."""

    needs_teacher = False

    def __init__(self, student, declare: bool = True, in_step: bool = False, decay: float = 0.9):
        super().__init__(student, copy.deepcopy(student))
        self.teacher_is_frozen = not declare
        self.in_step, self.decay = in_step, decay

    def training_step(self, batch, ctx):
        if self.in_step and ctx.step > 0:
            self.update_ema()
        x = batch["input"]
        t = self.teacher_outputs(x, batch)["logits"]
        s = self.student(x)["logits"]
        kl = F.kl_div(s.log_softmax(1), t.softmax(1), reduction="batchmean")
        return {"loss": F.cross_entropy(s, batch["target"]) + kl, "kl": kl.detach()}

    @torch.no_grad()
    def update_ema(self):
        for e, p in zip(self.teacher.model.parameters(), self.student.model.parameters()):
            e.lerp_(p, 1.0 - self.decay)

    def after_optimizer_step(self, ctx):
        if not self.in_step:
            self.update_ema()
'''


METHOD_CONFIGS = {
    "contract_teacher_free": "",
    "contract_reads_teacher": "",
    "contract_needs_mask": "",
    "contract_two_views": "",
    "contract_teacher_head": "",
    "contract_ema_teacher": "declare: true\nin_step: false\n",
}


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The plugin file and a config dir holding its method YAMLs."""
    root = tmp_path_factory.mktemp("contract")
    path = root / "contract_plugin.py"
    path.write_text(textwrap.dedent(PLUGIN))
    (root / "conf" / "method").mkdir(parents=True)
    for name, extra in METHOD_CONFIGS.items():
        (root / "conf" / "method" / f"{name}.yaml").write_text(f"name: {name}\n{extra}")
    return {"plugins": f"plugins=[{path}]", "config_dirs": [str(root / "conf")]}


@pytest.fixture
def setup(compose, plugin):
    """compose(overrides) with the plugin loaded and its method configs on the search path."""
    return lambda overrides, fast=None: compose(
        [plugin["plugins"], *overrides],
        config_dirs=plugin["config_dirs"],
        **({} if fast is None else {"fast": fast}),
    )


def train_rows(run_dir, stage="distill") -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage and "train/loss" in r]


# -- 4. teacher-free methods ----------------------------------------------------------------------------
def test_a_teacher_free_stage_trains_evaluates_and_reevaluates_without_a_teacher(setup, tmp_path):
    from gendd_framework.cli.evaluate import RunEvaluator

    cfg = setup(["method=contract_teacher_free", "stages=[distill]", *TINY])
    summary = run(cfg, tmp_path)
    test = summary["distill"]["test"]
    assert "acc/student" in test and not any(k.startswith(("agree/", "kl/")) for k in test)
    assert "teacher" not in summary
    # gendd-eval rebuilds the stage as it ran: no teacher (the composed `teacher:` node is not used)
    again = RunEvaluator(tmp_path, device="cpu").evaluate(split="test")
    assert again["acc/student"] == test["acc/student"]
    assert METHODS.build({"name": "ce"}, student=nn.Linear(2, 2)).needs_teacher is False
    assert METHODS.build({"name": "kd"}, student=nn.Linear(2, 2), teacher=nn.Linear(2, 2)).needs_teacher


@pytest.mark.parametrize("method", ["kd", "contract_reads_teacher"])
def test_a_method_that_needs_a_teacher_fails_at_build_in_one_line(setup, tmp_path, method):
    cfg = setup([f"method={method}", "stages=[distill]", *TINY])
    with pytest.raises(ConfigError, match=r"needs a teacher, but this stage has none.*stages: \[teacher"):
        run(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


# -- 5. extra sample keys and augmented views ---------------------------------------------------------
class Noisy(Dataset):
    """Four constant images whose transform adds fresh noise at every draw; mapping samples with a key
    of their own (`mask`)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        return {"input": torch.full((1, 2, 2), float(i)) + torch.randn(1, 2, 2), "target": i % 2, "mask": 1}


def test_views_are_fresh_draws_of_the_training_transform():
    torch.manual_seed(0)
    sample = BatchDataset(Noisy(), views=3)[2]
    torch.manual_seed(0)
    draws = [as_batch(Noisy()[2])["input"] for _ in range(3)]
    assert [torch.equal(sample[k], d) for k, d in zip(("input", "input_1", "input_2"), draws)] == [True] * 3
    assert not torch.equal(sample["input"], sample["input_1"])
    assert sample["mask"] == 1 and sample["index"] == 2


def test_build_time_facts_list_the_keys_a_mapping_dataset_serves():
    from gendd_framework.context import DataFacts
    from gendd_framework.data.base import data_facts
    from gendd_framework.methods.base import required_views

    images = TensorImages(torch.zeros(4, 1, 2, 2), torch.arange(4))
    splits = DataSplits(Noisy(), images, images, num_classes=2, input_shape=(1, 2, 2))
    facts = data_facts(splits)
    assert facts == DataFacts(2, (1, 2, 2), 4, ("input", "target", "mask", "index", "all_labelled"), True)
    assert facts["input_shape"] == (1, 2, 2) and facts.get("nope", 7) == 7  # reads like a mapping
    method = type("M", (), {"batch_keys": ("input", "input_2", "mask")})()
    assert required_views(method, facts.sample_keys) == 3
    method.batch_keys = ("input", "weight")
    with pytest.raises(ConfigError, match=r"reads batch key\(s\) \['weight'\]"):
        required_views(method, facts.sample_keys)


def test_a_two_view_method_trains_on_two_augmented_draws(setup, tmp_path):
    cfg = setup(["method=contract_two_views", "stages=[distill]", *TINY])
    summary = run(cfg, tmp_path)
    assert METHODS.get("contract_two_views").differing > 0  # digits' noise drawn again for `input_1`
    assert "train/agree" in train_rows(tmp_path)[0] and summary["distill"]["test"]["acc/student"] > 0


def test_a_sample_key_the_data_lacks_fails_at_build_in_one_line(setup, tmp_path):
    cfg = setup(["method=contract_needs_mask", "stages=[distill]", *TINY])
    with pytest.raises(ConfigError, match=r"reads batch key\(s\) \['mask'\] that the training data"):
        run(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


# -- 6. export what predicts ---------------------------------------------------------------------------
def test_the_exported_predictor_is_what_from_run_and_gendd_eval_use(setup, tmp_path):
    from gendd_framework.cli.evaluate import run_eval

    first = run(setup(["method=contract_teacher_head", *TINY]), tmp_path / "a")
    accuracy = first["distill"]["test"]["acc/projected"]
    from_run = ["teacher=from_run", f"teacher.run_dir={tmp_path / 'a'}", "trainer.progress=false"]
    second = run(setup(["method=kd", *TINY, *from_run], fast=()), tmp_path / "b")
    assert second["teacher"]["test"]["acc/teacher"] == accuracy  # the predictor, not the bare student
    assert accuracy > first["distill"]["test"]["acc/student"] + 20  # the student's own head is untrained
    assert first["export"]["predictor"] == "method" and first["export"]["stage"] == "distill"
    weights = torch.load(tmp_path / "a" / "student.pt", weights_only=True)
    assert any(k.startswith("proj.") for k in weights) and any(k.startswith("head.") for k in weights)
    exported = run_eval([f"run_dir={tmp_path / 'a'}", "export=true", "device=cpu"])
    assert exported["acc/export"] == accuracy


# -- 7. the teacher-output cache is correct or off ------------------------------------------------------
def cache_method(tmp_path):
    """KD between two small CNNs with a deterministic-mode cache attached."""
    from gendd_framework.engine.teacher_cache import attach_teacher_cache
    from gendd_framework.models import build_model

    torch.manual_seed(0)
    student = build_model({"name": "small_cnn", "channels": [4, 8]}, num_classes=10)
    teacher = build_model({"name": "small_cnn", "channels": [8, 16]}, num_classes=10)
    m = METHODS.build({"name": "kd"}, student=student, teacher=teacher, input_shape=(1, 8, 8))
    data = TensorImages(torch.zeros(8, 1, 8, 8), torch.arange(8))
    numerics = {"precision": "fp32", "channels_last": False, "compile_teacher": None, "device": "cpu"}
    cache = attach_teacher_cache(
        m,
        {"mode": "deterministic", "dir": str(tmp_path)},
        train_dataset=data,
        data_config={"name": "zeros"},
        numerics=numerics,
        default_dir=tmp_path,
        epochs=1,
    )
    return m, cache


def test_the_cache_never_serves_one_input_for_another(tmp_path):
    m, cache = cache_method(tmp_path)
    x, x1 = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    batch = {"input": x, "input_1": x1, "index": torch.arange(4)}
    teacher = lambda v: m.teacher.model(v)  # noqa: E731  (the uncached truth)
    with torch.no_grad():
        assert torch.equal(m.teacher_outputs(x, batch)["logits"], teacher(x))
        assert torch.equal(m.teacher_outputs(x1, batch)["logits"], teacher(x1))  # a view: its own entry
        flipped = x.flip(-1)  # a tensor the batch does not hold: computed, never cached
        assert torch.equal(m.teacher_outputs(flipped, batch)["logits"], teacher(flipped))
        assert torch.equal(m.teacher_outputs(x1, batch)["logits"], teacher(x1))  # read back
        assert torch.equal(m.teacher_outputs(x, batch)["logits"], teacher(x))
    stats = cache.stats()
    assert (stats["state"], stats["misses"], stats["hits"], stats["bypassed"]) == ("on", 2, 2, 1)


def test_a_teacher_changed_in_place_turns_the_cache_off(tmp_path):
    m, cache = cache_method(tmp_path)
    x = torch.randn(4, 1, 8, 8)
    batch = {"input": x, "index": torch.arange(4)}
    m.teacher_outputs(x, batch)
    m.load_state_dict(m.state_dict())  # the same weights written again (a resume): still valid
    m.teacher_outputs(x, batch)
    assert cache.hits == 1
    with torch.no_grad():
        m.teacher.model.fc.weight.mul_(2.0)  # what an EMA update does
        assert torch.equal(m.teacher_outputs(x, batch)["logits"], m.teacher.model(x))
    assert cache.stats()["state"] == "off" and "weights changed" in cache.stats()["reason"]
    cache.flush()  # nothing computed after the change is saved
    assert not list(tmp_path.glob("*/view_0.pt"))


def test_a_change_behind_the_version_counters_stops_before_anything_is_saved(tmp_path):
    m, cache = cache_method(tmp_path)
    x = torch.randn(4, 1, 8, 8)
    m.teacher_outputs(x, {"input": x, "index": torch.arange(4)})
    m.teacher.model.fc.bias.data.add_(1.0)  # `.data` writes bump no version counter
    with pytest.raises(ConfigError, match="teacher_is_frozen = False"):
        cache.flush()
    assert not list(tmp_path.glob("*/view_0.pt")) and cache.stats()["state"] == "off"


@pytest.mark.parametrize("declare", [True, False])
def test_an_ema_teacher_run_with_the_cache_equals_the_uncached_run(setup, tmp_path, declare):
    """Declared: the cache is refused at attach. Undeclared (and updated inside the step): the first
    changed read turns it off. Either way the cached run computes exactly what the uncached one does."""
    base = ["method=contract_ema_teacher", f"method.declare={declare}", f"method.in_step={not declare}"]
    # one batch per epoch holds the whole split: from the second epoch on every sample is cached
    base += ["stages=[distill]", "data.augment=false", "trainer.epochs=3", "data.train_fraction=0.3"]
    base += ["data.loader.batch_size=4096"]
    plain = run(setup(base), tmp_path / "plain")
    cached = run(setup([*base, "trainer.teacher_cache.mode=deterministic"]), tmp_path / "cached")
    assert [r["train/kl"] for r in train_rows(tmp_path / "cached")] == [
        r["train/kl"] for r in train_rows(tmp_path / "plain")
    ]
    assert cached["distill"]["test"] == plain["distill"]["test"]
    record = cached["distill"]["teacher_cache"]
    assert record["state"] == "off"
    assert ("teacher_is_frozen = False" if declare else "weights changed") in record["reason"]
