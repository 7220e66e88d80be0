"""What stages run on: the run context (config, data, device, logger, models of earlier stages) and
the fit helper every training stage uses. It sits below the stages (which import it) and above the
engine, so plugin loading and the pipeline never have to be imported by a stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from gendd_framework.context import DataFacts
from gendd_framework.data.base import BatchDataset, DataSplits, data_facts
from gendd_framework.engine import distributed
from gendd_framework.engine.checkpoint import load as load_checkpoint
from gendd_framework.engine.checkpoint import seed_worker
from gendd_framework.engine.loggers import JsonlLogger, LoggerGroup, MetricLogger
from gendd_framework.engine.optim import build_optimizer
from gendd_framework.engine.speed import apply_speed, loader_options
from gendd_framework.engine.teacher_cache import cache_for_run, wrap_train_dataset
from gendd_framework.engine.trainer import Trainer, evaluate, optimizer_steps_per_epoch
from gendd_framework.errors import ConfigError
from gendd_framework.methods.base import required_views, unoptimised_parameters
from gendd_framework.registry import DATASETS, LOGGERS, SCHEDULERS, split_spec
from gendd_framework.schema import TrainerConfig, cache_dir, loader_config, plain

LOG = logging.getLogger("gendd_framework")


@dataclass
class RunContext:
    """What stages share: the config, data, device, logger, and models produced by earlier stages."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    data: DataSplits
    loader_cfg: dict[str, Any]
    logger: MetricLogger
    models: dict[str, nn.Module] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    method_stage: str | None = None  # the stage that built `models["method"]` (its export is student.pt)
    _facts: DataFacts | None = field(default=None, repr=False)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def facts(self) -> DataFacts:
        """What methods may know of the data at build time (read once)."""
        if self._facts is None:
            self._facts = data_facts(self.data)
        return self._facts

    def loader(
        self,
        split: str,
        *,
        shuffle_seed: int | None = None,
        all_labels: bool = False,
        wrap=None,
        views: int = 1,
    ) -> tuple[DataLoader, torch.Generator | None]:
        """Batches as mappings; the training split hides the labels outside `data.label_mask` unless
        `all_labels` (teachers train on every label), and serves `views` augmented draws of each
        sample (`input`, `input_1`, ...).

        Under DDP (and with one process alike) training batches come from this rank's shard of a
        per-epoch permutation (a DistributedSampler: `data.loader.batch_size` is per rank) and the other
        splits are sharded without padding, so evaluation covers each sample once."""
        train = split == "train"
        mask = self.data.label_mask if train and not all_labels else None
        dataset = BatchDataset(getattr(self.data, split), mask, views=views if train else 1)
        if wrap is not None:  # e.g. replayable augmentation views (engine/teacher_cache.py)
            dataset = wrap(dataset)
        # the train generator seeds the loader's workers (reseeded per epoch and rank by the Trainer)
        generator = torch.Generator() if train else None
        if generator is not None and shuffle_seed is not None:
            generator.manual_seed(shuffle_seed)
        sampler = distributed.train_sampler(dataset, seed=shuffle_seed or 0) if train else None
        if not train:
            dataset = distributed.eval_shard(dataset)
        pin = self.loader_cfg["pin_memory"]
        loader = DataLoader(
            dataset,
            batch_size=self.loader_cfg["batch_size" if train else "eval_batch_size"],
            sampler=sampler,
            drop_last=train and len(sampler) > self.loader_cfg["batch_size"],
            # workers, pinning, persistence (train workers restart each epoch unless trainer.speed says)
            **loader_options(
                self.loader_cfg["num_workers"],
                pin,
                train=train,
                device=self.device,
                speed=(self.cfg.get("trainer") or {}).get("speed"),
            ),  # fmt: skip
            worker_init_fn=seed_worker,
            generator=generator,
        )
        return loader, generator


resolve_device = distributed.device_for  # `trainer.device` -> torch.device for one process


def build_data(node: DictConfig) -> tuple[DataSplits, dict[str, Any]]:
    """The dataset's splits and its `data.loader` settings (over `schema.LOADER_DEFAULTS`)."""
    name, kwargs = split_spec(node, "dataset")
    loader_cfg = loader_config(kwargs.pop("loader", None))
    return DATASETS.build({"name": name, **kwargs}), loader_cfg


def build_logger(cfg: DictConfig, run_dir: Path) -> LoggerGroup:
    """The run's metric sinks; ranks other than 0 get none (only rank 0 writes files)."""
    if not distributed.is_main_process():
        group = LoggerGroup([])
        group.jsonl_path = None
        return group
    specs = (cfg.get("logger") or {}).get("backends") or [{"name": "jsonl"}]
    loggers: list[MetricLogger] = []
    for spec in specs:
        name, kwargs = split_spec(spec, "logger")
        if name == "wandb" and kwargs.get("config") is None:
            kwargs["config"] = OmegaConf.to_container(cfg, resolve=True)
        loggers.append(LOGGERS.build({"name": name, **kwargs}, run_dir=str(run_dir)))
    if not any(isinstance(lg, JsonlLogger) for lg in loggers):
        loggers.insert(0, JsonlLogger(str(run_dir)))
    group = LoggerGroup(loggers)
    group.jsonl_path = next(lg.path for lg in loggers if isinstance(lg, JsonlLogger))
    return group


