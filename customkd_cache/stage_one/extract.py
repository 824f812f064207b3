"""Stage one: run a teacher once over a dataset's views and write a fingerprinted feature store.

The work unit is a whole store chunk (``store.unit_rows`` contiguous rows of one split). A process
claims a unit, computes all its rows and views, writes them in one go and only then marks the unit
done, so a kill at any moment followed by a rerun gives the bytes of an uninterrupted run. Several
processes (``torchrun`` ranks, ``--shard I/N`` jobs, or simply two runs of the same spec) share one
store: units are split between shards, and claims keep two processes off the same unit.

Finished units are written by a background thread (``_UnitWriter``: casting, zstd, sha256 and the
Zarr writes), at most ``WRITE_QUEUE`` of them waiting, so the teacher does not wait for them; a unit
is marked done, and its claim released, only once the thread has written it.
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from customkd_cache import library_versions
from customkd_cache.catalog import (
    cache_identity,
    dataset_identity,
    fingerprint,
    request_key,
    split_digests,
    teacher_key,
)
from customkd_cache.data import Dataset, open_dataset
from customkd_cache.data.views import render_view, sample_views, to_tensor
from customkd_cache.distributed import describe_device, resolve_device
from customkd_cache.errors import SpecError, StoreError
from customkd_cache.models.teachers import Teacher, create_teacher, fidelity_cosine
from customkd_cache.specs import CacheSpec, cache_root, to_dict
from customkd_cache.store import (
    FIDELITY_ATTR,
    FIDELITY_MIN_ATTR,
    FeatureStore,
    SplitInit,
    claims,
    create_or_open_store,
    num_units,
    store_name,
)

POLL_S = 0.5
WRITE_QUEUE = 2  # finished units waiting for the writer thread (each holds its features in memory)


@dataclass(frozen=True)
class Shard:
    """This process's share of the units: every unit whose global index % count == index."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` with 0 <= I < N."""
        try:
            i, n = (int(p) for p in text.split("/"))
        except ValueError:
            raise SpecError(f"--shard {text!r}: expected I/N, e.g. --shard 0/4") from None
        if not 0 <= i < n:
            raise SpecError(f"--shard {text!r}: need 0 <= I < N")
        return cls(i, n)

    @classmethod
    def from_env(cls) -> Shard:
        """The ``torchrun`` rank and world size (``RANK``, ``WORLD_SIZE``), or the single shard.

        Raises SpecError when they are not integers with 0 <= RANK < WORLD_SIZE (a stale or mistyped
        environment would otherwise compute nothing, or the wrong share).
        """
        rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
        try:
            index, count = int(rank), int(world)
        except ValueError:
            index, count = -1, 0
        if not 0 <= index < count:
            raise SpecError(
                f"RANK={rank!r} WORLD_SIZE={world!r}: expected integers with 0 <= RANK < WORLD_SIZE "
                "(torchrun sets them); unset both to run as one process, or fix them"
            )
        return cls(index, count)


@dataclass(frozen=True, kw_only=True)
class CachePlan:
    """Everything resolved before any feature is computed."""

    spec: CacheSpec
    dataset: Dataset
    teacher: Teacher
    identity: dict[str, Any]
    fingerprint: str
    request_key: str
    teacher_key: str
    path: Path
    units: list[tuple[str, int]] = field(default_factory=list)

    def estimated_bytes(self) -> int:
        itemsize = np.dtype(self.spec.store.dtype).itemsize
        n = sum(len(s.samples) for s in self.dataset.manifest.splits)
        return n * self.spec.views.num_views * (self.teacher.feature_dim * itemsize + 4 * 4 + 1)


@dataclass(frozen=True, kw_only=True)
class CacheResult:
    path: Path
    fingerprint: str
    units_computed: int
    units_skipped: int
    complete: bool
    images: int
    seconds: float  # the whole call, planning included
    work_seconds: float  # decoding, teacher passes and writes only
    repaired: tuple[str, ...] = ()  # what ``repair=True`` undid, one line each


