"""TensorBoard scalars beside ``metrics.jsonl`` when the ``tensorboard`` package is installed.

``pip install 'customkd-cache[tensorboard]'`` (or ``tensorboard`` alone); without it nothing is
written and nothing fails. Each epoch's numeric metrics (losses, accuracies, seconds) become scalars
at step = epoch in ``RUN_DIR/tensorboard/`` (``tensorboard --logdir RUN_DIR``); the writer of a run is
opened at its first epoch, flushed after every epoch (a killed run keeps what it logged) and closed by
``close`` at the end of the run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from customkd_cache.files import ensure_dir

_writers: dict[Path, Any] = {}


def writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises ImportError naming tensorboard when it is missing
        return None
    return SummaryWriter


def log_metrics(out: Path, metrics: dict[str, Any]) -> None:
    """Add every finite number of ``metrics`` (booleans aside) at step ``metrics["epoch"]``."""
    cls = writer_class()
    if cls is None:
        return
    key = Path(out)
    if key not in _writers:  # a link planted at RUN_DIR/tensorboard is refused, never followed
        _writers[key] = cls(log_dir=str(ensure_dir(key / "tensorboard", within=key)))
    writer = _writers[key]
    step = int(metrics.get("epoch", 0))
    for name, value in metrics.items():
        if name == "epoch" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            writer.add_scalar(name, value, step)
    writer.flush()


def close(out: Path) -> None:
    """Close the run's writer, if one was opened."""
    writer = _writers.pop(Path(out), None)
    if writer is not None:
        writer.close()