def check_parameters(method: nn.Module, groups: list[dict], stage: str) -> None:
    """Every parameter that requires grad is optimised: else a one-line error naming them."""
    missing = unoptimised_parameters(method, groups)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ConfigError(
            f"stage '{stage}': {type(method).__name__} has parameters that require grad but are in no "
            f"param group, so they would never change: {shown}; return them from param_groups() / "
            "custom_param_groups(), or freeze them (requires_grad_(False))"
        )


def optimizer_groups(method: nn.Module, optim: Any, stage: str) -> list[dict]:
    """The method's param groups for the stage's optimizer (its weight decay), every trainable
    parameter in one: what the stage trains and what preflight checks."""
    _, opt_kwargs = split_spec(optim, "optimizer")
    groups = method.param_groups(opt_kwargs.get("weight_decay", 0.0))
    check_parameters(method, groups, stage)
    return groups


def teacher_output_cache(ctx: RunContext, method: nn.Module, trainer: TrainerConfig):
    """The run's teacher-output cache for this stage (None unless trainer.teacher_cache.mode is set)."""
    shared = cache_dir(ctx.cfg.get("paths"))
    return cache_for_run(
        method,
        trainer,
        root=shared / "teacher_outputs" if shared is not None else None,
        data_config=plain(ctx.cfg.data),
        device=ctx.device,
        train_dataset=ctx.data.train,
    )


def fit_method(
    ctx: RunContext,
    method,
    stage: str,
    *,
    optim: DictConfig | dict,
    sched: DictConfig | dict,
    trainer: TrainerConfig,
    seed: int,
    reference: nn.Module | None = None,
    all_labels: bool = False,
) -> dict[str, Any]:
    """Train `method` on train, select on val, then report test for the best-on-val and last weights.

    `reference` is the teacher that evaluation metrics (agreement, KL) compare with."""
    method.to(ctx.device)
    views = required_views(method, ctx.facts.sample_keys)  # one-line error for keys the data lacks
    applied = apply_speed(method, trainer.speed)
    groups = optimizer_groups(method, optim, stage)
    cache = teacher_output_cache(ctx, method, trainer)
    if applied or cache is not None:
        where = cache.stats().get("folder", "off") if cache is not None else "off"
        LOG.info("%s: speed options %s; teacher cache %s", stage, applied, where)
    train_loader, generator = ctx.loader(
        "train",
        shuffle_seed=seed,
        all_labels=all_labels,
        wrap=lambda d: wrap_train_dataset(d, cache),
        views=views,
    )
    optimizer = build_optimizer(optim, groups)
    scheduler = SCHEDULERS.build(
        sched,
        optimizer=optimizer,
        steps_per_epoch=optimizer_steps_per_epoch(len(train_loader), trainer.accum_steps),
        epochs=trainer.epochs,
    )
    loop = Trainer(
        method,
        optimizer,
        scheduler,
        train_loader,
        ctx.loader("val")[0],
        config=trainer,
        device=ctx.device,
        ckpt_dir=ctx.ckpt_dir,
        stage=stage,
        logger=ctx.logger,
        shuffle_seed=seed,
        shuffle_generator=generator,
        reference=reference,
    )
    best = loop.fit()
    if cache is not None:
        cache.flush()
        LOG.info("%s: teacher cache %s", stage, cache.stats())
    record = test_record(ctx, method, loop, best, trainer, reference)
    if cache is not None:
        record["teacher_cache"] = cache.stats()
    return record


def test_record(
    ctx: RunContext, method: nn.Module, loop: Trainer, best: dict, trainer: TrainerConfig, reference
) -> dict[str, Any]:
    """Test metrics of the last weights, then of the best-on-val weights (left loaded in `method`),
    with the selection record; the test row goes to the metric log."""
    distributed.barrier()  # rank 0's best checkpoint is on disk before any rank reads it
    test_loader, _ = ctx.loader("test")
    test_last = evaluate(method, test_loader, ctx.device, trainer.precision, reference)
    if loop.path("best").exists():
        method.load_state_dict(load_checkpoint(loop.path("best"))["method"])
    test = evaluate(method, test_loader, ctx.device, trainer.precision, reference)
    record = {"best_epoch": best["epoch"], "val": best["metrics"], "test": test, "test_last": test_last}
    record["select"] = loop.select  # the validation metric that picked `best_epoch` (Optuna's objective)
    if method.eval_settings():
        record["eval_settings"] = method.eval_settings()
    ctx.logger.log(
        {
            "stage": loop.stage,
            "epoch": trainer.epochs,
            "step": loop.step,
            **{f"test/{k}": v for k, v in test.items()},
        }
    )
    return record
