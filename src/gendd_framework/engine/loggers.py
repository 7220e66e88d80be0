"""Metric sinks. JSONL is always written; CSV, TensorBoard and wandb (offline works) are opt-in by name."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gendd_framework.engine.checkpoint import atomic_write
from gendd_framework.registry import LOGGERS

LOG = logging.getLogger("gendd_framework")


class MetricLogger:
    """Receives flat metric records (`{"stage":..., "epoch":..., "step":..., "train/loss": ...}`)."""

    def log(self, record: dict[str, Any]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self, hparams: Mapping[str, Any], final_metrics: Mapping[str, Any]) -> None:
        """End-of-run summary (the config and the final metrics); sinks without one ignore it."""

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
        drop_partial_line(self.path)  # a kill mid-write must not glue the next record onto garbage
        for stale in self.path.parent.glob(f".{filename}.*.tmp"):  # a rewrite killed midway
            stale.unlink(missing_ok=True)

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
        rows = read_jsonl(self.source)
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

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        """The HParams dashboard row: flattened config (scalars and strings) and finite final metrics,
        written into this run's folder so it sits next to the curves."""
        flat = flatten_hparams(hparams)
        scalars = {k: float(v) for k, v in flatten(metrics).items() if _finite_number(v)}
        self.writer.add_hparams(flat, scalars, run_name=".")
        self.writer.flush()

    def finish(self, hparams: Mapping[str, Any], final_metrics: Mapping[str, Any]) -> None:
        self.log_hparams(hparams, final_metrics)

    def close(self) -> None:
        self.writer.close()


@LOGGERS.register("wandb")
class WandbLogger(MetricLogger):
    """Weights & Biases; `mode: offline` needs no account or network (sync later with `wandb sync`).

    The run id is kept in `<run_dir>/wandb_run_id.txt`, so a resumed run continues the same wandb run."""

    ID_FILE = "wandb_run_id.txt"

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

        id_file = Path(run_dir) / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        resume = {"id": run_id, "resume": "allow"} if run_id else {}
        self.run = wandb.init(
            project=project,
            mode=mode,
            dir=run_dir,
            config=config,
            name=name,
            group=group,
            reinit="create_new",
            **resume,
        )
        if not run_id and not getattr(self.run, "disabled", False):
            atomic_write_text(id_file, f"{self.run.id}\n")

    def log(self, record: dict[str, Any]) -> None:
        nums = {f"{record.get('stage', '')}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
        self.run.log(nums)

    def finish(self, hparams: Mapping[str, Any], final_metrics: Mapping[str, Any]) -> None:
        nums = {k: v for k, v in flatten(final_metrics).items() if _finite_number(v)}
        self.run.summary.update(nums)

    def close(self) -> None:
        self.run.finish()


class LoggerGroup(MetricLogger):
    """Fan-out to several loggers."""

    def __init__(self, loggers: list[MetricLogger]) -> None:
        self.loggers = loggers

    def log(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def finish(self, hparams: Mapping[str, Any], final_metrics: Mapping[str, Any]) -> None:
        """Forward to every sink that has `finish`; one failing sink must not lose the others' summary."""
        for logger in self.loggers:
            finish = getattr(logger, "finish", None)
            if finish is None:
                continue
            try:
                finish(hparams, final_metrics)
            except Exception as exc:  # a summary sink is best effort: the JSONL and summary.json remain
                LOG.warning("logger %s could not write its summary: %s", type(logger).__name__, exc)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested mappings as one level of `a/b/c` keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out


def flatten_hparams(hparams: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """What `add_hparams` accepts: bools, numbers and strings; lists become JSON text, None "None"."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in flatten(hparams, sep=".").items():
        if isinstance(value, (bool, int, float, str)):
            flat[key] = value
        elif value is None:
            flat[key] = "None"
        else:
            flat[key] = json.dumps(value, default=str)
    return flat


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file + rename (`checkpoint.atomic_write`): a kill leaves the old or the new file."""
    atomic_write(path, lambda fh: fh.write(text.encode()))


def _parse(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def drop_partial_line(path: Path) -> None:
    """Cut a trailing line without its newline (a write killed midway) so appends start clean."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    LOG.warning("dropping a half-written last line of %s", path)
    with path.open("r+b") as fh:
        fh.truncate(keep)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every parsable record; unparsable lines (a killed write) are skipped, not fatal."""
    if not path.exists():
        return []
    rows = [_parse(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row is not None]


def count_rows(path: Path, stage: str) -> int:
    """Records of `stage` in the JSONL: stored in checkpoints so a resume keeps exactly those."""
    return sum(1 for row in read_jsonl(path) if row.get("stage") == stage)


def truncate_jsonl(path: Path, stage: str, max_step: int, keep_rows: int | None = None) -> None:
    """Drop records of `stage` logged after its checkpoint: a resumed run rewrites what it re-does.

    With `keep_rows` (the stage's record count when the checkpoint was written) the first `keep_rows`
    records of the stage stay, which also drops same-step rows logged after the checkpoint (a test
    row, a repeated event); without it, records with a step above `max_step` go. Unparsable lines
    are dropped. The rewrite is atomic."""
    if not path.exists():
        return
    kept, seen, dropped_bad = [], 0, 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = _parse(line)
        if row is None:
            dropped_bad += 1
            continue
        if row.get("stage") == stage:
            seen += 1
            late = seen > keep_rows if keep_rows is not None else row.get("step", 0) > max_step
            if late:
                continue
        kept.append(line)
    if dropped_bad:
        LOG.warning("dropped %d unparsable line(s) of %s", dropped_bad, path)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
