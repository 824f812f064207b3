"""The state of a stage-two run: what ``prepare_run`` resolves (``Run``) and what a checkpoint
holds besides the models (``TrainState``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from customkd_cache.data import Dataset
from customkd_cache.distributed import Dist
from customkd_cache.specs import TrainSpec
from customkd_cache.stage_two.build import Models
from customkd_cache.stage_two.probe import Probe
from customkd_cache.stage_two.protocols import Protocol
from customkd_cache.stage_two.replay import FeatureSource, ReplayDataset
from customkd_cache.store import FeatureStore


@dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    step: int = 0
    best_accuracy: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Run:
    spec: TrainSpec
    out: Path
    dataset: Dataset
    store: FeatureStore
    protocol: Protocol
    features: FeatureSource
    probe: Probe
    models: Models
    replay: ReplayDataset
    num_classes: int
    stats: tuple[np.ndarray, np.ndarray] | None  # (mean, std) used to standardize f_t
    labeled: tuple[np.ndarray, np.ndarray]  # (k*V, D) features and labels of the labeled rows
    dist: Dist
    device: torch.device
    teacher: Any = None  # the online teacher, when teacher_mode = "online"
    bound_pixels: torch.Tensor | None = None  # (<= BOUND_ROWS, 3, s, s) labeled images, made once


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (a diverged epoch's loss is logged as NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def state_from_checkpoint(saved: Any, *, epochs: int) -> TrainState:
    """The ``TrainState`` a checkpoint holds, checked against itself and the spec's ``epochs``.

    Raises ValueError saying what is wrong (one line): fields missing, unknown or of the wrong type,
    ``epoch`` outside ``0..epochs``, a history that is not one metrics record per finished epoch, or
    a best epoch/accuracy that the history does not show.
    """
    if not isinstance(saved, dict):
        raise ValueError(f"state is a {type(saved).__name__}, not a mapping")
    names = [f.name for f in fields(TrainState)]
    unknown = sorted(str(k) for k in saved if k not in names)
    missing = [k for k in names if k not in saved]
    if unknown or missing:
        raise ValueError(f"state fields differ (unknown: {unknown or 'none'}; missing: {missing or 'none'})")
    state = TrainState(**saved)
    for name in ("epoch", "step", "best_epoch"):
        if not _is_int(getattr(state, name)):
            raise ValueError(f"state.{name} = {getattr(state, name)!r} is not an integer")
    if not 0 <= state.epoch <= epochs:
        raise ValueError(f"state.epoch = {state.epoch}: outside 0..{epochs}, the epochs of the spec")
    if state.step < 0:
        raise ValueError(f"state.step = {state.step} is negative")
    history = state.history
    if not isinstance(history, list) or not all(isinstance(m, dict) for m in history):
        raise ValueError("state.history is not a list of metrics records")
    if len(history) != state.epoch:
        raise ValueError(f"state.history holds {len(history)} epoch(s), state.epoch says {state.epoch}")
    wrong = next((i for i, m in enumerate(history) if not _is_int(m.get("epoch")) or m["epoch"] != i), None)
    if wrong is not None:
        raise ValueError(f"state.history[{wrong}] is epoch {history[wrong].get('epoch')!r}, not {wrong}")
    best, best_epoch = state.best_accuracy, state.best_epoch
    if not _is_number(best) or not (best == -1 or 0 <= best <= 1):
        raise ValueError(f"state.best_accuracy = {best!r}: not an accuracy in [0, 1] (or -1, none yet)")
    if best_epoch == -1:
        if best != -1:
            raise ValueError(f"state.best_accuracy = {best!r} without a best epoch")
    elif not 0 <= best_epoch < state.epoch or not _same(history[best_epoch].get("student_accuracy"), best):
        raise ValueError(
            f"state.best_epoch = {best_epoch} with accuracy {best!r}: not what state.history records"
        )
    return state


def check_metrics_lines(lines: list[str], history: list[dict[str, Any]]) -> None:
    """Raise ValueError unless ``lines`` (metrics.jsonl, one record per line) begin with the records of
    ``history``: the run directory's log and its checkpoint tell the same run. Lines beyond the history
    (logged, then killed before the checkpoint) are not checked."""
    if len(lines) < len(history):
        raise ValueError(f"holds {len(lines)} epoch line(s), the checkpoint {len(history)}")
    for i, (line, record) in enumerate(zip(lines, history, strict=False)):
        try:
            logged, saved = json.loads(line), json.loads(json.dumps(record, sort_keys=True))
        except (TypeError, ValueError):
            raise ValueError(f"line {i + 1} or the checkpoint's record of epoch {i} is not JSON") from None
        if not _same(logged, saved):
            raise ValueError(f"line {i + 1} (epoch {i}) differs from the checkpoint's record of that epoch")
