"""Stage two: train CustomKD (or a baseline) from a feature store.

One training epoch is one pass of stage B (knowledge distillation over labeled + unlabeled rows),
preceded, for the ``customkd`` methods, by stage A (customizer training from cached features and
labels only) every ``customkd.stage_b_epochs`` epochs. Every random choice is derived from
``(seed, epoch)``, so ``--resume`` after a kill reaches the numbers of an uninterrupted run on CPU.

The run directory holds ``spec.json`` (the resolved spec), ``caches.json`` (the fingerprint of every
store read), ``metrics.jsonl`` (one line per epoch), ``results.json``, ``checkpoints/last.pt`` (all
state, for ``--resume``) and ``student_last.pth`` / ``student_best.pth`` (the student alone, loadable
with ``timm.create_model(name, num_classes=C, checkpoint_path=...)``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .cached_data import (
    FeatureSource,
    ReplayDataset,
    Row,
    combined_stats,
    draw_views,
    epoch_items,
    make_loader,
    stage_b_batches,
)
from .data import Dataset, SplitManifest, labeled_indices, open_dataset, read_labeled_list
from .distributed import Dist, resolve_device
from .errors import NonFiniteLossError, RunDirError, SpecError, StoreError
from .fingerprint import request_key
from .losses import StageBTerms, customization_loss, stage_b_loss
from .online import create_online_teacher
from .probe import Probe, probe_accuracy, train_probe
from .specs import TrainSpec, cache_root, data_path, load_cache_spec, spec_relative_path, to_dict
from .store import FeatureStore, list_stores, open_store
from .students import Student, create_projector, create_student, save_student_checkpoint

KD_METHODS = ("kd", "customkd+kd")
DKD_METHODS = ("dkd", "customkd+dkd")
CUSTOM_METHODS = ("customkd", "customkd+kd", "customkd+dkd")
LOSS_TERMS = ("total", "ce", "gen", "spec", "kd", "dkd")


# --- resolving the cache -----------------------------------------------------------------------


def find_store(spec: TrainSpec, *, spec_path: Path | None, manifest_digest: str) -> Path:
    """The store this train spec reads: ``cache.store``, or the one made from ``cache.spec``.

    Raises StoreError when no store (or more than one) under CUSTOMKD_CACHE_ROOT was made from the
    cache spec for this dataset.
    """
    if spec.cache.store:
        return spec_relative_path(spec.cache.store, spec_path)
    cspec_path = spec_relative_path(spec.cache.spec, spec_path)
    cspec = load_cache_spec(cspec_path, [])
    key = request_key(
        spec=cspec.model_copy(update={"dataset": spec.dataset}), manifest_digest=manifest_digest
    )
    root = cache_root()
    found = [Path(e["path"]) for e in list_stores(root) if e.get("request_key") == key]
    if not found:
        raise StoreError(
            f"no store under {root} was made from {cspec_path} for this dataset; run "
            f"`customkd-cache cache --spec {cspec_path} --set dataset.root={spec.dataset.root or '...'}` "
            "first, or set cache.store = PATH (CUSTOMKD_CACHE_ROOT must match)"
        )
    if len(found) > 1:
        names = ", ".join(str(p) for p in found)
        raise StoreError(f"several stores match {cspec_path} ({names}); set cache.store = PATH to choose one")
    return found[0]


def check_store(
    store: FeatureStore, *, spec: TrainSpec, spec_path: Path | None, manifest_digest: str
) -> None:
    """Refuse a store that is incomplete, from another teacher/feature kind, or for other samples."""
    if not store.complete():
        missing = {
            s: int((~store.done_units(s)).sum()) for s in store.split_names if not store.split_complete(s)
        }
        raise StoreError(
            f"{store.path}: cache is incomplete (units missing per split: {missing}); rerun "
            "`customkd-cache cache` with its spec to finish it"
        )
    identity = store.attrs.get("identity", {})
    got = identity.get("dataset", {}).get("manifest_digest")
    if got != manifest_digest:
        raise StoreError(
            f"{store.path}: cache was made for other samples (manifest {str(got)[:12]}, this dataset "
            f"{manifest_digest[:12]}); check dataset.root/splits or rebuild the cache"
        )
    if spec.cache.spec:
        cspec = load_cache_spec(spec_relative_path(spec.cache.spec, spec_path), [])
        teacher = identity.get("teacher", {})
        want = {"source": cspec.teacher.source, "name": cspec.teacher.name, "feature": cspec.teacher.feature}
        have = {k: teacher.get(k) for k in want}
        if have != want:
            raise StoreError(
                f"{store.path}: cache was made by teacher {have}, but {spec.cache.spec} asks for {want}; "
                "point cache.store at the right store or rebuild"
            )


# --- rows of the protocol ----------------------------------------------------------------------


@dataclass
class Protocol:
    labeled: list[Row]
    unlabeled: list[Row]
    eval_splits: tuple[str, ...]
    train_splits: tuple[str, ...]
    labeled_list_sha256: str = ""
    eval_rows: dict[str, list[int]] | None = None  # evaluation restricted to these rows (ssl.eval_list)

    def eval_indices(self, split: str, num_samples: int) -> list[int]:
        if self.eval_rows is not None and split in self.eval_rows:
            return self.eval_rows[split]
        return list(range(num_samples))


def build_protocol(spec: TrainSpec, dataset: Dataset) -> Protocol:
    """Labeled / unlabeled training rows and evaluation splits for ``uda`` or ``ssl``."""
    manifest = dataset.manifest
    if spec.protocol == "uda":
        assert spec.uda is not None  # guaranteed by TrainSpec validation
        for name in (*spec.uda.source, *spec.uda.target, *spec.uda.eval):
            manifest.split(name)
        labeled = [Row(s, i, True) for s in spec.uda.source for i in range(len(manifest.split(s).samples))]
        unlabeled = [Row(s, i, False) for s in spec.uda.target for i in range(len(manifest.split(s).samples))]
        evals = spec.uda.eval or spec.uda.target
        return Protocol(labeled, unlabeled, evals, (*spec.uda.source, *spec.uda.target))
    assert spec.ssl is not None
    ssl = spec.ssl
    split = manifest.split(ssl.train_split)
    manifest.split(ssl.eval_split)
    list_path = data_path(ssl.labeled_list)
    chosen = set(_listed(split, list_path, ssl.labeled_sha256))
    labeled = [Row(split.name, i, True) for i in sorted(chosen)]
    if ssl.unlabeled_list:
        pool = sorted(set(_listed(split, data_path(ssl.unlabeled_list))) - chosen)
    else:
        pool = [i for i in range(len(split.samples)) if i not in chosen]
    unlabeled = [Row(split.name, i, False) for i in pool]
    eval_rows = None
    if ssl.eval_list:
        eval_rows = {
            ssl.eval_split: sorted(_listed(manifest.split(ssl.eval_split), data_path(ssl.eval_list)))
        }
    digest = hashlib.sha256(list_path.read_bytes()).hexdigest()
    return Protocol(labeled, unlabeled, (ssl.eval_split,), (split.name,), digest, eval_rows)


def _listed(split: SplitManifest, path: Path, sha256: str = "") -> list[int]:
    """Indices into ``split`` of the ids in a list file."""
    return [int(i) for i in labeled_indices(split, read_labeled_list(path, sha256=sha256))]


# --- models ------------------------------------------------------------------------------------


@dataclass
class Models:
    student: Student
    student_projector: nn.Module | None  # P_s: d_s -> d_t (customkd, fitnet)
    customizer: nn.Module | None  # P_t: d_t -> d_s (customkd)
    opt_b: torch.optim.Optimizer
    opt_a: torch.optim.Optimizer | None

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"student": self.student.state_dict(), "opt_b": self.opt_b.state_dict()}
        if self.student_projector is not None:
            out["student_projector"] = self.student_projector.state_dict()
        if self.customizer is not None:
            out["customizer"] = self.customizer.state_dict()
        if self.opt_a is not None:
            out["opt_a"] = self.opt_a.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.opt_b.load_state_dict(state["opt_b"])
        if self.student_projector is not None:
            self.student_projector.load_state_dict(state["student_projector"])
        if self.customizer is not None:
            self.customizer.load_state_dict(state["customizer"])
        if self.opt_a is not None:
            self.opt_a.load_state_dict(state["opt_a"])


def build_models(spec: TrainSpec, *, spec_path: Path | None, num_classes: int, teacher_dim: int) -> Models:
    torch.manual_seed(spec.seed)
    student = create_student(
        spec.student, num_classes=num_classes, spec_dir=spec_path.parent if spec_path else None
    )
    method = spec.method
    ps = (
        create_projector(student.feature_dim, teacher_dim, spec.customkd.projector)
        if (method in CUSTOM_METHODS or method == "fitnet")
        else None
    )
    pt = (
        create_projector(teacher_dim, student.feature_dim, spec.customkd.projector)
        if method in CUSTOM_METHODS
        else None
    )
    params = list(student.parameters()) + (list(ps.parameters()) if ps is not None else [])
    o = spec.optim
    opt_b = torch.optim.SGD(
        params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.momentum > 0
    )
    opt_a = None
    if pt is not None:
        a_params = list(pt.parameters())
        if spec.customkd.head_learns_in_stage_a:
            a_params += list(student.head().parameters())
        opt_a = torch.optim.SGD(a_params, lr=spec.customkd.stage_a_lr, momentum=0.9)
    return Models(student, ps, pt, opt_b, opt_a)


def lr_at(spec: TrainSpec, step: int, total: int) -> float:
    """Cosine (or constant) schedule with linear warm-up, per step."""
    o = spec.optim
    warm = o.warmup_epochs * total // max(o.epochs, 1)
    if step < warm:
        return o.lr * (step + 1) / warm
    if o.schedule == "constant":
        return o.lr
    t = (step - warm) / max(total - warm, 1)
    return 0.5 * o.lr * (1.0 + math.cos(math.pi * t))


# --- the run -----------------------------------------------------------------------------------


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


def run_train(spec: TrainSpec, *, spec_path: Path | None, out: Path, resume: bool = False) -> dict[str, Any]:
    """Train one method from the cache and write the run directory; return results.json's content.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank takes its share of each stage-B batch and
    gradients are averaged across ranks before each step; rank 0 evaluates and writes.
    """
    if spec.run.threads:
        torch.set_num_threads(spec.run.threads)
    with Dist.from_env(spec.run.device) as dist:
        run = prepare_run(spec, spec_path=spec_path, out=out, resume=resume, dist=dist)
        state = load_checkpoint(run) if resume else TrainState()
        total_steps = spec.optim.epochs * len(_epoch_batches(run, 0))
        for epoch in range(state.epoch, spec.optim.epochs):
            train_one_epoch(run, epoch, state, total_steps)
        results = summarize(run, state) if dist.is_main else {}
        if dist.is_main:
            save_student_checkpoint(run.models.student, out / "student_last.pth")
            _write_json(out / "results.json", results)
        dist.barrier()
    return results


def train_one_epoch(run: Run, epoch: int, state: TrainState, total_steps: int) -> None:
    """Stage A (when due), stage B, evaluation, metrics line and checkpoint for one epoch."""
    spec, out = run.spec, run.out
    t0 = time.perf_counter()
    torch.manual_seed(spec.seed * 100_003 + epoch)
    metrics: dict[str, Any] = {"epoch": epoch}
    ck = spec.customkd
    if run.models.customizer is not None and ck.stage_a_epochs and epoch % ck.stage_b_epochs == 0:
        metrics["stage_a_loss"] = train_stage_a(run, epoch)
    t_b = time.perf_counter()
    metrics.update(train_stage_b(run, epoch, state, total_steps))
    metrics["stage_b_seconds"] = round(time.perf_counter() - t_b, 3)
    run.dist.sync_buffers(run.models.student)
    evaluate_now = (epoch + 1) % spec.run.eval_every == 0 or epoch + 1 == spec.optim.epochs
    if evaluate_now and run.dist.is_main:
        metrics.update(evaluate(run))
        acc = metrics["student_accuracy"]
        if acc > state.best_accuracy:
            state.best_accuracy, state.best_epoch = acc, epoch
            save_student_checkpoint(run.models.student, out / "student_best.pth")
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    state.epoch = epoch + 1
    state.history.append(metrics)
    if run.dist.is_main:
        _append_jsonl(out / "metrics.jsonl", metrics)
        save_checkpoint(run, state)
        _log_epoch(metrics, spec.optim.epochs)
    run.dist.barrier()


def prepare_run(spec: TrainSpec, *, spec_path: Path | None, out: Path, resume: bool, dist: Dist) -> Run:
    """Resolve data, cache, probe and models; write spec.json and caches.json (rank 0)."""
    if resume:
        check_resume(out, spec)
    device = dist.device if dist.world > 1 else resolve_device(spec.run.device)
    dataset = open_dataset(spec.dataset)
    digest = dataset.manifest.digest()
    store_path = find_store(spec, spec_path=spec_path, manifest_digest=digest)
    store = open_store(store_path)
    check_store(store, spec=spec, spec_path=spec_path, manifest_digest=digest)
    protocol = build_protocol(spec, dataset)
    if not protocol.labeled:
        raise SpecError("the protocol gives no labeled rows: check uda.source or ssl.labeled_list")
    if dist.is_main:
        _prepare_out(out, spec, store, protocol, resume=resume)
    dist.barrier()
    mean, std = combined_stats(store, protocol.train_splits)
    train_stats = (mean, np.where(std > 0, std, np.float32(1.0)).astype(np.float32))  # as FeatureSource does
    stats = train_stats if spec.customkd.standardize else None
    features = FeatureSource(store.path, in_ram=spec.run.features_in_ram, standardize=stats)
    num_classes = len(dataset.manifest.classes)
    teacher = create_online_teacher(spec, spec_path, store, device) if spec.teacher_mode == "online" else None
    views = 1 if spec.train_views == "eval" else store.num_views
    labeled = _labeled_features(features, store, protocol.labeled, views)  # probe and every stage A
    probe = fit_probe(spec, labeled, num_classes, None if stats else train_stats)
    models = build_models(spec, spec_path=spec_path, num_classes=num_classes, teacher_dim=store.feature_dim)
    replay = _replay_dataset(spec, dataset, store, features, models.student, teacher)
    features.preload([*protocol.train_splits, *protocol.eval_splits])
    replay.preload([*protocol.train_splits, *protocol.eval_splits])
    for m in (models.student, models.student_projector, models.customizer):
        if m is not None:
            m.to(device)
    probe = probe.to(device)
    return Run(
        spec=spec,
        out=out,
        dataset=dataset,
        store=store,
        protocol=protocol,
        features=features,
        probe=probe,
        models=models,
        replay=replay,
        num_classes=num_classes,
        stats=stats,
        labeled=labeled,
        dist=dist,
        device=device,
        teacher=teacher,
    )


def _replay_dataset(
    spec: TrainSpec,
    dataset: Dataset,
    store: FeatureStore,
    features: FeatureSource,
    student: Student,
    teacher: Any,
) -> ReplayDataset:
    import timm.data

    cfg = timm.data.resolve_model_data_config(student.timm_model())
    kwargs: dict[str, Any] = {}
    if teacher is not None:
        pre = teacher.preprocess
        kwargs = dict(
            teacher_size=pre.input_size,
            teacher_mean=pre.mean,
            teacher_std=pre.std,
            teacher_interpolation=pre.interpolation,
        )
    return ReplayDataset(
        dataset=dataset,
        store_path=store.path,
        features=None if teacher is not None else features,
        student_size=spec.student.input_size,
        student_mean=cfg["mean"],
        student_std=cfg["std"],
        interpolation=cfg.get("interpolation", "bilinear"),
        photometric=spec.optim.photometric,
        seed=spec.seed,
        **kwargs,
    )


def fit_probe(
    spec: TrainSpec,
    labeled: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    raw_stats: tuple[np.ndarray, np.ndarray] | None,
) -> Probe:
    """The teacher probe: a linear classifier on the labeled rows' cached features (``labeled``,
    every view in use, see ``_labeled_features``).

    It standardizes with the statistics of the whole training splits (``raw_stats`` when the
    features come unstandardized, else none is needed): statistics of the few labeled rows alone
    have near-zero spreads in some dimensions and give the probe unbounded logits elsewhere.
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
    )


