"""CRD: contrastive representation distillation (Tian et al., ICLR'20), term `crd` and method `crd`.

Both pooled penultimate features (`feature` tap) pass through a trainable linear embedding and L2
normalisation. Two memory banks of N x feat_dim rows (N = training-set size), one per model, hold a
momentum average of each sample's embedding. The student embedding is contrasted against the teacher
bank and the teacher embedding against the student bank: the positive is the row at the sample's own
dataset index (`mode: exact`; `relax` picks a random training sample of the same class) and K negatives
are drawn, with replacement, from samples of other classes (`negatives: other_class`, the official data
pipeline) or from the whole training set (`negatives: uniform`, the memory's own sampler). The loss is
the sum of the two NCE losses (see losses/crd.py for the maths).

State kept in the checkpoint (buffers): both banks and the two normalisation constants Z (set on the
first batch, then fixed). Negatives are drawn from the global torch generator on the bank's device, whose
state every checkpoint carries, so a resumed run draws exactly the negatives an uninterrupted one does.
The class of each training sample (for `other_class` negatives and `relax` positives) comes from the
`prepare` hook: the label, or the teacher's prediction where the label is hidden from the student.
Under DDP every rank scores its own shard but writes the whole global batch into its banks (Z from the
first global batch too), so the banks stay identical across ranks. A batch may bring its own
`contrast_index` (B, K+1) instead of sampled rows (tests compare against independent computations).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from gendd_framework.context import UNLABELLED, to_device
from gendd_framework.data.base import BatchDataset, TensorImages
from gendd_framework.engine import distributed
from gendd_framework.errors import ConfigError
from gendd_framework.losses.crd import contrast_scores, momentum_update_, nce_loss, normalisation_constant
from gendd_framework.methods.compose import ComposedMethod, Use
from gendd_framework.methods.feature.projectors import LinearEmbed, flat_dim
from gendd_framework.methods.terms import LossTerm, require_shapes
from gendd_framework.registry import LOSSES, METHODS

MODES = ("exact", "relax")
NEGATIVES = ("other_class", "uniform")
_DRAW_HIGH = 2**62  # uniform int64 draws reduced modulo a pool size: bias below 1e-12


def dataset_labels(dataset: Dataset) -> torch.Tensor | None:
    """Per-sample labels read from the dataset's label storage without loading inputs (None when the
    wrappers are unknown). Hidden labels (a BatchDataset label mask) come back as -1."""
    if isinstance(dataset, BatchDataset):
        labels = dataset_labels(dataset.dataset)
        if labels is not None and dataset.label_mask is not None:
            labels = torch.where(dataset.label_mask.bool(), labels, torch.full_like(labels, UNLABELLED))
        return labels
    if isinstance(dataset, Subset):
        labels = dataset_labels(dataset.dataset)
        return None if labels is None else labels[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, TensorImages):
        return torch.as_tensor(dataset.labels).long().reshape(-1)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].long().reshape(-1)
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return torch.as_tensor(targets).long().reshape(-1)
    return None


def training_classes(stats: Any) -> torch.Tensor:
    """(N,) class per training index: the label where the student may see it, else the teacher's
    prediction on the un-augmented image (computed once, cached by teacher + data)."""
    labels = dataset_labels(stats.dataset)
    loader_kwargs = {"batch_size": stats.batch_size, "shuffle": False}
    if labels is None:  # unknown dataset type: read the targets sample by sample
        batches = DataLoader(stats.dataset, **loader_kwargs)
        labels = torch.cat([b["target"].long().reshape(-1) for b in batches])
    hidden = (labels == UNLABELLED).nonzero().flatten()
    if hidden.numel() == 0:
        return labels

    @torch.no_grad()
    def compute() -> torch.Tensor:
        predicted = []
        stats.teacher.eval()
        for batch in DataLoader(Subset(stats.dataset, hidden.tolist()), **loader_kwargs):
            predicted.append(stats.teacher(to_device(batch, stats.device)["input"]).argmax(1).cpu())
        return torch.cat(predicted)

    classes = labels.clone()
    classes[hidden] = stats.cached("crd_hidden_classes", {"n": len(labels), "hidden": len(hidden)}, compute)
    return classes


def embed(head: LinearEmbed, feature: torch.Tensor) -> torch.Tensor:
    """Unit-norm embedding in the head's own precision (an fp16/bf16 autocast feature is cast up)."""
    return F.normalize(head(feature.to(head.linear.weight.dtype)), dim=1)