def plan_cache(
    spec: CacheSpec, *, spec_path: Path | None, shard: Shard, device: torch.device | None = None
) -> CachePlan:
    """Open the dataset, build the teacher (on ``device``, the CPU by default), compute the
    fingerprint and list this shard's units."""
    dataset = open_dataset(spec.dataset)
    manifest = dataset.manifest
    spec_dir = spec_path.parent if spec_path else None
    teacher = create_teacher(spec.teacher, spec_dir=spec_dir, device=device or torch.device("cpu"))
    splits = {s.name: len(s.samples) for s in manifest.splits}
    identity = cache_identity(
        spec=spec,
        dataset=dataset_identity(
            kind=spec.dataset.kind,
            manifest_digest=manifest.digest(),
            splits=splits,
            digests=split_digests(manifest),
        ),
        teacher=teacher.identity(),
    )
    fp = fingerprint(identity)
    path = cache_root() / store_name(dataset=spec.dataset.kind, teacher=spec.teacher.name, fingerprint=fp)
    units = [(name, u) for name, n in splits.items() for u in range(num_units(n, spec.store.unit_rows))]
    mine = [unit for i, unit in enumerate(units) if i % shard.count == shard.index]
    rkey = request_key(spec=spec, manifest_digest=manifest.digest())
    return CachePlan(
        spec=spec,
        dataset=dataset,
        teacher=teacher,
        identity=identity,
        fingerprint=fp,
        request_key=rkey,
        teacher_key=teacher_key(spec=spec),
        path=path,
        units=mine,
    )


def split_inits(dataset: Dataset) -> dict[str, SplitInit]:
    """The ids and labels of every split of the dataset manifest, in order."""
    return {
        s.name: SplitInit(
            ids=[x.id for x in s.samples], labels=np.array([x.label for x in s.samples], np.int64)
        )
        for s in dataset.manifest.splits
    }


def open_plan_store(plan: CachePlan, *, command: Sequence[str] = ()) -> FeatureStore:
    """Create the store (race-safe) or open the existing one with the same fingerprint.

    ``command``: the command line that made it, recorded so that ``verify`` can print the repair.
    """
    manifest = plan.dataset.manifest
    inits = split_inits(plan.dataset)
    extra: dict[str, Any] = {
        "request_key": plan.request_key,
        "teacher_key": plan.teacher_key,
        "classes": list(manifest.classes),
        "dataset_kind": plan.spec.dataset.kind,
    }
    if plan.teacher.precision != "fp32" and not os.path.lexists(plan.path):  # measured by its creator
        cosine = _precision_fidelity(plan)
        extra[FIDELITY_ATTR], extra[FIDELITY_MIN_ATTR] = cosine["mean"], cosine["min"]
    return create_or_open_store(
        plan.path,
        fingerprint=plan.fingerprint,
        identity=plan.identity,
        provenance=provenance(plan.spec, command=command),
        splits=inits,
        num_views=plan.spec.views.num_views,
        feature_dim=plan.teacher.feature_dim,
        dtype=plan.spec.store.dtype,
        unit_rows=plan.spec.store.unit_rows,
        compressor=plan.spec.store.compressor,
        extra_attrs=extra,
    )


def provenance(spec: CacheSpec, *, command: Sequence[str] = ()) -> dict[str, Any]:
    """Resolved spec, library versions, host, time and the making command: recorded, never hashed."""
    return {
        "spec": to_dict(spec),
        "versions": library_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "argv": sys.argv,
        "command": list(command),
    }


FIDELITY_ROWS = 8  # images whose every view stage one runs in both precisions


def _precision_fidelity(plan: CachePlan) -> dict[str, float]:
    """``{"mean", "min"}`` cosine between the teacher's features in its precision and in fp32, over
    every view of the first ``FIDELITY_ROWS`` images of the first split (the first rows a run computes)."""
    split = plan.dataset.manifest.splits[0]
    rows = range(min(FIDELITY_ROWS, len(split.samples)))
    x = torch.cat([_render_row(plan, split.name, i)[0] for i in rows])
    return fidelity_cosine(plan.teacher, x, batch_size=plan.spec.run.batch_size)


