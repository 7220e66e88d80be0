"""Metric sinks. JSONL is always written; CSV, TensorBoard and wandb (offline works) are opt-in by name."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from gendd_framework.registry import LOGGERS


class MetricLogger:
    """Receives flat metric records (`{"stage":..., "epoch":..., "step":..., "train/loss": ...}`)."""

    def log(self, record: dict[str, Any]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@LOGGERS.register("jsonl")
class JsonlLogger(MetricLogger):
    """One JSON object per line in `<run_dir>/metrics.jsonl` (greppable, diffable, appended)."""

    def __init__(self, run_dir: str, filename: str = "metrics.jsonl") -> None:
        self.path = Path(run_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")


@LOGGERS.register("csv")
class CsvLogger(MetricLogger):
    """`<run_dir>/metrics.csv` with the union of all columns, rewritten from the JSONL on close."""

    def __init__(self, run_dir: str, filename: str = "metrics.csv", source: str = "metrics.jsonl") -> None:
        self.path = Path(run_dir) / filename
        self.source = Path(run_dir) / source

    def log(self, record: dict[str, Any]) -> None:
        pass  # derived from the JSONL at close, so resumed runs stay consistent

    def close(self) -> None:
        if not self.source.exists():
            return
        rows = [json.loads(line) for line in self.source.read_text().splitlines() if line.strip()]
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with self.path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


@LOGGERS.register("tensorboard")
class TensorBoardLogger(MetricLogger):
    """TensorBoard event files under `<run_dir>/tensorboard` (needs the `tensorboard` package)."""

    def __init__(self, run_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        prefix = record.get("stage", "")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


@LOGGERS.register("wandb")
class WandbLogger(MetricLogger):
    """Weights & Biases; `mode: offline` needs no account or network (sync later with `wandb sync`)."""

    def __init__(
        self,
        run_dir: str,
        project: str = "gendd",
        mode: str = "offline",
        config: dict | None = None,
        name: str | None = None,
        group: str | None = None,
    ) -> None:
        import wandb

        self.run = wandb.init(
            project=project,
            mode=mode,
            dir=run_dir,
            config=config,
            name=name,
            group=group,
            reinit="create_new",
        )

    def log(self, record: dict[str, Any]) -> None:
        nums = {f"{record.get('stage', '')}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
        self.run.log(nums)

    def close(self) -> None:
        self.run.finish()


class LoggerGroup(MetricLogger):
    """Fan-out to several loggers."""

    def __init__(self, loggers: list[MetricLogger]) -> None:
        self.loggers = loggers

    def log(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def truncate_jsonl(path: Path, stage: str, max_step: int) -> None:
    """Drop records of `stage` logged after `max_step` (a resumed run rewrites what it re-does)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip()
        and not (json.loads(line).get("stage") == stage and json.loads(line).get("step", 0) > max_step)
    ]
    path.write_text("".join(line + "\n" for line in kept))
