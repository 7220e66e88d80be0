"""CRD: NCE maths and memory update against explicit loops (float64), fixed Z, negative sampling, state
round trips, the prepare hook on a transfer set, and an exact end-to-end resume on digits."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

import gendd_framework.components  # noqa: F401  (registrations)
from gendd_framework.context import StepContext
from gendd_framework.data.base import BatchDataset
from gendd_framework.engine import checkpoint as ckpt
from gendd_framework.engine.statistics import TeacherStatistics
from gendd_framework.engine.trainer import Trainer
from gendd_framework.errors import ConfigError
from gendd_framework.losses.crd import contrast_scores, momentum_update_, nce_loss
from gendd_framework.methods.feature.crd import CRDTerm
from gendd_framework.models import build_model
from gendd_framework.pipeline import run
from gendd_framework.registry import METHODS

CTX = StepContext()


def unit(x):
    return x / x.norm(dim=1, keepdim=True)


def make_term(n=12, s_dim=5, t_dim=7, feat_dim=4, k=6, seed=0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    term = CRDTerm(feat_dim=feat_dim, nce_k=k, **kwargs)
    term.bind(None, None, {"num_samples": n, "input_shape": None})
    term.setup({"student": {"feature": (s_dim,)}, "teacher": {"feature": (t_dim,)}})
    return term.to(dtype)


# -- pure maths ------------------------------------------------------------------------------------
def loop_nce(probs, n, eps=1e-7):
    """Eq. 18 with P_n = 1/N and m = K noise samples, one sample and one column at a time."""
    b, k1 = probs.shape
    m = k1 - 1
    total = 0.0
    for i in range(b):
        p0 = float(probs[i, 0])
        total += math.log(p0 / (p0 + m / n + eps))
        for j in range(1, k1):
            total += math.log((m / n) / (float(probs[i, j]) + m / n + eps))
    return -total / b


def loop_scores(anchor, memory, index, temperature):
    out, anchor = torch.empty(index.shape, dtype=torch.float64), anchor.detach()
    for i in range(index.shape[0]):
        for j in range(index.shape[1]):
            row = memory[int(index[i, j])]
            dot = sum(float(row[d]) * float(anchor[i, d]) for d in range(len(row)))
            out[i, j] = math.exp(dot / temperature)
    return out


def test_nce_loss_matches_the_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(4, 9, generator=g, dtype=torch.float64) * 0.1
    assert nce_loss(probs, 30).item() == pytest.approx(loop_nce(probs, 30), rel=1e-12)
    # a perfect discriminator (P_pos -> inf, P_neg -> 0) drives the loss to 0 from above
    perfect = torch.cat([torch.full((3, 1), 1e12), torch.zeros(3, 5)], 1).double()
    assert 0 <= nce_loss(perfect, 10, eps=0.0).item() < 1e-9


@pytest.mark.parametrize("n", [7, 200])  # 7: dense (B, N) route; 200: gathered-rows route
def test_contrast_scores_match_explicit_dot_products_on_both_routes(n):
    g = torch.Generator().manual_seed(1)
    anchor = unit(torch.randn(3, 4, generator=g, dtype=torch.float64))
    memory = torch.randn(n, 4, generator=g, dtype=torch.float64)
    index = torch.randint(0, n, (3, 3), generator=g)
    got = contrast_scores(anchor, memory, index, 0.07)
    assert torch.allclose(got, loop_scores(anchor, memory, index, 0.07), rtol=1e-12)


def test_nce_gradient_with_respect_to_the_anchor_is_exact():
    g = torch.Generator().manual_seed(2)
    memory = torch.randn(9, 4, generator=g, dtype=torch.float64)
    index = torch.randint(0, 9, (2, 5), generator=g)
    anchor = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    loss = lambda v: nce_loss(contrast_scores(v, memory, index, 0.5) / 3.0, 9)  # noqa: E731  (fixed Z = 3)
    assert torch.autograd.gradcheck(loss, anchor)


def test_momentum_update_matches_an_explicit_row_computation():
    g = torch.Generator().manual_seed(3)
    memory = torch.randn(6, 3, generator=g, dtype=torch.float64)
    before = memory.clone()
    value, index = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.tensor([4, 1])
    momentum_update_(memory, index, value, 0.3)
    for row in range(6):
        if row in (4, 1):
            v = value[0 if row == 4 else 1]
            mixed = [0.3 * float(before[row, d]) + 0.7 * float(v[d]) for d in range(3)]
            norm = math.sqrt(sum(x * x for x in mixed))
            assert memory[row].tolist() == pytest.approx([x / norm for x in mixed], rel=1e-12)
        else:
            assert torch.equal(memory[row], before[row])


# -- the term --------------------------------------------------------------------------------------
def test_term_loss_and_bank_update_match_a_hand_computation():
    n, k, t, m = 12, 6, 0.07, 0.5
    term = make_term(n=n, k=k)
    g = torch.Generator().manual_seed(4)
    f_s, f_t = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g).double()
    index = torch.tensor([2, 7, 11])
    contrast = torch.cat([index[:, None], torch.randint(0, n, (3, k), generator=g)], 1)
    mem_s, mem_t = term.memory_student.clone(), term.memory_teacher.clone()
    v_s = unit(f_s @ term.embed_s.linear.weight.T + term.embed_s.linear.bias)
    v_t = unit(f_t @ term.embed_t.linear.weight.T + term.embed_t.linear.bias)
    s_s, s_t = loop_scores(v_s, mem_t, contrast, t), loop_scores(v_t, mem_s, contrast, t)
    z_s, z_t = float(s_s.mean()) * n, float(s_t.mean()) * n
    expected = loop_nce(s_s / z_s, n) + loop_nce(s_t / z_t, n)

    batch = {"index": index, "contrast_index": contrast}
    out = term({"feature": f_s}, {"feature": f_t}, batch, CTX)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-10)
    assert out["student_anchor"].item() == pytest.approx(loop_nce(s_s / z_s, n), rel=1e-10)
    assert term.z.tolist() == pytest.approx([z_s, z_t], rel=1e-12)
    for bank, before, v in ((term.memory_student, mem_s, v_s), (term.memory_teacher, mem_t, v_t)):
        assert torch.allclose(bank[index], unit(m * before[index] + (1 - m) * v), rtol=1e-12)
        untouched = torch.ones(n, dtype=torch.bool).index_fill_(0, index, False)
        assert torch.equal(bank[untouched], before[untouched])


def test_gradients_reach_the_student_feature_and_both_embeddings():
    term = make_term()
    f_s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    batch = {"index": torch.arange(4), "contrast_index": torch.randint(0, 12, (4, 7))}
    term({"feature": f_s}, {"feature": torch.randn(4, 7).double()}, batch, CTX)["loss"].backward()
    assert f_s.grad.abs().sum() > 0
    assert term.embed_s.linear.weight.grad.abs().sum() > 0 and term.embed_t.linear.weight.grad.abs().sum() > 0


def test_z_is_estimated_on_the_first_batch_then_fixed():
    term = make_term()
    assert term.z.tolist() == [-1.0, -1.0]
    batch = {"index": torch.arange(3), "contrast_index": torch.randint(0, 12, (3, 7))}
    term({"feature": torch.randn(3, 5).double()}, {"feature": torch.randn(3, 7).double()}, batch, CTX)
    first = term.z.clone()
    assert (first > 0).all()
    for _ in range(3):
        feats = ({"feature": 5 * torch.randn(3, 5).double()}, {"feature": torch.randn(3, 7).double()})
        term(*feats, {"index": torch.arange(3, 6), "contrast_index": torch.randint(0, 12, (3, 7))}, CTX)
    assert torch.equal(term.z, first)


def grouped_term(mode="exact", negatives="other_class", n=40, k=200):
    term = make_term(n=n, k=k, mode=mode, negatives=negatives, dtype=torch.float32)
    classes = torch.arange(n) % 4
    term.set_classes(classes, 4)
    return term, classes


def test_exact_mode_draws_the_sample_itself_and_only_other_class_negatives():
    term, classes = grouped_term()
    index = torch.arange(40)
    drawn = term.sample_contrast_index(index)
    assert drawn.shape == (40, 201) and torch.equal(drawn[:, 0], index)
    assert not (classes[drawn[:, 1:]] == classes[index][:, None]).any()
    counts = torch.bincount(drawn[:, 1:][classes[index] == 0].flatten(), minlength=40)
    other = classes != 0  # uniform over the 30 samples of other classes: 2000 draws, 66.7 each
    assert (counts[~other] == 0).all() and counts[other].min() > 30 and counts[other].max() < 110


def test_relax_positives_share_the_class_and_uniform_negatives_cover_every_sample():
    term, classes = grouped_term(mode="relax", negatives="uniform")
    index = torch.arange(40)
    drawn = term.sample_contrast_index(index)
    assert torch.equal(classes[drawn[:, 0]], classes[index])
    assert (drawn[:, 0] != index).any()  # a random member of the class, not always the sample itself
    assert (classes[drawn[:, 1:]] == classes[index][:, None]).any()  # any sample, same class included
    assert torch.bincount(drawn[:, 1:].flatten(), minlength=40).min() > 0


def test_uniform_exact_needs_no_classes_but_other_class_does():
    make_term(negatives="uniform").sample_contrast_index(torch.arange(3))
    with pytest.raises(ConfigError, match="prepare"):
        make_term().sample_contrast_index(torch.arange(3))


def test_state_dict_round_trip_restores_banks_and_z_exactly(tmp_path):
    term = make_term(dtype=torch.float32)
    feats = ({"feature": torch.randn(3, 5)}, {"feature": torch.randn(3, 7)})
    batch = {"index": torch.tensor([0, 5, 9]), "contrast_index": torch.randint(0, 12, (3, 7))}
    term(*feats, batch, CTX)
    ckpt.atomic_save({"term": term.state_dict()}, tmp_path / "t.pt")
    assert {"memory_student", "memory_teacher", "z"} <= set(term.state_dict())
    fresh = make_term(seed=9, dtype=torch.float32)
    assert not torch.equal(fresh.memory_student, term.memory_student)
    fresh.load_state_dict(ckpt.load(tmp_path / "t.pt")["term"])
    for name in ("memory_student", "memory_teacher", "z"):
        assert torch.equal(getattr(fresh, name), getattr(term, name))
    assert torch.equal(fresh(*feats, batch, CTX)["loss"], term(*feats, batch, CTX)["loss"])
    assert torch.equal(fresh.memory_student, term.memory_student)


def test_bad_configuration_and_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="num_samples"):
        CRDTerm().bind(None, None, {"num_samples": None, "input_shape": None})
    with pytest.raises(ConfigError, match="mode"):
        CRDTerm(mode="loose")
    with pytest.raises(ConfigError, match="nce_m"):
        CRDTerm(nce_m=1.0)
    term = make_term(negatives="uniform")
    feats = ({"feature": torch.randn(3, 5).double()}, {"feature": torch.randn(3, 7).double()})
    with pytest.raises(ConfigError, match=r"\(3, 7\), got \(3, 4\)"):
        term(*feats, {"index": torch.arange(3), "contrast_index": torch.zeros(3, 4, dtype=torch.long)}, CTX)
    with pytest.raises(ConfigError, match="index"):
        term(*feats, {"input": None}, CTX)


def test_prepare_uses_labels_and_the_teacher_prediction_for_hidden_ones(tmp_path):
    torch.manual_seed(0)
    student = build_model({"name": "small_cnn", "channels": [4, 8]}, num_classes=10)
    teacher = build_model({"name": "small_cnn", "channels": [8, 16]}, num_classes=10).eval()
    method = METHODS.build(
        {"name": "crd", "nce_k": 16, "kd_weight": 1.0},
        student=student,
        teacher=teacher,
        input_shape=(1, 8, 8),
        num_samples=30,
    )
    assert [type(t).__name__ for t in method.terms] == ["CrossEntropy", "KDDivergence", "CRDTerm"]
    x, y = torch.randn(30, 1, 8, 8), torch.arange(30) % 10
    mask = torch.arange(30) % 3 != 0
    data = BatchDataset(TensorDataset(x, y), mask)
    stats = TeacherStatistics(teacher, data, 10, torch.device("cpu"), tmp_path, {})
    method.prepare(stats)
    with torch.no_grad():
        expected = torch.where(mask, y, teacher(x).argmax(1))
    assert torch.equal(method.terms[2].sample_class, expected)
    assert len(list((tmp_path / "statistics").glob("crd_hidden_classes-*.pt"))) == 1
    batch = {"input": x[:6], "target": torch.where(mask, y, -1)[:6], "index": torch.arange(6)}
    out = method.training_step(batch, CTX)
    assert torch.isfinite(out["loss"]) and {"crd/student_anchor", "crd/teacher_anchor"} <= set(out)
    with pytest.raises(ConfigError, match="31 rows"):
        METHODS.build(
            {"name": "crd"}, student=student, teacher=teacher, input_shape=(1, 8, 8), num_samples=31
        ).prepare(stats)


def test_bf16_autocast_keeps_the_contrast_in_fp32():
    term = make_term(dtype=torch.float32, negatives="uniform")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f_s = torch.nn.functional.linear(torch.randn(3, 5), torch.randn(5, 5))  # a bf16 feature
        f_t = torch.randn(3, 7).bfloat16()
        out = term({"feature": f_s}, {"feature": f_t}, {"index": torch.arange(3)}, CTX)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def _rank_step(rank: int, store: str, out_dir: str) -> None:
    """One CRD step on this rank's half of a 6-sample batch in a 2-process gloo group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        term, feats, batch = ddp_case()
        part = slice(3 * rank, 3 * rank + 3)
        shard = {"index": batch["index"][part], "contrast_index": batch["contrast_index"][part]}
        term({"feature": feats[0][part]}, {"feature": feats[1][part]}, shard, CTX)
        state = {k: v for k, v in term.state_dict().items() if "embed" not in k}
        torch.save(state, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def ddp_case():
    term = make_term(n=12, k=6, seed=5)
    g = torch.Generator().manual_seed(6)
    feats = (torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 7, generator=g).double())
    index = torch.tensor([0, 3, 4, 8, 10, 11])
    contrast = torch.cat([index[:, None], torch.randint(0, 12, (6, 6), generator=g)], 1)
    return term, feats, {"index": index, "contrast_index": contrast}


