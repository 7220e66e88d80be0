"""Metric sinks: TensorBoard hparams, the end-of-run `finish` fan-out, wandb resume, tolerant CSV."""

from __future__ import annotations

import json
import logging

import pytest

from gendd_framework.engine.loggers import (
    CsvLogger,
    LoggerGroup,
    MetricLogger,
    TensorBoardLogger,
    WandbLogger,
    flatten_hparams,
)

HPARAMS = {
    "seed": 3,
    "method": {"name": "kd", "temperature": 4.0, "hard": True},
    "sched": {"milestones": [150, 180], "warmup": None},
}
FLAT = {  # HPARAMS flattened by hand: dotted keys, scalars kept, lists and None as strings
    "seed": 3,
    "method.name": "kd",
    "method.temperature": 4.0,
    "method.hard": True,
    "sched.milestones": "[150, 180]",
    "sched.warmup": "None",
}
FINAL = {"distill": {"test": {"acc/student": 91.5, "ce/student": float("nan")}}, "elapsed_s": 12.0}


def test_flatten_hparams_keeps_scalars_and_strings():
    assert flatten_hparams(HPARAMS) == FLAT


def test_tensorboard_writes_hparams_and_final_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    logger = TensorBoardLogger(str(tmp_path))
    logger.log({"stage": "distill", "epoch": 1, "step": 4, "train/loss": 0.5})
    LoggerGroup([logger]).finish(HPARAMS, FINAL)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["method.name"].string_value == "kd"
    assert hparams["method.temperature"].number_value == 4.0
    assert hparams["sched.milestones"].string_value == "[150, 180]"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert metrics == {"distill/test/acc/student", "elapsed_s"}  # the NaN one is left out
    scalars = events.Tags()["scalars"]
    assert "distill/train/loss" in scalars and "distill/test/acc/student" in scalars
    assert events.Scalars("distill/test/acc/student")[0].value == pytest.approx(91.5)


class Recorder(MetricLogger):
    def __init__(self) -> None:
        self.finished: list[tuple] = []

    def log(self, record) -> None:
        pass

    def finish(self, hparams, final_metrics) -> None:
        self.finished.append((hparams, final_metrics))


class Broken(Recorder):
    def finish(self, hparams, final_metrics) -> None:
        raise OSError("disk full")


class DuckTyped:  # a plugin sink with log/close only
    def log(self, record) -> None:
        pass

    def close(self) -> None:
        pass


def test_group_finish_reaches_every_sink_that_has_it(caplog):
    first, last = Recorder(), Recorder()
    group = LoggerGroup([first, Broken(), DuckTyped(), MetricLogger(), last])
    with caplog.at_level(logging.WARNING, logger="gendd_framework"):
        group.finish(HPARAMS, FINAL)
    assert first.finished == last.finished == [(HPARAMS, FINAL)]
    assert any("Broken" in r.getMessage() and "disk full" in r.getMessage() for r in caplog.records)


def test_finish_calls_add_hparams_with_flat_values(tmp_path):
    pytest.importorskip("tensorboard")
    calls = []

    class FakeWriter:
        def add_hparams(self, hparams, metrics, **kwargs) -> None:
            calls.append((hparams, metrics))

        def flush(self) -> None:
            pass

    logger = TensorBoardLogger.__new__(TensorBoardLogger)
    logger.writer = FakeWriter()
    logger.finish(HPARAMS, FINAL)
    assert calls == [(FLAT, {"distill/test/acc/student": 91.5, "elapsed_s": 12.0})]  # NaN CE left out


def test_wandb_offline_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = WandbLogger(str(tmp_path), config={"seed": 1})
    first.log({"stage": "distill", "step": 1, "train/loss": 0.5})
    first.finish(HPARAMS, FINAL)
    assert first.run.summary["distill/test/acc/student"] == 91.5
    first.close()
    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    assert run_id == first.run.id
    second = WandbLogger(str(tmp_path), config={"seed": 1})
    assert second.run.id == run_id
    second.close()
    other = WandbLogger(str(tmp_path / "other"))
    assert other.run.id != run_id
    other.close()


def test_csv_skips_a_half_written_line(tmp_path):
    rows = [{"stage": "a", "step": 1, "x": 1.0}, {"stage": "a", "step": 2, "y": 2.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"stage": "a", "st')
    logger = CsvLogger(str(tmp_path))
    logger.close()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["stage,step,x,y", "a,1,1.0,", "a,2,,2.0"]