def _labeled_features(
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


# --- stage A: feature customization (cache only) -----------------------------------------------


def train_stage_a(run: Run, epoch: int) -> float:
    """``stage_a_epochs`` passes over (labeled row, view) pairs: CE(H_s(P_t(f_t)), y).

    Only P_t learns (and H_s when ``customkd.head_learns_in_stage_a``)."""
    models, spec = run.models, run.spec
    assert models.customizer is not None and models.opt_a is not None
    feats, labels = run.labeled
    head = models.student.head()
    head_learns = spec.customkd.head_learns_in_stage_a
    for p in head.parameters():
        p.requires_grad_(head_learns)
    models.customizer.train()
    rng = np.random.default_rng([spec.seed, epoch, 11])
    order = np.concatenate([rng.permutation(len(feats)) for _ in range(spec.customkd.stage_a_epochs)])
    losses = []
    for i in range(0, len(order), spec.optim.batch_size):
        idx = order[i : i + spec.optim.batch_size]
        f_t = torch.from_numpy(feats[idx]).to(run.device)
        loss = customization_loss(head, models.customizer, f_t, torch.from_numpy(labels[idx]).to(run.device))
        models.opt_a.zero_grad(set_to_none=True)
        loss.backward()
        models.opt_a.step()
        losses.append(loss.item())
    for p in head.parameters():
        p.requires_grad_(True)
    return float(np.mean(losses)) if losses else 0.0


# --- stage B: distillation ---------------------------------------------------------------------


def _epoch_batches(run: Run, epoch: int) -> list[list[Row]]:
    spec = run.spec
    block = None if spec.run.features_in_ram else run.store.unit_rows
    return stage_b_batches(
        labeled=run.protocol.labeled,
        unlabeled=run.protocol.unlabeled,
        batch_size=spec.optim.batch_size,
        labeled_share=spec.optim.labeled_per_batch,
        seed=spec.seed,
        epoch=epoch,
        block_rows=block,
    )


def _train_views(run: Run) -> int:
    """Views to draw from: all cached ones, or only view 0 (``train_views = "eval"``)."""
    return 1 if run.spec.train_views == "eval" else run.store.num_views


def train_stage_b(run: Run, epoch: int, state: TrainState, total_steps: int) -> dict[str, float]:
    """One stage-B epoch over labeled + unlabeled rows; returns the mean of each loss term.

    Under several ranks each batch of the plan is split between them (rank r takes rows r::world).
    """
    spec, models, dist = run.spec, run.models, run.dist
    batches = _epoch_batches(run, epoch)
    rows = [r for b in batches for r in b]
    views = draw_views(seed=spec.seed, epoch=epoch, rows=rows, num_views=_train_views(run))
    items, index_batches = epoch_items(batches, views)
    if dist.world > 1:  # every rank needs a row of each batch; the plan is the same on all ranks
        index_batches = [b[dist.rank :: dist.world] for b in index_batches if len(b) >= dist.world]
    run.replay.set_items(items, epoch)
    loader = make_loader(
        run.replay,
        batch_size=None,
        batches=index_batches,
        num_workers=spec.run.num_workers,
        seed=spec.seed + epoch,
    )
    models.student.train()
    if models.student_projector is not None:
        models.student_projector.train()
    params = [p for g in models.opt_b.param_groups for p in g["params"]]
    dkd_ramp = min(1.0, (epoch + 1) / max(spec.dkd.warmup_epochs, 1))
    sums: dict[str, float] = defaultdict(float)
    n = 0
    for batch in loader:
        for g in models.opt_b.param_groups:
            g["lr"] = lr_at(spec, state.step, total_steps)
        terms = _stage_b_step(run, {k: v.to(run.device) for k, v in batch.items()}, dkd_ramp)
        _check_finite(terms, epoch, state.step, spec.method)
        models.opt_b.zero_grad(set_to_none=False)
        terms.total.backward()
        dist.average_gradients(params)
        models.opt_b.step()
        state.step += 1
        n += 1
        for key in LOSS_TERMS:
            sums[f"loss_{key}"] += float(getattr(terms, key).detach())
    return dist.mean_over_ranks(dict(sums), n)


def _check_finite(terms: StageBTerms, epoch: int, step: int, method: str) -> None:
    """Stop at the first NaN/Inf loss instead of training on garbage (and reporting chance accuracy)."""
    if bool(torch.isfinite(terms.total.detach())):
        return
    parts = ", ".join(f"{k}={float(getattr(terms, k).detach()):.4g}" for k in LOSS_TERMS)
    raise NonFiniteLossError(
        f"{method}: loss is not finite at epoch {epoch}, step {step} ({parts}); lower optim.lr "
        "or the loss weights in the train spec"
    )


def _stage_b_step(run: Run, batch: dict[str, torch.Tensor], dkd_ramp: float) -> StageBTerms:
    spec, models = run.spec, run.models
    logits, f_s = models.student(batch["pixels"])
    f_t = _teacher_features(run, batch)
    teacher_logits = run.probe.logits(f_t) if spec.method in (*KD_METHODS, *DKD_METHODS) else None
    return stage_b_loss(
        method=spec.method,
        logits=logits,
        f_s=f_s,
        f_t=f_t,
        labeled_mask=batch["labeled"].bool(),
        target=batch["label"],
        student_projector=models.student_projector,
        customizer=models.customizer,
        teacher_logits=teacher_logits,
        kd=spec.kd,
        dkd=spec.dkd,
        ck=spec.customkd,
        dkd_ramp=dkd_ramp,
    )


def _teacher_features(run: Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's teacher features (standardized as the cache's): cached, or computed on the fly."""
    if run.teacher is None:
        return batch["feature"]
    with torch.no_grad():
        f = run.teacher.features(batch["teacher_pixels"]).float()
    if run.stats is not None:
        mean, std = (torch.from_numpy(a).to(f.device) for a in run.stats)
        f = (f - mean) / std
    return f


# --- evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(run: Run) -> dict[str, Any]:
    """Student accuracy on each evaluation split (view 0, the stored evaluation view)."""
    models = run.models
    models.student.eval()
    per_split: dict[str, float] = {}
    correct_all = total_all = 0
    for split in run.protocol.eval_splits:
        rows = run.protocol.eval_indices(split, run.store.num_samples(split))
        n = len(rows)
        run.replay.set_items([(Row(split, r, False), 0) for r in rows], 0)
        loader = make_loader(
            run.replay,
            batch_size=run.spec.optim.batch_size,
            batches=None,
            num_workers=run.spec.run.num_workers,
            seed=run.spec.seed,
        )
        correct = 0
        for batch in loader:
            logits, _ = models.student(batch["pixels"].to(run.device))
            correct += int((logits.argmax(1).cpu() == batch["label"]).sum())
        per_split[split] = correct / max(n, 1)
        correct_all += correct
        total_all += n
    return {"student_accuracy": correct_all / max(total_all, 1), "student_accuracy_per_split": per_split}


def teacher_accuracy(run: Run) -> tuple[float, dict[str, float]]:
    """The probe's accuracy on each evaluation split's view-0 features."""
    per_split: dict[str, float] = {}
    correct, total = 0.0, 0
    for split in run.protocol.eval_splits:
        rows = np.asarray(run.protocol.eval_indices(split, run.store.num_samples(split)), np.int64)
        n = len(rows)
        f = torch.from_numpy(run.features.get_many(split, rows, np.zeros(n, np.int64))).to(run.device)
        y = torch.from_numpy(run.store.labels(split)[rows].astype(np.int64)).to(run.device)
        acc = probe_accuracy(run.probe, f, y)
        per_split[split] = acc
        correct += acc * n
        total += n
    return correct / max(total, 1), per_split


def summarize(run: Run, state: TrainState) -> dict[str, Any]:
    last: dict[str, Any] = next((m for m in reversed(state.history) if "student_accuracy" in m), {})
    t_acc, t_split = teacher_accuracy(run)
    return {
        "method": run.spec.method,
        "protocol": run.spec.protocol,
        "seed": run.spec.seed,
        "teacher_mode": run.spec.teacher_mode,
        "student": run.spec.student.name,
        "student_accuracy": last.get("student_accuracy"),
        "student_accuracy_per_split": last.get("student_accuracy_per_split"),
        "teacher_accuracy": t_acc,
        "teacher_accuracy_per_split": t_split,
        "best_student_accuracy": state.best_accuracy,
        "best_epoch": state.best_epoch,
        "last_epoch": state.epoch - 1,
        "epochs": run.spec.optim.epochs,
        "num_labeled": len(run.protocol.labeled),
        "num_unlabeled": len(run.protocol.unlabeled),
        "cache_fingerprint": run.store.fingerprint,
    }


# --- run directory -----------------------------------------------------------------------------


# Spec sections that may change on --resume: how the run is executed, not what it computes.
RESUMABLE_SECTIONS = ("run",)


def check_resume(out: Path, spec: TrainSpec) -> None:
    """Refuse to resume a run in ``out`` with a spec that differs from its ``spec.json`` in anything
    but ``RESUMABLE_SECTIONS``; checked before anything in ``out`` is written.

    Raises RunDirError naming the differing keys (dotted), or when a checkpoint has no spec.json.
    """
    _check_out_dir(out)
    path = out / "spec.json"
    if not path.exists():
        if (out / "checkpoints" / "last.pt").exists():
            raise RunDirError(
                f"{path}: missing beside a checkpoint; cannot check the resume, start a new --out"
            )
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunDirError(f"{path}: unreadable ({e}); cannot check the resume, start a new --out") from None
    new = json.loads(json.dumps(to_dict(spec)))
    differ = [k for k in _differing_keys(old, new) if k.split(".")[0] not in RESUMABLE_SECTIONS]
    if differ:
        shown = ", ".join(differ[:10]) + (f" ... ({len(differ)} keys)" if len(differ) > 10 else "")
        raise RunDirError(
            f"--resume {out}: the spec differs from the run's spec.json in {shown}; resume with the same "
            f"spec (only [{', '.join(RESUMABLE_SECTIONS)}] may change) or start a new --out"
        )


def _differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON objects (a whole value when not both dicts)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix or "(the whole spec)"]
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in old or key not in new:
            out.append(dotted)
        else:
            out += _differing_keys(old[key], new[key], dotted)
    return out


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {out}: is a file, not a directory; give a directory for the run")


def _prepare_out(
    out: Path, spec: TrainSpec, store: FeatureStore, protocol: Protocol, *, resume: bool
) -> None:
    _check_out_dir(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise SpecError(
            f"--out {out}: directory is not empty; pass --resume to continue that run or choose a new one"
        )
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "spec.json", to_dict(spec))
    caches = {
        str(store.path): {"fingerprint": store.fingerprint, "request_key": store.attrs.get("request_key")}
    }
    if protocol.labeled_list_sha256:
        caches["labeled_list"] = {"sha256": protocol.labeled_list_sha256}
    _write_json(out / "caches.json", caches)


def save_checkpoint(run: Run, state: TrainState) -> None:
    """All state needed to resume after the epoch just finished, written atomically."""
    path = run.out / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"models": run.models.state_dict(), "state": state.__dict__, "fingerprint": run.store.fingerprint}
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota: keep the last good checkpoint, leave no partial file
        tmp.unlink(missing_ok=True)
        raise RunDirError(
            f"{path}: cannot write the checkpoint ({e.strerror or e}); free space, then rerun with --resume "
            f"(it continues from epoch {max(state.epoch - 1, 0)})"
        ) from None


def load_checkpoint(run: Run) -> TrainState:
    """The state saved after the last finished epoch (a fresh state when there is none).

    The checkpoint is loaded with ``weights_only=True``: it holds tensors and plain containers only,
    and a run directory may be shared, so nothing in it may run code. Lines of ``metrics.jsonl``
    beyond the checkpointed epochs (logged, then killed before the checkpoint) are dropped.

    Raises RunDirError for a checkpoint that is unreadable, holds anything else, or was trained on
    another cache.
    """
    path = run.out / "checkpoints" / "last.pt"
    state = _read_checkpoint(run, path) if path.exists() else TrainState()
    metrics = run.out / "metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_text().splitlines()[: state.epoch]
        metrics.write_text("".join(line + "\n" for line in lines))
    return state


def _read_checkpoint(run: Run, path: Path) -> TrainState:
    fix = f"remove {path} to restart the run from epoch 0, or start a new --out directory"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        fingerprint, models, state = blob["fingerprint"], blob["models"], TrainState(**blob["state"])
    except pickle.UnpicklingError:
        raise RunDirError(
            f"{path}: holds objects other than tensors and plain containers, refused unloaded (loading "
            f"them could run code); {fix}"
        ) from None
    except Exception as e:  # truncated or foreign file: several types
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise RunDirError(f"{path}: not a loadable checkpoint of this tool ({reason}); {fix}") from None
    if fingerprint != run.store.fingerprint:
        raise RunDirError(f"{path}: checkpoint was trained on another cache; start a new --out directory")
    run.models.load_state_dict(models)
    return state


def _log_epoch(m: dict[str, Any], epochs: int) -> None:
    acc = m.get("student_accuracy")
    shown = f", student acc {100 * acc:.2f}%" if acc is not None else ""
    print(
        f"epoch {m['epoch'] + 1}/{epochs}: loss {m['loss_total']:.4f}{shown} ({m['seconds']:.1f} s)",
        file=sys.stderr,
        flush=True,
    )


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