def test_two_ranks_keep_identical_banks_equal_to_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_rank_step, (str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    term, feats, batch = ddp_case()
    term({"feature": feats[0]}, {"feature": feats[1]}, batch, CTX)
    for name in ("memory_student", "memory_teacher", "z"):
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], getattr(term, name), rtol=1e-12, atol=0), name


# -- end to end ------------------------------------------------------------------------------------
def test_interrupted_and_resumed_run_ends_with_the_same_banks_and_weights(compose, tmp_path, monkeypatch):
    overrides = ["experiment=digits/transfer_cnn", "method=crd", "trainer.epochs=3"]
    overrides.append("data.train_fraction=0.3")
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    run(compose(overrides), full_dir)
    original = Trainer.train_one_epoch

    def interrupt_at_epoch_1(self, total_steps):
        if self.stage == "distill" and self.epoch == 1:
            raise KeyboardInterrupt
        return original(self, total_steps)

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupt_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run(compose(overrides), cut_dir)
    monkeypatch.setattr(Trainer, "train_one_epoch", original)
    run(compose([*overrides, "trainer.resume=true"]), cut_dir)

    a = ckpt.load(full_dir / "checkpoints" / "distill_last.pt")["method"]
    b = ckpt.load(cut_dir / "checkpoints" / "distill_last.pt")["method"]
    banks = [k for k in a if k.endswith(("memory_student", "memory_teacher", ".z"))]
    assert len(banks) == 3 and (a[banks[-1]] > 0).all()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
