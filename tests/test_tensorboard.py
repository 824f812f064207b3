"""TensorBoard scalars beside metrics.jsonl: written when tensorboard is installed, else nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from customkd_cache.stage_two import tensorboard


class Recorder:
    """Stands in for SummaryWriter: records what it is given."""

    made: list[Recorder] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.flushes, self.closed = log_dir, [], 0, False
        Recorder.made.append(self)

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.scalars.append((name, value, step))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


def test_numeric_metrics_become_scalars_at_the_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Recorder.made = []
    monkeypatch.setattr(tensorboard, "writer_class", lambda: Recorder)
    metrics: dict[str, Any] = {"epoch": 0, "loss_total": 1.5, "student_accuracy": 0.25, "nan": float("nan")}
    tensorboard.log_metrics(tmp_path, {**metrics, "per_split": {"a": 1}, "flag": True})
    tensorboard.log_metrics(tmp_path, {"epoch": 1, "loss_total": 1.0})
    tensorboard.close(tmp_path)
    (writer,) = Recorder.made
    assert writer.log_dir == str(tmp_path / "tensorboard")
    assert writer.scalars == [("loss_total", 1.5, 0), ("student_accuracy", 0.25, 0), ("loss_total", 1.0, 1)]
    assert writer.flushes == 2 and writer.closed


def test_without_tensorboard_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensorboard, "writer_class", lambda: None)
    tensorboard.log_metrics(tmp_path, {"epoch": 0, "loss_total": 1.0})
    tensorboard.close(tmp_path)
    assert not (tmp_path / "tensorboard").exists()
