"""Stage two: train CustomKD (or a baseline) from a feature store.

One training epoch is one pass of stage B (knowledge distillation over labeled + unlabeled rows),
preceded, for the ``customkd`` methods, by stage A (customizer training from cached features and
labels only: ``customkd.stage_a_steps`` optimizer steps) every ``customkd.stage_a_every`` epochs, or
interleaved ``customkd.stage_a_per_epoch`` times within the epoch. Every random choice is derived from
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from customkd_cache.catalog import recorded_storage, request_key, request_key_with_storage
from customkd_cache.data.datasets import (
    Dataset,
    SplitManifest,
    labeled_indices,
    open_dataset,
    read_labeled_list,
)
from customkd_cache.distributed import Dist, resolve_device
from customkd_cache.errors import NonFiniteLossError, RunDirError, SpecError, StoreError
from customkd_cache.models.students import (
    Customizer,
    Student,
    create_projector,
    create_student,
    data_config,
    save_student_checkpoint,
)
from customkd_cache.specs import (
    CacheSpec,
    StoreSpec,
    TrainSpec,
    cache_root,
    data_path,
    load_cache_spec,
    spec_relative_path,
    to_dict,
)
from customkd_cache.stage_two.losses import (
    StageBTerms,
    customization_loss,
    linear_cka,
    method_terms,
    stage_b_loss,
)
from customkd_cache.stage_two.online import create_online_teacher
from customkd_cache.stage_two.probe import Probe, probe_accuracy, train_probe
from customkd_cache.stage_two.replay import (
    FeatureSource,
    ReplayDataset,
    Row,
    combined_stats,
    draw_views,
    epoch_items,
    make_loader,
    stage_b_batches,
)
from customkd_cache.store import FeatureStore, open_store, store_dirs

LOSS_TERMS = ("total", "ce", "gen", "task", "kd", "dkd")
BOUND_ROWS = 128  # labeled images whose student features set the target bound (student_rms)


# --- resolving the cache -----------------------------------------------------------------------


def find_store(spec: TrainSpec, *, spec_path: Path | None, manifest_digest: str) -> Path:
    """The store this train spec reads: ``cache.store``, or the one made from ``cache.spec``.

    A store made from the cache spec with other ``[store]`` settings (``--set store.dtype=int8``)
    holds the same features, so it matches too. Preferred, in order: the exact request key, then the
    spec's ``store.dtype``, then any storage.

    Raises StoreError when no store under CUSTOMKD_CACHE_ROOT was made from the cache spec for this
    dataset (naming the stores of the same samples and teacher, and how they differ), or when several
    tie (naming each with its storage).
    """
    if spec.cache.store:
        return spec_relative_path(spec.cache.store, spec_path)
    cspec_path = spec_relative_path(spec.cache.spec, spec_path)
    cspec = load_cache_spec(cspec_path, []).model_copy(update={"dataset": spec.dataset})
    root = cache_root()
    stores = [c for path in store_dirs(root) if (c := _read_listed(path)) is not None]
    exact = request_key(spec=cspec, manifest_digest=manifest_digest)
    found = _made_from(cspec, manifest_digest, exact, stores)
    if not found:
        raise StoreError(
            f"no store under {root} was made from {cspec_path} for this dataset"
            f"{_near_misses(cspec, manifest_digest, stores)}; run "
            f"`customkd-cache cache --spec {cspec_path} --set dataset.root={spec.dataset.root or '...'}` "
            "first, or set cache.store = PATH (CUSTOMKD_CACHE_ROOT must match)"
        )
    best = _preferred(found, cspec, exact)
    if len(best) > 1:
        names = ", ".join(f"{c.path} ({c.storage_label(cspec.store)})" for c in best)
        raise StoreError(f"several stores match {cspec_path} ({names}); set cache.store = PATH to choose one")
    return best[0].path


@dataclass(frozen=True)
class _Listed:
    """A readable store under the cache root, with what ``find_store`` compares."""

    path: Path
    request_key: str
    storage: StoreSpec | None  # its [store] section, as hashed into request_key
    manifest_digest: str
    teacher: str
    written: dict[str, Any]  # the cache spec it was made from (provenance: diagnostics only)

    def storage_label(self, want: StoreSpec) -> str:
        """``int8``, plus the other [store] fields that differ from ``want`` (``int8, unit_rows=16``)."""
        if self.storage is None:
            return "storage unknown"
        have, asked = to_dict(self.storage), to_dict(want)
        return ", ".join(
            [self.storage.dtype] + [f"{k}={v}" for k, v in have.items() if k != "dtype" and v != asked[k]]
        )


def _read_listed(path: Path) -> _Listed | None:
    """The store at ``path`` (its attributes only), or None when it cannot be read: a damaged store
    is never a match, as in ``list_stores``, which reports it as damaged."""
    try:
        attrs = open_store(path).attrs
    except Exception:  # StoreError, or zarr's own errors for a damaged hierarchy
        return None
    identity = attrs.get("identity", {})
    return _Listed(
        path=path,
        request_key=str(attrs.get("request_key") or ""),
        storage=recorded_storage(identity),
        manifest_digest=str(identity.get("dataset", {}).get("manifest_digest", "")),
        teacher=str(identity.get("teacher", {}).get("name", "")),
        written=attrs.get("provenance", {}).get("spec", {}),
    )


def _made_from(cspec: CacheSpec, manifest_digest: str, exact: str, stores: list[_Listed]) -> list[_Listed]:
    """The stores made from ``cspec`` for these samples, with its storage (request key ``exact``) or
    their own."""

    def matches(c: _Listed) -> bool:
        if c.request_key == exact:
            return True
        if c.storage is None:
            return False
        key = request_key_with_storage(spec=cspec, manifest_digest=manifest_digest, storage=c.storage)
        return c.request_key == key

    return [c for c in stores if matches(c)]


def _preferred(found: list[_Listed], cspec: CacheSpec, exact: str) -> list[_Listed]:
    """The first non-empty of: exact request-key matches, matches in the spec's dtype, all of them."""
    same = [c for c in found if c.request_key == exact]
    same_dtype = [c for c in found if c.storage is not None and c.storage.dtype == cspec.store.dtype]
    return same or same_dtype or found