@LOSSES.register("crd")
class CRDTerm(LossTerm):
    """Student- and teacher-anchored NCE against two momentum memory banks (the `crd` parts log both)."""

    student_taps = teacher_taps = ("feature",)

    def __init__(
        self,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        mode: str = "exact",
        negatives: str = "other_class",
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        if int(feat_dim) < 1 or int(nce_k) < 1:
            raise ConfigError(f"crd feat_dim and nce_k must be >= 1, got feat_dim={feat_dim}, nce_k={nce_k}")
        if not nce_t > 0:
            raise ConfigError(f"crd nce_t (temperature) must be > 0, got {nce_t}")
        if not 0.0 <= nce_m < 1.0:
            raise ConfigError(f"crd nce_m (memory momentum) must be in [0, 1), got {nce_m}")
        if mode not in MODES:
            raise ConfigError(f"crd mode must be one of {MODES}, got '{mode}'")
        if negatives not in NEGATIVES:
            raise ConfigError(f"crd negatives must be one of {NEGATIVES}, got '{negatives}'")
        self.feat_dim, self.nce_k = int(feat_dim), int(nce_k)
        self.nce_t, self.nce_m, self.eps = float(nce_t), float(nce_m), float(eps)
        self.mode, self.negatives = mode, negatives
        self.num_samples = 0
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None
        self._classes_ready = False

    @property
    def needs_classes(self) -> bool:
        return self.mode == "relax" or self.negatives == "other_class"

    def bind(self, student, teacher, facts: Mapping[str, Any]) -> None:
        n = facts.get("num_samples")
        if n is None:
            raise ConfigError(
                "loss term 'crd' keeps a memory bank row per training sample: build the method with "
                "num_samples=<training-set size> (the pipeline passes it)"
            )
        self.num_samples = int(n)
        if self.num_samples < 2:
            raise ConfigError(f"crd needs at least 2 training samples, got num_samples={n}")
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)  # uniform in [-stdv, stdv): unit expected row norm
        for name in ("memory_student", "memory_teacher"):
            self.register_buffer(name, torch.rand(self.num_samples, self.feat_dim).mul_(2 * stdv).sub_(stdv))
        # Z of the student-anchored and teacher-anchored scores; -1 = not yet estimated
        self.register_buffer("z", torch.full((2,), -1.0))
        self.register_buffer("sample_class", torch.full((self.num_samples,), UNLABELLED), persistent=False)
        self.register_buffer("class_order", torch.arange(self.num_samples), persistent=False)
        self.register_buffer("class_start", torch.zeros(1, dtype=torch.long), persistent=False)
        self.register_buffer("class_count", torch.full((1,), self.num_samples), persistent=False)

    def setup(self, shapes) -> None:
        shapes = require_shapes(shapes, "crd")
        s_dim, t_dim = flat_dim(shapes["student"]["feature"]), flat_dim(shapes["teacher"]["feature"])
        self.embed_s = LinearEmbed(s_dim, self.feat_dim, normalize=False)  # normalised in fp32 below
        self.embed_t = LinearEmbed(t_dim, self.feat_dim, normalize=False)

    def prepare(self, stats: Any) -> None:
        if not self.needs_classes:
            return
        classes = training_classes(stats)
        if len(classes) != self.num_samples:
            raise ConfigError(
                f"crd memory has {self.num_samples} rows (num_samples) but the statistics dataset has "
                f"{len(classes)} samples: both must be the training split"
            )
        self.set_classes(classes, max(int(stats.num_classes), int(classes.max()) + 1))

    def set_classes(self, classes: torch.Tensor, num_classes: int) -> None:
        """Per-index classes -> the grouped index table the samplers read (order, start, count)."""
        classes = classes.long().cpu()
        if classes.shape != (self.num_samples,) or bool((classes < 0).any()):
            raise ConfigError(
                f"crd needs one class >= 0 per training sample ({self.num_samples}), "
                f"got shape {tuple(classes.shape)}"
            )
        count = torch.bincount(classes, minlength=num_classes)
        if self.negatives == "other_class" and int(count.max()) == self.num_samples:
            raise ConfigError("crd negatives=other_class needs at least two classes in the training split")
        device = self.sample_class.device
        self.sample_class = classes.to(device)
        self.class_order = torch.argsort(classes, stable=True).to(device)
        self.class_count = count.to(device)
        self.class_start = (torch.cumsum(count, 0) - count).to(device)
        self._classes_ready = True

    # -- sampling -----------------------------------------------------------------------------------
    def _draw(self, pool: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) uniform integers in [0, pool[b]) from the global torch generator on the bank's device."""
        raw = torch.randint(0, _DRAW_HIGH, (pool.shape[0], k), device=pool.device)
        return raw % pool.unsqueeze(1)

    def sample_contrast_index(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K+1) bank rows: column 0 the positive, columns 1..K the negatives (with replacement)."""
        if self.needs_classes and not self._classes_ready:
            raise ConfigError(
                f"crd mode={self.mode}, negatives={self.negatives} needs each training sample's class: "
                "call method.prepare(stats) before training (the pipeline does)"
            )
        n, k = self.num_samples, self.nce_k
        if self.needs_classes:
            cls = self.sample_class[index]
            start, count = self.class_start[cls], self.class_count[cls]
        if self.mode == "exact":
            positive = index.unsqueeze(1)
        else:  # a random sample of the anchor's class (possibly itself)
            positive = self.class_order[start.unsqueeze(1) + self._draw(count, 1)]
        if self.negatives == "uniform":
            negative = self._draw(torch.full_like(index, n), k)
        else:  # position r in the class-grouped order with the anchor's class block cut out
            r = self._draw(n - count, k)
            negative = self.class_order[r + (r >= start.unsqueeze(1)) * count.unsqueeze(1)]
        return torch.cat([positive, negative], dim=1)

    # -- loss ---------------------------------------------------------------------------------------
    def forward(self, student, teacher, batch, ctx) -> dict[str, torch.Tensor]:
        if "index" not in batch:
            raise ConfigError("loss term 'crd' needs batch['index'] (each sample's position in the split)")
        index = torch.as_tensor(batch["index"], device=self.z.device).long().reshape(-1)
        contrast = batch.get("contrast_index")
        contrast = self.sample_contrast_index(index) if contrast is None else contrast.long()
        if contrast.shape != (index.shape[0], self.nce_k + 1):
            raise ConfigError(
                f"crd contrast_index must have shape (batch, nce_k + 1) = ({index.shape[0]}, "
                f"{self.nce_k + 1}), got {tuple(contrast.shape)}"
            )
        with torch.autocast(self.z.device.type, enabled=False):  # exp(1/T) overflows fp16
            v_s = embed(self.embed_s, student["feature"])
            v_t = embed(self.embed_t, teacher["feature"].detach())
            return self.contrast(v_s, v_t, index, contrast)

    def contrast(
        self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor, contrast: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """NCE of both anchors on the banks as they were before this step, then the bank update."""
        scores_s = contrast_scores(v_s, self.memory_teacher, contrast, self.nce_t)  # student anchor
        scores_t = contrast_scores(v_t, self.memory_student, contrast, self.nce_t)  # teacher anchor
        with torch.no_grad():  # Z from the first batch, then fixed (no host sync to test "unset")
            n = self.num_samples
            estimate = torch.stack([normalisation_constant(scores_s, n), normalisation_constant(scores_t, n)])
            world = distributed.info().world_size
            if world > 1:  # the first global batch: every rank's shard, so all ranks agree
                dist.all_reduce(estimate)
                estimate /= world
            self.z.copy_(torch.where(self.z > 0, self.z, estimate))
        z = self.z.clone()
        loss_s = nce_loss(scores_s / z[0], self.num_samples, self.eps)
        loss_t = nce_loss(scores_t / z[1], self.num_samples, self.eps)
        # every rank writes the whole global batch, so the banks stay identical across ranks
        index, v_s, v_t = (distributed.all_gather_cat(t) for t in (index, v_s, v_t))
        momentum_update_(self.memory_student, index, v_s, self.nce_m)
        momentum_update_(self.memory_teacher, index, v_t, self.nce_m)
        return {"loss": loss_s + loss_t, "student_anchor": loss_s.detach(), "teacher_anchor": loss_t.detach()}

    def extra_repr(self) -> str:
        return (
            f"N={self.num_samples}, feat_dim={self.feat_dim}, nce_k={self.nce_k}, nce_t={self.nce_t}, "
            f"nce_m={self.nce_m}, mode={self.mode}, negatives={self.negatives}"
        )


@METHODS.register("crd")
class CRDMethod(ComposedMethod):
    """CE + β·CRD (RepDistiller `-r 1 -a 0 -b 0.8`); `kd_weight: 1` adds Hinton KD at `kd_temperature`
    (the published CRD+KD)."""

    uses = (
        Use("ce", weight="ce_weight"),
        Use("kd_kl", weight="kd_weight", when="kd_weight", args={"temperature": "kd_temperature"}),
        Use("crd", weight="crd_weight", args=("feat_dim", "nce_k", "nce_t", "nce_m", "mode", "negatives")),
    )
    defaults = {"ce_weight": 1.0, "crd_weight": 0.8, "kd_weight": 0.0}