# --- the work loop -----------------------------------------------------------------------------


class RowViews(TorchDataset):
    """Item ``(split, row)`` -> every view of that image, rendered for the teacher."""

    def __init__(self, plan: CachePlan) -> None:
        self.dataset = plan.dataset
        self.views = plan.spec.views
        self.pre = plan.teacher.preprocess

    def __len__(self) -> int:  # indices come from the batch sampler, never from range(len)
        return 0

    def __getitem__(self, key: tuple[str, int]) -> tuple[str, int, torch.Tensor, np.ndarray, np.ndarray]:
        split, row = key
        img = self.dataset.load_image(split, row)
        boxes, flips = sample_views(self.views, sample_index=row, width=img.width, height=img.height)
        pixels = torch.stack(
            [
                to_tensor(
                    render_view(
                        img,
                        boxes[v],
                        bool(flips[v]),
                        size=self.pre.input_size,
                        interpolation=self.pre.interpolation,
                    ),
                    mean=self.pre.mean,
                    std=self.pre.std,
                )
                for v in range(len(boxes))
            ]
        )
        return split, row, pixels, boxes, flips


def _render_row(plan: CachePlan, split: str, row: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    _, _, pixels, boxes, flips = RowViews(plan)[(split, row)]
    return pixels, boxes, flips


class _UnitBatches:
    """Batch sampler that claims units lazily and yields each unit's rows in batches.

    It runs in the main process (DataLoader iterates the batch sampler there), so a claim is taken
    just before the unit's rows are handed to the workers. Units claimed by live processes are
    waited for (their claim may go stale after a kill, and is then taken over), but only while this
    process holds no unit of its own: DataLoader asks the sampler for the next batch before it hands
    the current one over, so a sampler that waited while holding a claim would keep its own unit from
    being written while another process waits for that unit in turn (two writers deadlock). With
    units held it ends the pass instead (``finished`` stays False); ``run_cache`` writes them and
    starts another pass.
    """

    def __init__(self, store: FeatureStore, units: list[tuple[str, int]], batch: int, lease_s: float) -> None:
        self.store, self.units, self.batch, self.lease_s = store, units, batch, lease_s
        self.held: dict[tuple[str, int], claims.Claim] = {}
        self._lock = threading.Lock()  # the writer thread releases the units it has written
        self.skipped = 0
        self.finished = False  # every unit is done or was handed out (no pass needed after this one)

    def __iter__(self) -> Iterator[list[tuple[str, int]]]:
        pending = [u for u in self.units if not self._done(u)]
        self.skipped = len(self.units) - len(pending)
        while pending:
            progressed = False
            for unit in list(pending):
                if self._done(unit):
                    pending.remove(unit)
                    continue
                claim = self._claim(unit)
                if claim is None:
                    continue
                if self._done(unit):  # finished by another process between our check and our claim
                    claim.release()
                    pending.remove(unit)
                    continue
                with self._lock:
                    self.held[unit] = claim
                pending.remove(unit)
                progressed = True
                rows = self.store.units(unit[0])[unit[1]]
                for start in range(rows.start, rows.stop, self.batch):
                    yield [(unit[0], r) for r in range(start, min(start + self.batch, rows.stop))]
            if pending and not progressed:
                if self.held:  # never wait for others while holding a unit (see the class docstring)
                    return
                time.sleep(POLL_S)
        self.finished = True

    def _claim(self, unit: tuple[str, int]) -> claims.Claim | None:
        try:
            return claims.try_claim(
                self.store.claim_dir(unit[0]), f"unit-{unit[1]:06d}", lease_s=self.lease_s
            )
        except OSError as e:  # a read-only or full store directory
            raise StoreError(
                f"{self.store.path}: cannot claim split '{unit[0]}' unit {unit[1]} ({e.strerror or e}); the "
                "store is incomplete and not writable here: finish it where it can be written, or set "
                "CUSTOMKD_CACHE_ROOT to a directory you can write"
            ) from None

    def _done(self, unit: tuple[str, int]) -> bool:
        return self.store.unit_done(*unit)

    def release(self, unit: tuple[str, int]) -> None:
        with self._lock:
            claim = self.held.pop(unit, None)
        if claim is not None:
            claim.release()

    def release_all(self) -> None:
        with self._lock:
            units = list(self.held)
        for unit in units:
            self.release(unit)


def collate_rows(items: list[tuple[str, int, torch.Tensor, np.ndarray, np.ndarray]]) -> list[Any]:
    return items


class _UnitBuffer:
    """Collects a unit's rows (in order) until the unit is whole."""

    def __init__(self, store: FeatureStore, split: str, unit: int) -> None:
        self.rows = store.units(split)[unit]
        self.features: list[np.ndarray] = []
        self.boxes: list[np.ndarray] = []
        self.flips: list[np.ndarray] = []

    def add(self, features: np.ndarray, boxes: np.ndarray, flips: np.ndarray) -> None:
        self.features.append(features)
        self.boxes.append(boxes)
        self.flips.append(flips)

    def full(self) -> bool:
        return sum(len(f) for f in self.features) == len(self.rows)


@dataclass(frozen=True)
class _Job:
    split: str
    unit: int
    features: np.ndarray
    boxes: np.ndarray
    flips: np.ndarray


class _UnitWriter:
    """Writes finished units (``FeatureStore.write_unit``) in a background thread, then calls
    ``on_written(unit)``; ``threaded=False`` writes each unit inline in ``submit`` instead.

    At most ``WRITE_QUEUE`` units wait; ``submit`` blocks while the queue is full. The thread's first
    error is raised in the caller's thread, unchanged (a full disk is the store's one-line StoreError),
    by the next ``submit`` or by ``close``; after an error the thread drops what is queued (those units
    stay not done, their claims are released by the caller). ``close`` waits for every queued unit;
    ``abort`` drops the waiting ones and waits only for the unit being written.
    """

    def __init__(
        self, store: FeatureStore, on_written: Callable[[tuple[str, int]], None], *, threaded: bool = True
    ) -> None:
        self.store, self.on_written = store, on_written
        self.written = 0
        self._error: BaseException | None = None
        self._drop = threading.Event()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=WRITE_QUEUE)
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="customkd-unit-writer", daemon=True)
            self._thread.start()

    def submit(self, job: _Job) -> None:
        self._raise()
        if self._thread is None:
            self._write(job)
            return
        self._put(job)

    def close(self) -> None:
        """Write everything queued, stop the thread, raise its error if it had one."""
        self._stop()
        self._raise()

    def abort(self) -> None:
        """Drop the queued units and stop the thread (the unit being written is finished)."""
        self._drop.set()
        self._stop()

    def _write(self, job: _Job) -> None:
        self.store.write_unit(job.split, job.unit, features=job.features, boxes=job.boxes, flips=job.flips)
        self.written += 1
        self.on_written((job.split, job.unit))

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is not None or self._drop.is_set():
                continue  # keep taking jobs, so that a submit never blocks on a dead writer
            try:
                self._write(job)
            except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
                self._error = e

    def _put(self, item: _Job | None) -> None:
        assert self._thread is not None
        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def _stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._put(None)
            self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def extract_batch(
    teacher: Teacher, pixels: torch.Tensor, *, batch_size: int, device: torch.device
) -> np.ndarray:
    """Teacher features for ``pixels`` (R, V, 3, S, S) -> (R, V, D) float32, ``batch_size`` views a pass."""
    r, v = pixels.shape[:2]
    flat = pixels.reshape(r * v, *pixels.shape[2:])
    out = [
        teacher.features(flat[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(flat), batch_size)
    ]
    return torch.cat(out).reshape(r, v, -1).numpy()


def run_cache(
    spec: CacheSpec,
    *,
    spec_path: Path | None,
    shard: Shard,
    lease_s: float = 600.0,
    progress: bool = True,
    repair: bool = False,
    command: Sequence[str] = (),
    writer_thread: bool = True,
) -> CacheResult:
    """Compute this shard's missing units and write them; finalize every split that is whole.

    ``repair``: first check this shard's done units (every array against the unit's sha256) and the
    stored ids, labels and statistics, and mark what is damaged for recompute (``FeatureStore.repair``);
    the run then rewrites it, giving the bytes of an undamaged store. ``command``: the command line,
    recorded in a new store's provenance. ``writer_thread``: write finished units in a background
    thread (``_UnitWriter``); False writes them inline (the reference ``benchmarks/bench_stage_one.py``
    compares with).
    """
    t0 = time.perf_counter()
    device = resolve_device(spec.run.device)  # cuda:LOCAL_RANK under torchrun
    plan = plan_cache(spec, spec_path=spec_path, shard=shard, device=device)  # the teacher built there
    if spec.run.threads:
        torch.set_num_threads(spec.run.threads)
    store = open_plan_store(plan, command=command)
    repaired = tuple(store.repair(split_inits(plan.dataset), plan.units)) if repair else ()
    rows_per_batch = max(1, spec.run.batch_size // spec.views.num_views)
    done = {name: store.done_units(name) for name in store.split_names}  # one read per split
    total = sum(len(store.units(s)[u]) for s, u in plan.units if not done[s][u])
    if progress:
        print(f"device: {describe_device(device)}", file=sys.stderr, flush=True)
    bar = _progress(total, enabled=progress)
    t_work = time.perf_counter()
    computed = images = 0
    skipped: int | None = None
    try:
        finished = False
        while not finished:  # a pass ends early when the units left are another writer's
            sampler = _UnitBatches(store, plan.units, rows_per_batch, lease_s)
            c, i = _write_pass(plan, store, sampler, bar, device, threaded=writer_thread)
            computed, images = computed + c, images + i
            skipped = sampler.skipped if skipped is None else skipped
            finished = sampler.finished
    finally:
        bar.close()
    complete = all([store.finalize_split(s) for s in store.split_names])
    work = time.perf_counter() - t_work
    if not complete and shard.count == 1:
        raise StoreError(f"{store.path}: some units are still missing after the run; rerun to finish them")
    return CacheResult(
        path=store.path,
        fingerprint=plan.fingerprint,
        units_computed=computed,
        units_skipped=skipped or 0,
        complete=complete,
        images=images,
        seconds=time.perf_counter() - t0,
        work_seconds=work,
        repaired=repaired,
    )


def _write_pass(
    plan: CachePlan,
    store: FeatureStore,
    sampler: _UnitBatches,
    bar: Any,
    device: torch.device,
    *,
    threaded: bool = True,
) -> tuple[int, int]:
    """One pass of ``sampler`` over the units: compute each unit it hands out and hand it to the
    writer (which releases its claim once it is written); return the units written and the images
    computed. On a failure the units still queued are dropped, and every claim still held is released."""
    spec = plan.spec
    loader = DataLoader(
        RowViews(plan),
        batch_sampler=sampler,
        num_workers=spec.run.num_workers,
        collate_fn=collate_rows,
        persistent_workers=False,
    )
    buffers: dict[tuple[str, int], _UnitBuffer] = {}
    images = 0
    writer = _UnitWriter(store, sampler.release, threaded=threaded)
    try:
        for items in loader:
            split, first = items[0][0], items[0][1]
            unit = (split, first // store.unit_rows)
            buf = buffers.setdefault(unit, _UnitBuffer(store, *unit))
            pixels = torch.stack([it[2] for it in items])
            feats = extract_batch(plan.teacher, pixels, batch_size=spec.run.batch_size, device=device)
            buf.add(feats, np.stack([it[3] for it in items]), np.stack([it[4] for it in items]))
            images += len(items)
            bar.update(len(items))
            if buf.full():
                writer.submit(
                    _Job(
                        split,
                        unit[1],
                        features=np.concatenate(buf.features),
                        boxes=np.concatenate(buf.boxes),
                        flips=np.concatenate(buf.flips),
                    )
                )
                del buffers[unit]
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        sampler.release_all()
    return writer.written, images


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, *, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="cache", dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