def _near_misses(cspec: CacheSpec, manifest_digest: str, stores: list[_Listed]) -> str:
    """``"; stores for the same samples and teacher: PATH (int8; differs in views.num_views)"`` or ``""``."""
    near = [c for c in stores if c.manifest_digest == manifest_digest and c.teacher == cspec.teacher.name]
    if not near:
        return ""
    asked = {k: to_dict(cspec)[k] for k in ("teacher", "views")}

    def describe(c: _Listed) -> str:
        differs = _differing_keys({k: c.written.get(k) for k in asked}, asked)
        shown = f"; differs in {', '.join(differs)}" if differs else ""
        return f"{c.path} ({c.storage_label(cspec.store)}{shown})"

    return f"; stores for the same samples and teacher: {', '.join(describe(c) for c in near)}"


def check_store(
    store: FeatureStore, *, spec: TrainSpec, spec_path: Path | None, manifest_digest: str
) -> None:
    """Refuse a store that is incomplete, from another teacher/feature kind, or for other samples."""
    store.require_complete()  # names the missing units and the cache command that finishes them
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
    val_rows: dict[str, list[int]] = field(default_factory=dict)  # held-out labeled rows (validation)

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
        for name in spec.uda.val:
            manifest.split(name)
            if name in (*spec.uda.source, *spec.uda.target):
                raise SpecError(f"uda.val: split '{name}' is also trained on; give a held-out source split")
        labeled = [Row(s, i, True) for s in spec.uda.source for i in range(len(manifest.split(s).samples))]
        unlabeled = [Row(s, i, False) for s in spec.uda.target for i in range(len(manifest.split(s).samples))]
        evals = spec.uda.eval or spec.uda.target
        val = {name: list(range(len(manifest.split(name).samples))) for name in spec.uda.val}
        return Protocol(labeled, unlabeled, evals, (*spec.uda.source, *spec.uda.target), val_rows=val)
    assert spec.ssl is not None
    ssl = spec.ssl
    split = manifest.split(ssl.train_split)
    manifest.split(ssl.eval_split)
    list_path = data_path(ssl.labeled_list)
    chosen = set(_listed(split, list_path, ssl.labeled_sha256))
    held_out = set(_listed(split, data_path(ssl.val_list))) if ssl.val_list else set()
    if held_out & chosen:
        raise SpecError(
            f"ssl.val_list: {len(held_out & chosen)} ids are also in ssl.labeled_list; validation ids "
            "must be held out from training"
        )
    labeled = [Row(split.name, i, True) for i in sorted(chosen)]
    if ssl.unlabeled_list:
        pool = sorted(set(_listed(split, data_path(ssl.unlabeled_list))) - chosen - held_out)
    else:
        pool = [i for i in range(len(split.samples)) if i not in chosen and i not in held_out]
    unlabeled = [Row(split.name, i, False) for i in pool]
    eval_rows = None
    if ssl.eval_list:
        eval_rows = {
            ssl.eval_split: sorted(_listed(manifest.split(ssl.eval_split), data_path(ssl.eval_list)))
        }
    digest = hashlib.sha256(list_path.read_bytes()).hexdigest()
    val = {split.name: sorted(held_out)} if held_out else {}
    return Protocol(labeled, unlabeled, (ssl.eval_split,), (split.name,), digest, eval_rows, val)


