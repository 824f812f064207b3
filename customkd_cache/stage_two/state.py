"""The state of a stage-two run: what ``prepare_run`` resolves (``Run``) and what a checkpoint
holds besides the models (``TrainState``)."""

from __future__ import annotations

from dataclasses import dataclass, field
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
