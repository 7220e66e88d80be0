"""Parity of AT, PKT and RKD with torchdistill 1.1.5 (float64, rtol 1e-10); why SP is not compared.

torchdistill's mid-level losses are called as `loss(student_io_dict, teacher_io_dict)` where an io dict
maps a module path to `{"input" | "output": tensor}`. Quirks met here:
- `ATLoss(at_pairs, mode)` reads each pair's `student`/`teacher` `{io, path}` and multiplies it by the
  pair's `weight`; `mode='code'` sums the per-pair mean squared differences (our `mode="code"`), while
  `mode='paper'` divides the summed per-sample L2 distances by the batch size once, after summing the
  pairs (our `mode="paper"` summed over pairs). It hard-codes p = 2 (A.pow(2)) and needs equal spatial
  sizes (no pooling of mismatched maps, which our term adds).
- `PKTLoss(student_module_path, student_module_io, teacher_module_path, teacher_module_io, eps)` reads
  the pooled feature as the classifier's input (`fc`, `input`); its in-place NaN zeroing never fires for
  finite inputs with eps > 0, so zero feature rows agree too.
- `RKDLoss(student_output_path, teacher_output_path, dist_factor, angle_factor, reduction)` always reads
  `output` and flattens it; a factor of 0 skips that part (returns the integer 0).
- `SPKDLoss` normalises the rows of the Gram matrix with `normalize(G, 1)`: the second positional argument
  of `torch.nn.functional.normalize` is p, so its rows are L1-normalised. The paper (Eq. 2-3) and the
  RepDistiller/mdistiller code use L2, as we do, so SP is checked against the formula
  (tests/test_feature_relational.py), not against torchdistill.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("torchdistill")

from torchdistill.losses.mid_level import ATLoss, PKTLoss, RKDLoss  # noqa: E402

from gendd_framework.losses.attention import at_loss  # noqa: E402
from gendd_framework.losses.pkt import pkt_loss  # noqa: E402
from gendd_framework.losses.rkd import rkd_angle_loss, rkd_distance_loss, rkd_loss  # noqa: E402


def rand(*shape, seed, scale=1.0, relu=False):
    x = scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.clamp_min(0) if relu else x


def close(a, b) -> bool:
    return torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-10, atol=0.0)


def at_pair(path: str, weight: float) -> dict:
    side = {"io": "output", "path": path}
    return {"student": side, "teacher": dict(side), "weight": weight}


@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("relu", [True, False])
def test_at_parity(mode, relu):
    shapes = {"layer3": ((8, 6, 8, 8), (8, 12, 8, 8)), "layer4": ((8, 10, 4, 4), (8, 20, 4, 4))}
    s_io, t_io = {}, {}
    for i, (path, (s_shape, t_shape)) in enumerate(shapes.items()):
        s_io[path] = {"output": rand(*s_shape, seed=i, relu=relu)}
        t_io[path] = {"output": rand(*t_shape, seed=10 + i, relu=relu)}
    weights = {"layer3": 1.0, "layer4": 0.5}
    theirs = ATLoss({f"pair_{p}": at_pair(p, w) for p, w in weights.items()}, mode=mode)(s_io, t_io)
    ours = sum(w * at_loss(s_io[p]["output"], t_io[p]["output"], 2.0, mode) for p, w in weights.items())
    assert close(theirs, ours)


@pytest.mark.parametrize("dims", [(16, 16), (32, 8)])
def test_pkt_parity(dims):
    s, t = rand(12, dims[0], seed=20, relu=True), rand(12, dims[1], seed=21, relu=True)
    s[3] = 0.0  # a dead feature vector
    loss = PKTLoss("fc", "input", "fc", "input", eps=1e-7)
    theirs = loss({"fc": {"input": s.clone()}}, {"fc": {"input": t.clone()}})
    assert close(theirs, pkt_loss(s, t, eps=1e-7))
    assert inspect.signature(PKTLoss).parameters["eps"].default == 1e-7  # the default we use


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])  # both branches of the smooth-L1
def test_rkd_parity(scale):
    s, t = rand(10, 3, 2, 2, seed=30, scale=scale), rand(10, 7, seed=31)
    s_io, t_io = {"layer4": {"output": s}}, {"layer4": {"output": t}}

    def theirs(dist_factor, angle_factor):
        return RKDLoss("layer4", "layer4", dist_factor, angle_factor, "mean")(s_io, t_io)

    assert close(theirs(25.0, 50.0), rkd_loss(s, t, 25.0, 50.0)["loss"])
    assert close(theirs(1.0, 0.0), rkd_distance_loss(s, t))
    assert close(theirs(0.0, 1.0), rkd_angle_loss(s, t))
