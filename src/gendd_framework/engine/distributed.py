"""Distributed data parallel with one code path for 1 or N processes.

`setup()` reads the launcher's environment: `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
or a task of a submitit job (Hydra's `submitit_slurm` / `submitit_local` launchers, mapped with
`submitit.helpers.TorchDistributedEnvironment`). With more than one process it starts the process group
(NCCL for CUDA devices, gloo for the CPU) and gives every rank its device (`cuda:LOCAL_RANK`).
With one process nothing is started and every helper below is a no-op, so the single-process run and
rank 0 of an N-process run execute the same lines.

What runs where: every rank trains on its shard of each batch (`train_sampler`: a DistributedSampler
re-shuffled per epoch with `set_epoch`) and evaluates its strided shard of each split (`eval_shard`:
no padding duplicates); metrics are gathered from every rank and summed, so they are over the whole
split exactly once. DDP wraps `TrainStep`, a module whose forward is the method's training step and
whose parameters are exactly the optimizer's: the frozen teacher and anything not optimised stay
outside it. Buffers (BatchNorm running statistics) are broadcast from rank 0 after every epoch, so all
ranks evaluate and checkpoint the same model. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from gendd_framework.errors import ConfigError

LOG = logging.getLogger("gendd_framework")
DEFAULT_TIMEOUT = timedelta(minutes=30)
_started_here = False  # True when setup() created the process group (so shutdown() may destroy it)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among `world_size` processes and the backend in use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def info() -> DistInfo:
    """The current process group's view (rank 0 of 1 when none is running)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


def rank() -> int:
    """This process's rank, also after the group is shut down (from the launcher's environment)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def _submitit_tasks() -> int:
    """Number of tasks of the submitit job this process belongs to (0 outside submitit)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return 0
    try:
        import submitit
    except ImportError:
        return 0
    return submitit.JobEnvironment().num_tasks