def _listed(split: SplitManifest, path: Path, sha256: str = "") -> list[int]:
    """Indices into ``split`` of the ids in a list file."""
    return [int(i) for i in labeled_indices(split, read_labeled_list(path, sha256=sha256))]


# --- models ------------------------------------------------------------------------------------


@dataclass
class Models:
    student: Student
    student_projector: nn.Module | None  # P_s: d_s -> d_t (terms with gen)
    customizer: Customizer | None  # P_t: d_t -> d_s (terms with task)
    opt_b: torch.optim.Optimizer
    opt_a: torch.optim.Optimizer | None
    stage_a_head: nn.Module | None = None  # a separate teacher head (customkd.stage_a_head = separate)
    pre_activation: bool = False  # L_task in the student's pre-activation space (customkd.target_space)

    def _parts(self) -> dict[str, Any]:
        parts = {
            "student": self.student,
            "opt_b": self.opt_b,
            "student_projector": self.student_projector,
            "customizer": self.customizer,
            "opt_a": self.opt_a,
            "stage_a_head": self.stage_a_head,
        }
        return {k: v for k, v in parts.items() if v is not None}

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self._parts().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self._parts().items():
            part.load_state_dict(state[name])


def build_models(spec: TrainSpec, *, spec_path: Path | None, num_classes: int, teacher_dim: int) -> Models:
    """The student and the projectors its method's terms need, with their optimizers.

    The student is created first from ``spec.seed``, so every method starts from the same student.
    """
    torch.manual_seed(spec.seed)
    student = create_student(
        spec.student, num_classes=num_classes, spec_dir=spec_path.parent if spec_path else None
    )
    terms, ck, o = method_terms(spec.method), spec.customkd, spec.optim
    ps = create_projector(student.feature_dim, teacher_dim, ck.projector) if "gen" in terms else None
    pt = (
        Customizer(create_projector(teacher_dim, student.feature_dim, ck.projector))
        if "task" in terms
        else None
    )
    params = list(student.parameters()) + (list(ps.parameters()) if ps is not None else [])
    opt_b = create_optimizer(o.optimizer, params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    opt_a, head_a = None, None
    if pt is not None:
        a_params = list(pt.parameters())
        if ck.stage_a_head == "separate":
            head_a = nn.Linear(student.feature_dim, num_classes)
            a_params += list(head_a.parameters())
        elif ck.head_learns_in_stage_a:
            a_params += list(student.head().parameters())
        opt_a = create_optimizer(
            ck.stage_a_optimizer,
            a_params,
            lr=ck.stage_a_lr,
            weight_decay=ck.stage_a_weight_decay,
            momentum=0.9,
        )
    pre = pt is not None and target_in_pre_activation(ck.target_space, student)
    return Models(student, ps, pt, opt_b, opt_a, head_a, pre)


def target_in_pre_activation(space: str, student: Student) -> bool:
    """Whether ``customkd.target_space`` puts L_task's target in the student's pre-activation space."""
    if space == "pre_activation" and not student.has_pre_activation:
        raise SpecError(
            f"customkd.target_space = 'pre_activation': student '{student.name}' has no activation after "
            "its pooled head (only MobileNetV3-style heads do); use 'auto' or 'features'"
        )
    return space != "features" and student.has_pre_activation


def to_feature_space(models: Models) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The map from the customizer's output to the student's head input (``None``: identity)."""
    return models.student.activate if models.pre_activation else None


def create_optimizer(
    kind: str, params: list[nn.Parameter], *, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    """``adamw`` (decoupled weight decay) or ``sgd`` (Nesterov momentum when ``momentum`` > 0)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        nesterov = momentum > 0
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    raise SpecError(f"optimizer: unknown '{kind}'; valid: adamw, sgd")


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
    bound_pixels: torch.Tensor | None = None  # (<= BOUND_ROWS, 3, s, s) labeled images, made once


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
    """Stage A (when due), stage B, evaluation, metrics line and checkpoint for one epoch.

    With ``customkd.stage_a_per_epoch`` = k > 1 the epoch's stage-B batches are cut into k parts
    and a stage-A cycle runs before each part.
    """
    spec, out = run.spec, run.out
    t0 = time.perf_counter()
    torch.manual_seed(spec.seed * 100_003 + epoch)
    metrics: dict[str, Any] = {"epoch": epoch}
    cycles = stage_a_cycles(run, epoch)
    sums: dict[str, float] = defaultdict(float)
    count, a_steps, a_seconds, t_b = 0, 0, 0.0, 0.0
    for part in range(max(cycles, 1)):
        if cycles:
            t_a = time.perf_counter()
            report = train_stage_a(run, epoch, part)
            a_steps += report.pop("stage_a_steps")
            metrics.update(report)  # the last cycle's state is what stage B uses
            a_seconds += time.perf_counter() - t_a
        t = time.perf_counter()
        part_sums, n = train_stage_b(run, epoch, state, total_steps, part=(part, max(cycles, 1)))
        t_b += time.perf_counter() - t
        for key, value in part_sums.items():
            sums[key] += value
        count += n
    if cycles:
        metrics["stage_a_steps"] = a_steps
        metrics["stage_a_seconds"] = round(a_seconds, 3)
    metrics.update(run.dist.mean_over_ranks(dict(sums), count))
    metrics["stage_b_seconds"] = round(t_b, 3)
    run.dist.sync_buffers(run.models.student)
    final = epoch + 1 == spec.optim.epochs
    if ((epoch + 1) % spec.run.eval_every == 0 or final) and run.dist.is_main:
        metrics.update(evaluate(run, final=final))
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


def stage_a_cycles(run: Run, epoch: int) -> int:
    """How many stage-A cycles run in ``epoch``: ``stage_a_per_epoch`` when due, else 0.

    Due every ``stage_a_every``-th epoch (epochs 0, N, 2N, ...), or only in epoch 0 when it is 0.
    """
    ck = run.spec.customkd
    if run.models.customizer is None or ck.stage_a_steps == 0:
        return 0
    due = epoch == 0 if ck.stage_a_every == 0 else epoch % ck.stage_a_every == 0
    return ck.stage_a_per_epoch if due else 0


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
    views = train_view_count(spec, store.num_views)
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
    cfg = data_config(student.timm_model())
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


def train_stage_a(run: Run, epoch: int, cycle: int) -> dict[str, Any]:
    """One stage-A cycle: ``customkd.stage_a_steps`` optimizer steps of CE(H(P_t(f_t)), y).

    Each step draws ``stage_a_batch_size`` labeled (row, view) pairs with replacement, seeded by
    ``(seed, epoch, cycle)``. ``H`` is the student's head (fixed unless
    ``customkd.head_learns_in_stage_a``) or, with ``stage_a_head = separate``, a teacher head that
    learns with ``P_t``. The bound on ``P_t``'s output is set first (``set_target_bound``). A cycle
    stops early once a step's CE is below ``stage_a_ce_target`` (when > 0). Returns the steps run and
    ``stage_a_report``'s figures.
    """
    models, ck = run.models, run.spec.customkd
    assert models.customizer is not None and models.opt_a is not None  # stage_a_cycles checked
    customizer, opt = models.customizer, models.opt_a
    head = models.stage_a_head if models.stage_a_head is not None else models.student.head()
    learns = models.stage_a_head is not None or ck.head_learns_in_stage_a
    bound = set_target_bound(run)
    feats = torch.from_numpy(run.labeled[0]).to(run.device)
    labels = torch.from_numpy(run.labeled[1]).to(run.device)
    rng = np.random.default_rng([run.spec.seed, epoch, cycle, 21])
    steps = 0
    with _grad_enabled(head, learns):
        customizer.train()
        for _ in range(ck.stage_a_steps):
            idx = torch.from_numpy(rng.integers(0, len(labels), size=ck.stage_a_batch_size))
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
    with _frozen_batchnorm_stats(student):
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
        run.bound_pixels = torch.stack([run.replay[k]["pixels"] for k in range(len(chosen))]).to(run.device)
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


def train_view_count(spec: TrainSpec, num_views: int) -> int:
    """Views stage B (and stage A, the probe) draw from: the cached ones, or only view 0
    (``train_views = "eval"``)."""
    return 1 if spec.train_views == "eval" else num_views


def train_stage_b(
    run: Run, epoch: int, state: TrainState, total_steps: int, part: tuple[int, int] = (0, 1)
) -> tuple[dict[str, float], int]:
    """Part ``i`` of ``k`` of one stage-B epoch over labeled + unlabeled rows (``part = (i, k)``; the
    epoch's batch plan is cut into ``k`` contiguous parts); returns the sums of each loss term (and of
    ``f_s_norm``, the mean L2 norm of ``f_s`` per batch) and the number of steps.

    Under several ranks each batch of the plan is split between them (rank r takes rows r::world).
    """
    spec, models, dist = run.spec, run.models, run.dist
    batches = _epoch_batches(run, epoch)
    rows = [r for b in batches for r in b]
    views = draw_views(
        seed=spec.seed,
        epoch=epoch,
        rows=rows,
        num_views=train_view_count(spec, run.store.num_views),
        include_eval=spec.train_views == "all",
    )
    items, index_batches = epoch_items(batches, views)
    i, k = part
    index_batches = index_batches[i * len(index_batches) // k : (i + 1) * len(index_batches) // k]
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
        terms, f_s_norm = _stage_b_step(run, {k: v.to(run.device) for k, v in batch.items()}, dkd_ramp)
        _check_finite(terms, epoch, state.step, spec.method)
        models.opt_b.zero_grad(set_to_none=False)
        terms.total.backward()
        dist.average_gradients(params)
        models.opt_b.step()
        state.step += 1
        n += 1
        for key in LOSS_TERMS:
            sums[f"loss_{key}"] += float(getattr(terms, key).detach())
        sums["f_s_norm"] += f_s_norm
    return dict(sums), n


def _check_finite(terms: StageBTerms, epoch: int, step: int, method: str) -> None:
    """Stop at the first NaN/Inf loss instead of training on garbage (and reporting chance accuracy)."""
    if bool(torch.isfinite(terms.total.detach())):
        return
    parts = ", ".join(f"{k}={float(getattr(terms, k).detach()):.4g}" for k in LOSS_TERMS)
    raise NonFiniteLossError(
        f"{method}: loss is not finite at epoch {epoch}, step {step} ({parts}); lower optim.lr "
        "or the loss weights in the train spec"
    )


def _stage_b_step(run: Run, batch: dict[str, torch.Tensor], dkd_ramp: float) -> tuple[StageBTerms, float]:
    """The loss terms of one batch and the batch's mean L2 norm of ``f_s``."""
    spec, models = run.spec, run.models
    logits, f_s, h_s = models.student.forward_parts(batch["pixels"])
    f_t = _teacher_features(run, batch)
    needs_logits = bool({"kd", "dkd"} & method_terms(spec.method))
    teacher_logits = run.probe.logits(f_t) if needs_logits else None
    terms = stage_b_loss(
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
        h_s=h_s if models.pre_activation else None,
    )
    return terms, float(f_s.detach().float().norm(dim=1).mean())


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
def evaluate(run: Run, *, final: bool = False) -> dict[str, Any]:
    """Student accuracy on each evaluation split (view 0, the stored evaluation view), and on the
    validation rows when the protocol has them (``val_accuracy``).

    ``final``: also the linear CKA on the evaluation images between ``f_s`` and the cached teacher
    feature ``f_t`` (every method) and between ``f_s`` and ``P_t(f_t)`` (methods with a customizer),
    and the customized teacher's accuracy: the student's head on ``P_t(f_t)``.
    """
    eval_rows = {s: run.protocol.eval_indices(s, run.store.num_samples(s)) for s in run.protocol.eval_splits}
    acc, per_split, f_s = _student_accuracy(run, eval_rows, keep_features=final)
    out: dict[str, Any] = {"student_accuracy": acc, "student_accuracy_per_split": per_split}
    if run.protocol.val_rows:
        val_acc, val_split, _ = _student_accuracy(run, run.protocol.val_rows, keep_features=False)
        out.update(val_accuracy=val_acc, val_accuracy_per_split=val_split)
    if final and f_s is not None:
        out.update(_final_metrics(run, eval_rows, f_s))
    return out


def _student_accuracy(
    run: Run, rows_by_split: dict[str, list[int]], *, keep_features: bool
) -> tuple[float, dict[str, float], torch.Tensor | None]:
    """Accuracy over all rows, per split, and (``keep_features``) the (N, d_s) features ``f_s`` in
    the order of ``rows_by_split``."""
    models = run.models
    models.student.eval()
    per_split: dict[str, float] = {}
    feats: list[torch.Tensor] = []
    correct_all = total_all = 0
    for split, rows in rows_by_split.items():
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
            logits, f_s = models.student(batch["pixels"].to(run.device))
            correct += int((logits.argmax(1).cpu() == batch["label"]).sum())
            if keep_features:
                feats.append(f_s.float().cpu())
        per_split[split] = correct / max(len(rows), 1)
        correct_all += correct
        total_all += len(rows)
    f_s_all = torch.cat(feats) if keep_features and feats else None
    return correct_all / max(total_all, 1), per_split, f_s_all


def _final_metrics(run: Run, rows_by_split: dict[str, list[int]], f_s: torch.Tensor) -> dict[str, float]:
    """Linear CKA of ``f_s`` with ``f_t`` and with ``P_t(f_t)`` (view 0 of the same images), and the
    customized teacher's accuracy: the student's head on ``P_t(f_t)``."""
    f_t = torch.cat(
        [
            torch.from_numpy(run.features.get_many(s, np.asarray(r, np.int64), np.zeros(len(r), np.int64)))
            for s, r in rows_by_split.items()
        ]
    ).float()
    out = {"cka_student_teacher": linear_cka(f_s, f_t)}
    if run.models.customizer is not None:
        run.models.customizer.eval()
        customized = run.models.customizer(f_t.to(run.device))
        activate = to_feature_space(run.models)
        customized = customized if activate is None else activate(customized)
        out["cka_student_customized"] = linear_cka(f_s, customized.float().cpu())
        labels = np.concatenate(
            [run.store.labels(s)[np.asarray(r, np.int64)] for s, r in rows_by_split.items()]
        )
        head = run.models.student.head()
        predicted = head(customized.to(next(head.parameters()).dtype)).argmax(1).cpu().numpy()
        out["customized_teacher_accuracy"] = float((predicted == labels).mean()) if len(labels) else 0.0
    return out


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
        "val_accuracy": last.get("val_accuracy"),
        "cka_student_teacher": last.get("cka_student_teacher"),
        "cka_student_customized": last.get("cka_student_customized"),
        "customized_teacher_accuracy": last.get("customized_teacher_accuracy"),
        "best_student_accuracy": state.best_accuracy,
        "best_epoch": state.best_epoch,
        "last_epoch": state.epoch - 1,
        "epochs": run.spec.optim.epochs,
        "num_labeled": len(run.protocol.labeled),
        "num_unlabeled": len(run.protocol.unlabeled),
        "num_val": sum(len(r) for r in run.protocol.val_rows.values()),
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
    if "val_accuracy" in m:
        shown += f", val {100 * m['val_accuracy']:.2f}%"
    if "stage_a_ce" in m:
        shown = f", stage A CE {m['stage_a_ce']:.3f} acc {100 * m['stage_a_accuracy']:.1f}%" + shown
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
