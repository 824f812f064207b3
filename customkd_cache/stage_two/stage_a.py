"""The teacher probe and stage A: feature customization (``P_t``) from cached features and labels only."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from customkd_cache.specs import TrainSpec
from customkd_cache.stage_two.build import to_feature_space
from customkd_cache.stage_two.losses import customization_loss
from customkd_cache.stage_two.precision import run_autocast
from customkd_cache.stage_two.probe import Probe, train_probe
from customkd_cache.stage_two.replay import FeatureSource, Row
from customkd_cache.stage_two.stage_b import to_device
from customkd_cache.stage_two.state import Run
from customkd_cache.store import FeatureStore

BOUND_ROWS = 128  # labeled images whose student features set the target bound (student_rms)


def stage_a_cycles(run: Run, epoch: int) -> int:
    """How many stage-A cycles run in ``epoch``: ``stage_a_per_epoch`` when due, else 0.

    Due every ``stage_a_every``-th epoch (epochs 0, N, 2N, ...), or only in epoch 0 when it is 0.
    """
    ck = run.spec.customkd
    if run.models.customizer is None or ck.stage_a_steps == 0:
        return 0
    due = epoch == 0 if ck.stage_a_every == 0 else epoch % ck.stage_a_every == 0
    return ck.stage_a_per_epoch if due else 0


def fit_probe(
    spec: TrainSpec,
    labeled: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    raw_stats: tuple[np.ndarray, np.ndarray] | None,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> Probe:
    """The teacher probe: a linear classifier on the labeled rows' cached features (``labeled``,
    every view in use, see ``labeled_features``).

    It standardizes with the statistics of the whole training splits (``raw_stats`` when the
    features come unstandardized, else none is needed): statistics of the few labeled rows alone
    have near-zero spreads in some dimensions and give the probe unbounded logits elsewhere.
    It trains on ``device`` (the run's) and is returned there.
    """
    feats, labels = labeled
    d = feats.shape[1]
    mean, std = raw_stats if raw_stats is not None else (np.zeros(d, np.float32), np.ones(d, np.float32))
    return train_probe(
        torch.from_numpy(feats),
        torch.from_numpy(labels),
        num_classes=num_classes,
        spec=spec.probe,
        seed=spec.seed,
        mean=torch.from_numpy(mean),
        std=torch.from_numpy(std),
        device=device,
        precision=precision,
    )


def labeled_features(
    features: FeatureSource, store: FeatureStore, rows: list[Row], views: int
) -> tuple[np.ndarray, np.ndarray]:
    """(k*V, D) features of every view of ``rows`` and their (k*V,) labels."""
    by_split: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        by_split[r.split].append(r.row)
    xs, ys = [], []
    for split, idx in by_split.items():
        arr = features.all_views(split, np.asarray(idx))[:, :views]  # (k, V, D)
        labels = store.labels(split)[np.asarray(idx)]
        xs.append(arr.reshape(-1, arr.shape[-1]))
        ys.append(np.repeat(labels, arr.shape[1]))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)


def train_stage_a(run: Run, epoch: int, cycle: int) -> dict[str, Any]:
    """One stage-A cycle: ``customkd.stage_a_steps`` optimizer steps of CE(H(P_t(f_t)), y).

    Each step draws ``stage_a_batch_size`` labeled (row, view) pairs with replacement, seeded by
    ``(seed, epoch, cycle)``. ``H`` is the student's head (fixed unless
    ``customkd.head_learns_in_stage_a``) or, with ``stage_a_head = separate``, a teacher head that
    learns with ``P_t``. The bound on ``P_t``'s output is set first (``set_target_bound``). A cycle
    stops early once a step's CE is below ``stage_a_ce_target`` (when > 0). Returns the steps run and
    ``stage_a_report``'s figures.

    Under several ranks rank 0 alone trains and then broadcasts ``P_t`` (parameters and buffers, the
    bound included) and the head when it learned, so every rank's stage B distills toward the same
    target (ranks training on their own would drift apart with the GPU's non-deterministic sums);
    the other ranks return ``stage_a_steps = 0`` and no figures (rank 0 writes the metrics).
    """
    models, ck, dist = run.models, run.spec.customkd, run.dist
    assert models.customizer is not None and models.opt_a is not None  # stage_a_cycles checked
    customizer = models.customizer
    head = models.stage_a_head if models.stage_a_head is not None else models.student.head()
    learns = models.stage_a_head is not None or ck.head_learns_in_stage_a
    if dist.world > 1:  # rank 0 trains, every rank then holds rank 0's P_t (and head, when it learns)
        report = _train_stage_a(run, epoch, cycle, head, learns) if dist.is_main else {"stage_a_steps": 0}
        dist.broadcast_module(customizer)
        if learns:
            dist.broadcast_module(head)
        return report
    return _train_stage_a(run, epoch, cycle, head, learns)


def _train_stage_a(run: Run, epoch: int, cycle: int, head: nn.Module, learns: bool) -> dict[str, Any]:
    models, ck = run.models, run.spec.customkd
    assert models.customizer is not None and models.opt_a is not None
    customizer, opt = models.customizer, models.opt_a
    bound = set_target_bound(run)
    feats = torch.from_numpy(run.labeled[0]).to(run.device)
    labels = torch.from_numpy(run.labeled[1]).to(run.device)
    rng = np.random.default_rng([run.spec.seed, epoch, cycle, 21])
    steps = 0
    with _grad_enabled(head, learns):
        customizer.train()
        for _ in range(ck.stage_a_steps):
            idx = torch.from_numpy(rng.integers(0, len(labels), size=ck.stage_a_batch_size))
            with run_autocast(run):
                loss = customization_loss(
                    head, customizer, feats[idx], labels[idx], activation=to_feature_space(models)
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if ck.stage_a_ce_target > 0 and float(loss.detach()) < ck.stage_a_ce_target:
                break
    return {"stage_a_steps": steps, **bound, **stage_a_report(run, head, feats, labels)}


@torch.no_grad()
def stage_a_report(run: Run, head: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """CE and accuracy of ``head(P_t(f_t))`` over every labeled (row, view) pair, and the mean L2
    norm of ``P_t(f_t)`` (to compare with ``student_feature_norm``)."""
    assert run.models.customizer is not None
    customizer = run.models.customizer
    customizer.eval()
    activate = to_feature_space(run.models) or (lambda z: z)
    ce, correct, norm = 0.0, 0, 0.0
    for i in range(0, len(labels), 4096):
        with run_autocast(run):
            z = customizer(feats[i : i + 4096])
            logits = head(activate(z)).float()
        y = labels[i : i + 4096]
        ce += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        norm += float(z.float().norm(dim=1).sum())
    n = max(len(labels), 1)
    return {"stage_a_ce": ce / n, "stage_a_accuracy": correct / n, "target_norm": norm / n}


def set_target_bound(run: Run) -> dict[str, Any]:
    """Set the customizer's RMS bound from ``customkd.target_bound``; return it and the student's
    feature scale on labeled images (``student_feature_norm``: mean L2 norm, ``..._rms``: mean RMS).

    ``student_rms``: ``target_bound_scale`` x the mean RMS of ``f_s`` over up to ``BOUND_ROWS``
    labeled images (view 0, the student in training mode as in stage B, BatchNorm statistics
    untouched), so the target of L_task lives at the scale of the features it is compared with.
    """
    ck = run.spec.customkd
    assert run.models.customizer is not None
    norm, rms = student_feature_scale(run)
    bound = {"student_rms": ck.target_bound_scale * rms, "fixed_rms": ck.target_bound_scale}.get(
        ck.target_bound, float("inf")
    )
    run.models.customizer.max_rms.fill_(bound)
    return {
        "target_bound_rms": None if math.isinf(bound) else bound,
        "student_feature_norm": norm,
        "student_feature_rms": rms,
    }


@torch.no_grad()
def student_feature_scale(run: Run) -> tuple[float, float]:
    """Mean L2 norm and mean RMS of the student's ``f_s`` on the bound images (``_bound_pixels``);
    of its pre-activation ``h_s`` when L_task's target lives there (``customkd.target_space``)."""
    student = run.models.student
    was_training = student.training
    student.train()
    with _frozen_batchnorm_stats(student), run_autocast(run):
        _, f_s, h_s = student.forward_parts(_bound_pixels(run))
    student.train(was_training)
    f = (h_s if run.models.pre_activation else f_s).float()
    return float(f.norm(dim=1).mean()), float(f.pow(2).mean(dim=1).sqrt().mean())


def _bound_pixels(run: Run) -> torch.Tensor:
    """View 0 of up to ``BOUND_ROWS`` labeled rows (a seeded draw), rendered for the student once.

    Called at the start of a stage-A cycle, before the epoch's stage-B loader sets its items.
    """
    if run.bound_pixels is None:
        rows = run.protocol.labeled
        rng = np.random.default_rng([run.spec.seed, 23])
        chosen = sorted(rng.choice(len(rows), size=min(BOUND_ROWS, len(rows)), replace=False).tolist())
        run.replay.set_items([(rows[i], 0) for i in chosen], 0)
        batch = run.replay.collate([run.replay[k] for k in range(len(chosen))])
        run.bound_pixels = to_device(run.replay.to_device(batch, run.device), run.device)["pixels"]
    return run.bound_pixels


@contextmanager
def _frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Training-mode BatchNorm that normalizes with batch statistics but leaves its buffers as they were."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            tracked = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
            saved.append((m, m.momentum, tracked))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(tracked)


@contextmanager
def _grad_enabled(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Set ``requires_grad`` of ``module``'s parameters for the block; restore True afterwards."""
    for p in module.parameters():
        p.requires_grad_(enabled)
    try:
        yield
    finally:
        for p in module.parameters():
            p.requires_grad_(True)