def _export_submitit_env() -> None:
    """Each task of a submitit job is one rank: export RANK/WORLD_SIZE/MASTER_* for `env://`."""
    from submitit.helpers import TorchDistributedEnvironment

    # CUDA_VISIBLE_DEVICES is left as SLURM set it: the rank picks cuda:LOCAL_RANK (see `device_for`)
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def device_for(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """`trainer.device` as a torch.device (one process by default): `auto` is CUDA when available,
    else the CPU; with several ranks `auto`/`cuda` become `cuda:LOCAL_RANK`. A CUDA device with an
    index becomes the current one (for the collectives and `torch.cuda` calls without a device)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but CUDA is not available; use trainer.device=auto or cpu")
    if world_size > 1:
        if device.index is not None:
            raise ConfigError(
                f"trainer.device={name} with {world_size} ranks: use trainer.device=cuda "
                "(each rank takes cuda:LOCAL_RANK)"
            )
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.index is not None:  # torch.cuda.set_device refuses a bare "cuda"
        torch.cuda.set_device(device)
    return device


def setup(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Start the process group if the launcher asked for several processes; return (info, device).

    Idempotent: a group started earlier (by a test or an outer script) is reused as it is."""
    global _started_here
    if dist.is_available() and dist.is_initialized():
        current = info()
        return current, device_for(device_name, current.local_rank, current.world_size)
    if "RANK" not in os.environ and _submitit_tasks() > 1:
        _export_submitit_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device_for(device_name, local_rank, world_size)
    if world_size <= 1:
        return DistInfo(), device
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": DEFAULT_TIMEOUT}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    _started_here = True
    current = info()
    if not current.is_main:
        quiet_logging()
    LOG.info("distributed: %d ranks, backend %s, rank 0 on %s", current.world_size, backend, device)
    return current, device


def shutdown() -> None:
    """Destroy the process group if `setup` created it."""
    global _started_here
    if _started_here and dist.is_initialized():
        dist.destroy_process_group()
    _started_here = False


def quiet_logging() -> None:
    """Ranks other than 0 log warnings only, and never to a file (the run's log is rank 0's)."""
    LOG.setLevel(logging.WARNING)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


# -- collectives (no-ops with one process) -------------------------------------------------------------
def barrier() -> None:
    if info().enabled:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank."""
    if not info().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    current = info()
    if not current.enabled:
        return [obj]
    out: list[Any] = [None] * current.world_size
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: torch.Tensor | bool) -> bool:
    """True when `flag` holds on every rank (one tiny all-reduce; a host read with one process)."""
    current = info()
    if not current.enabled:
        return bool(flag)
    device = flag.device if isinstance(flag, torch.Tensor) else torch.device("cpu")
    if current.backend == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.as_tensor(flag, dtype=torch.int32, device=device).reshape(1).clone()
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (equal shapes on all ranks) concatenated along dim 0 in rank order, no
    gradient: what a per-sample memory (CRD's banks) needs so that every rank applies every rank's
    update and the memories stay identical. The input itself with one process."""
    current = info()
    if not current.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(current.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def mean_over_ranks(sums: Mapping[str, float], count: int) -> tuple[dict[str, float], int]:
    """Per-key totals and the sample count summed over ranks (train records are over every rank)."""
    gathered = all_gather_object((dict(sums), count))
    total = sum(c for _, c in gathered)
    keys = list(sums)
    return {k: sum(s.get(k, 0.0) for s, _ in gathered) for k in keys}, total


def agree(run_dir: str, payload: Any) -> tuple[str, Any]:
    """Rank 0's run directory and config on every rank: ranks composed their configs separately
    (under torchrun a `${now:}` run dir can differ by a second between processes)."""
    return broadcast_object((str(run_dir), payload))


# -- seeding -----------------------------------------------------------------------------------------
def rank_seed(seed: int, rank_: int) -> int:
    """A seed per (seed, rank): independent augmentation and noise draws on every rank."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(rank_)]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> 1)  # < 2**63: valid for torch.manual_seed


# -- data --------------------------------------------------------------------------------------------
def train_sampler(dataset: Dataset, seed: int) -> DistributedSampler:
    """This rank's shard of a shuffled epoch; the permutation depends only on (seed, epoch)."""
    current = info()
    return DistributedSampler(
        dataset, num_replicas=current.world_size, rank=current.rank, shuffle=True, seed=int(seed)
    )


class EvalShard(Subset):
    """Samples rank, rank + W, rank + 2W, ... of a split: no padding, so the ranks' shards cover the
    split exactly once; `full_size` lets the evaluation check that after gathering."""

    def __init__(self, dataset: Dataset, rank_: int, world_size: int) -> None:
        super().__init__(dataset, range(rank_, len(dataset), world_size))
        self.full_size, self.world_size = len(dataset), world_size


def eval_shard(dataset: Dataset) -> Dataset:
    """This rank's shard of an evaluation split (the whole split with one process)."""
    current = info()
    if not current.enabled:
        return dataset
    return EvalShard(dataset, current.rank, current.world_size)


# -- the module DDP wraps ----------------------------------------------------------------------------
class TrainStep(nn.Module):
    """What DDP wraps: forward = `method.training_step`; parameters = the optimizer's parameters only.

    The method itself is held outside the module tree, so DDP never sees the frozen teacher, and
    parts a stage does not optimise (FitNet's later layers in the hint stage) are not synchronised."""

    def __init__(self, method: nn.Module, params: Iterable[nn.Parameter]) -> None:
        super().__init__()
        self._method = (method,)  # a tuple: not registered as a submodule
        unique = {id(p): p for p in params if p.requires_grad}
        self.params = nn.ParameterList(unique.values())

    def forward(self, batch: Mapping[str, Any], ctx: Any) -> dict[str, torch.Tensor]:
        return self._method[0].training_step(batch, ctx)


def method_state(method: nn.Module, params: Iterable[torch.Tensor] = ()) -> list[torch.Tensor]:
    """`params` (the optimizer's), then every other parameter and buffer the method owns, each once,
    in a fixed order: what every rank must start from and keep equal to rank 0's. A frozen `teacher`
    is left out (loaded alike everywhere, never changed); one that changes (`teacher_is_frozen`
    False: an EMA teacher) is included."""
    frozen = getattr(method, "teacher_is_frozen", True)
    named = [*method.named_parameters(remove_duplicate=False), *method.named_buffers(remove_duplicate=False)]
    own = [t for name, t in named if not (frozen and name.startswith("teacher."))]
    return list({id(t): t for t in [*params, *own]}.values())


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank `src`'s `tensors` into every rank's (no-op with one process)."""
    if not info().enabled:
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=src)


def convert_sync_bn(modules: Iterable[nn.Module]) -> int:
    """Swap every BatchNorm inside `modules` for `nn.SyncBatchNorm` in place (forward hooks such as
    feature taps move with it); returns how many were converted."""
    converted = 0
    for module in modules:
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
                    child, nn.SyncBatchNorm
                ):
                    new = nn.SyncBatchNorm.convert_sync_batchnorm(child)
                    new._forward_hooks.update(child._forward_hooks)
                    new._forward_pre_hooks.update(child._forward_pre_hooks)
                    setattr(parent, name, new)
                    converted += 1
    return converted


class StepRunner:
    """Runs the training step: through DDP with several ranks, directly with one."""

    def __init__(
        self,
        method: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        *,
        sync_bn: bool = False,
        find_unused_parameters: bool = False,
    ) -> None:
        self.method = method
        self.find_unused = find_unused_parameters
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self.optimised: set[int] = set()  # ids of the optimizer's parameters (DDP all-reduces them)
        current = info()
        if not current.enabled:
            return
        if sync_bn:
            if device.type != "cuda":
                raise ConfigError(
                    "trainer.sync_bn=true needs CUDA devices (torch's SyncBatchNorm synchronises GPU "
                    "tensors only); use trainer.sync_bn=false on the CPU"
                )
            trainable = [m for name, m in method.named_children() if name != "teacher"]
            LOG.info("sync_bn: %d BatchNorm layers synchronised across ranks", convert_sync_bn(trainable))
        # TrainStep holds parameters only: buffers stay outside DDP and are broadcast after each epoch
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.optimised = {id(p) for p in params}
        broadcast_tensors(method_state(method, params))  # every rank starts from rank 0's state
        self.ddp = nn.parallel.DistributedDataParallel(
            TrainStep(method, params),
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )

    def __call__(self, batch: Mapping[str, Any], ctx: Any) -> dict[str, torch.Tensor]:
        if self.ddp is None:
            return self.method.training_step(batch, ctx)
        try:
            return self.ddp(batch, ctx)
        except RuntimeError as exc:
            if "find_unused_parameters" in str(exc) and not self.find_unused:
                raise ConfigError(
                    "some optimised parameters got no gradient in a step under DDP; set "
                    "trainer.find_unused_parameters=true"
                ) from exc
            raise

    def sync(self, enabled: bool):
        """Context for one micro-batch: gradients are all-reduced only when `enabled` (the last
        micro-batch of an accumulation group); the others accumulate locally (`no_sync`)."""
        if self.ddp is None or enabled:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm running statistics, term memories, an EMA's state) on every
        rank: every buffer the method owns outside its frozen teacher, and parameters that no optimizer
        updates but a hook may (an EMA teacher's weights)."""
        if self.ddp is None:
            return
        broadcast_tensors(t for t in method_state(self.method) if id(t) not in self.optimised)
