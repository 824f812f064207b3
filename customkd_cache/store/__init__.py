"""Feature stores: one Zarr v3 group per (dataset, teacher, fingerprint), written in whole work units.

A store is a directory ``NAME.zarr`` (see ``store_name``). Its root attributes are written once, when
the store is created, and never again, so concurrent writers never race on ``zarr.json``:
``format_version``, ``fingerprint``, ``identity`` (what was hashed into the fingerprint),
``provenance``, ``splits``, ``num_views``, ``feature_dim``, ``dtype``, ``unit_rows``, ``compressor``
and any ``extra_attrs``. Each split is a subgroup holding, with ``N`` samples, ``V`` views, ``D``
feature dims and ``U = ceil(N / unit_rows)`` work units:

- ``features`` (N, V, D) ``dtype``, chunks (unit_rows, V, D): one chunk file per work unit.
- ``boxes`` (N, V, 4) float32 normalized x0, y0, x1, y1; ``flips`` (N, V) uint8; chunked like features.
- ``ids`` (N,) UTF-8 strings and ``labels`` (N,) int64, chunked by unit, written in full at creation.
- ``done`` (U,) uint8, one uncompressed file per unit: a unit is done only if its marker reads 1.
- ``unit_sum``, ``unit_sumsq`` (U, D) float64: per-unit sums over rows and views of the features as
  stored; ``unit_sha256`` (U, 32) uint8: the sha256 of every array of the unit (see ``unit_digest``).
- ``mean``, ``std`` (D,) float32 over the N * V stored rows, then the ``stats_done`` (1,) marker.

``dtype = "int8"`` stores per-unit, per-dimension affine codes: ``features`` holds int8 codes ``q`` and
``quant_scale``, ``quant_offset`` (U, D) float32 hold each unit's parameters, so a feature reads back
as ``q * scale + offset`` (``dequantize``). A unit's parameters map the minimum and maximum of each
dimension over its rows and views to -128 and 127; they depend on the unit's features alone, so
independent writers and resumed runs give identical bytes. ``quant_cosine`` (U, 2) float64 records,
per unit, the sum and the minimum over its rows and views of the cosine between the decoded and the
float32 features, measured at write time. All three are unit data (hashed with the unit). For int8
stores ``unit_sum``/``unit_sumsq``, ``mean`` and ``std`` are over the decoded features, and the reads
below return decoded float32 (``read_codes`` the codes).

``_LAYOUT`` is the one table of these arrays (creation and ``verify`` both read it). The arrays of a
unit are every array of the split whose first axis runs over rows or units, except the bookkeeping
ones (``done``, ``unit_sha256``); each unit's hash covers all of them, so readers refuse a unit whose
features, boxes, flips, ids, labels or sums changed after it was written.

Writers own whole units (two processes writing parts of one chunk lose rows), write a unit's data
first and its ``done`` marker last, and every file is written by rename, so a kill at any moment
leaves the unit not done and a rerun gives the same bytes. Readers read whole chunks. Claims that
keep two writers off one unit live in ``<store>/.claims/<split>/`` (see ``claims.py``).

This module is the only one that imports zarr.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

from customkd_cache import FORMAT_VERSION
from customkd_cache.errors import NonFiniteFeatureError, StoreError, closest
from customkd_cache.store.claims import pid_alive

DTYPES: tuple[str, ...] = ("float16", "float32", "int8")
QUANTIZED_DTYPE = "int8"  # stored as per-unit affine codes (see the module docstring)
QUANT_ARRAYS = ("quant_scale", "quant_offset")  # what decoding needs, beside the codes
_Q_MIN, _Q_MAX = -128, 127
COMPRESSORS: tuple[str, ...] = ("zstd", "none")
ZSTD_LEVEL = 3
CLAIMS_DIR = ".claims"
# Store attribute written by stage one for bf16 teachers: mean cosine of bf16 vs fp32 features.
FIDELITY_ATTR = "bf16_cosine_to_fp32"
_BASE_ATTRS = (
    "format_version",
    "fingerprint",
    "identity",
    "provenance",
    "splits",
    "num_views",
    "feature_dim",
    "dtype",
    "unit_rows",
    "compressor",
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SHOW_IDS = 5  # sample ids named in an error message; the count says how many more
_SHOW_RUNS = 20  # runs of unit indices named in an error message ("3, 7-9"); the count says how many


@dataclass(frozen=True)
class _ArrayLayout:
    """One array of a split. ``per``: what axis 0 runs over (``"row"``: N samples, chunked by unit;
    ``"unit"``: U units, one chunk each; ``"split"``: no such axis, one chunk). ``tail``: the other
    axes, ``"V"``/``"D"`` standing for views and feature dims. ``dtype``: ``"store"`` for the store's
    dtype, ``"str"`` for UTF-8 strings. ``unit_data``: covered by the unit's sha256."""

    per: Literal["row", "unit", "split"]
    tail: tuple[int | str, ...]
    dtype: str
    compressed: bool
    unit_data: bool


_LAYOUT: dict[str, _ArrayLayout] = {
    "features": _ArrayLayout("row", ("V", "D"), "store", True, True),
    "boxes": _ArrayLayout("row", ("V", 4), "float32", True, True),
    "flips": _ArrayLayout("row", ("V",), "uint8", True, True),
    "ids": _ArrayLayout("row", (), "str", True, True),
    "labels": _ArrayLayout("row", (), "int64", True, True),
    "done": _ArrayLayout("unit", (), "uint8", False, False),
    "unit_sum": _ArrayLayout("unit", ("D",), "float64", False, True),
    "unit_sumsq": _ArrayLayout("unit", ("D",), "float64", False, True),
    "unit_sha256": _ArrayLayout("unit", (32,), "uint8", False, False),
    "mean": _ArrayLayout("split", ("D",), "float32", False, False),
    "std": _ArrayLayout("split", ("D",), "float32", False, False),
    "stats_done": _ArrayLayout("split", (1,), "uint8", False, False),
}
# The arrays an int8 store adds to ``_LAYOUT`` (see ``_layout``).
_QUANT_LAYOUT: dict[str, _ArrayLayout] = {
    "quant_scale": _ArrayLayout("unit", ("D",), "float32", False, True),
    "quant_offset": _ArrayLayout("unit", ("D",), "float32", False, True),
    "quant_cosine": _ArrayLayout("unit", (2,), "float64", False, True),
}
# Arrays of a split that never belong to a unit's hashed data, whatever their shape.
_BOOKKEEPING = frozenset(name for name, a in _LAYOUT.items() if not a.unit_data)


def _layout(dtype: str) -> dict[str, _ArrayLayout]:
    """The arrays of a split of a store of ``dtype``."""
    return _LAYOUT | _QUANT_LAYOUT if dtype == QUANTIZED_DTYPE else _LAYOUT


@dataclass(frozen=True)
class SplitInit:
    """What creating a split needs: the sample ids and labels from the dataset manifest, in order."""

    ids: Sequence[str]
    labels: np.ndarray  # (N,) int64


def num_units(num_samples: int, unit_rows: int) -> int:
    """``ceil(num_samples / unit_rows)``: the work units (== chunks) of a split."""
    return -(-num_samples // unit_rows)


def unit_ranges(num_samples: int, unit_rows: int) -> list[range]:
    """Contiguous row ranges, one per work unit; the last may be short."""
    return [range(start, min(start + unit_rows, num_samples)) for start in range(0, num_samples, unit_rows)]


def format_units(indices: Sequence[int]) -> str:
    """Unit indices as runs for a message: ``[3, 7, 8, 9]`` -> ``"3, 7-9"``; past ``_SHOW_RUNS`` runs
    the rest is counted (``"..., ... (40 in all)"``)."""
    runs: list[list[int]] = []
    for k in sorted(set(indices)):
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:_SHOW_RUNS])
    return shown + (f", ... ({len(set(indices))} in all)" if len(runs) > _SHOW_RUNS else "")


# --- naming, creating, opening, listing ---------------------------------------------------------


def store_name(*, dataset: str, teacher: str, fingerprint: str) -> str:
    """``"<dataset>__<teacher>__<first 12 hex of fingerprint>.zarr"``, characters outside
    ``[A-Za-z0-9._-]`` replaced by ``_``.

    Raises ValueError when the fingerprint is not hex (at least 12 digits) or a name sanitizes to
    nothing: a store is never named by a random or empty key.
    """
    if not re.fullmatch(r"[0-9a-f]{12,}", fingerprint):
        raise ValueError(f"fingerprint must be lowercase sha256 hex, got {fingerprint!r}")
    parts = [_UNSAFE.sub("_", s).strip("._") for s in (dataset, teacher)]
    if not all(parts):
        raise ValueError(f"dataset and teacher names must not be empty, got {dataset!r}, {teacher!r}")
    return f"{parts[0]}__{parts[1]}__{fingerprint[:12]}.zarr"


def create_or_open_store(
    path: Path,
    *,
    fingerprint: str,
    identity: Mapping[str, Any],
    provenance: Mapping[str, Any],
    splits: Mapping[str, SplitInit],
    num_views: int,
    feature_dim: int,
    dtype: str,
    unit_rows: int,
    compressor: str,
    extra_attrs: Mapping[str, Any] | None = None,
) -> FeatureStore:
    """Create the store at ``path``, or open the one already there, writable.

    Race-safe: the whole store (attributes, ids, labels, empty markers) is built in a temporary
    directory beside ``path`` and renamed into place, so concurrent callers all end up with the one
    store that won the rename. An existing store must carry ``fingerprint`` and the same splits,
    sample counts, views, feature dim and dtype.

    Raises:
        ValueError: bad arguments (sizes < 1, unknown dtype/compressor, ids and labels of different
            lengths, attributes that are not JSON, split names with '/' or a leading '.').
        StoreError: ``path`` exists but is not a store, or is a store with another fingerprint or
            layout (it is never reused), or cannot be written.
    """
    path = Path(path)
    attrs = _root_attrs(
        fingerprint=fingerprint,
        identity=identity,
        provenance=provenance,
        splits=splits,
        num_views=num_views,
        feature_dim=feature_dim,
        dtype=dtype,
        unit_rows=unit_rows,
        compressor=compressor,
        extra_attrs=extra_attrs,
    )
    if not os.path.lexists(path):
        _build_and_rename(path, attrs, splits)
    store = open_store(path, fingerprint=fingerprint, writable=True)
    store._check_layout(attrs, {name: len(init.ids) for name, init in splits.items()})
    return store


def open_store(path: Path, *, fingerprint: str | None = None, writable: bool = False) -> FeatureStore:
    """Open an existing store; read-only unless ``writable`` (works on a read-only directory).

    Raises:
        StoreError: the path is missing, is not a customkd-cache store, was written in another
            format version, or carries a fingerprint other than ``fingerprint``.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no feature store here; build it with `customkd-cache cache --spec FILE`")
    if not (path / "zarr.json").is_file():
        raise StoreError(
            f"{path}: not a feature store (no zarr.json); give the path of a NAME.zarr directory"
        )
    try:
        group = zarr.open_group(
            LocalStore(path, read_only=not writable), mode="r+" if writable else "r", zarr_format=3
        )
        attrs = group.attrs.asdict()
    except Exception as e:  # zarr raises several types for a malformed or foreign hierarchy
        raise StoreError(f"{path}: not a readable Zarr v3 group ({type(e).__name__}: {e})") from None
    missing = [key for key in _BASE_ATTRS if key not in attrs]
    if missing:
        raise StoreError(f"{path}: not a customkd-cache store (attributes {missing} missing)")
    if attrs["format_version"] != FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format {attrs['format_version']}, this customkd-cache reads format "
            f"{FORMAT_VERSION}; rebuild the store with `customkd-cache cache` or use a matching version"
        )
    if fingerprint is not None and attrs["fingerprint"] != fingerprint:
        raise StoreError(
            f"{path}: store fingerprint {attrs['fingerprint']} differs from the spec's {fingerprint}; "
            "it was built from another spec and is never reused: remove it or point at the right store"
        )
    return FeatureStore(path, group, attrs, writable=writable)


def list_stores(root: Path) -> list[dict[str, Any]]:
    """One entry per store directly under ``root`` (``*.zarr`` directories), sorted by name.

    Entry keys: ``path``, ``dataset``, ``teacher`` (name), ``splits``, ``complete``, ``size_bytes``
    (on disk), ``fingerprint``, ``request_key``, ``num_samples`` (total), ``num_views``, ``created``
    (from the provenance), ``damaged`` and ``error``. A store that cannot be read is listed with
    ``damaged`` true and the reason in ``error`` instead of stopping the listing. Temporary build
    directories (dot-named) and ``*.zarr`` directories without ``zarr.json`` (not stores) are
    skipped. Raises StoreError when ``root`` is not a directory.
    """
    entries = []
    for child in store_dirs(root):
        try:
            entries.append(_list_entry(open_store(child)))
        except Exception as e:  # StoreError, or zarr's own errors for a damaged hierarchy
            entries.append(_damaged_entry(child, e))
    return entries


def store_dirs(root: Path) -> list[Path]:
    """The store directories directly under ``root``, sorted by name: ``*.zarr`` directories with a
    ``zarr.json``, temporary (dot-named) build directories left out. Opens nothing. Raises
    StoreError when ``root`` is not a directory."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(
            f"{root}: cache root not found; pass an existing directory or set CUSTOMKD_CACHE_ROOT"
        )
    return [
        child
        for child in sorted(root.iterdir())
        if not child.name.startswith(".")
        and child.suffix == ".zarr"
        and child.is_dir()
        and (child / "zarr.json").is_file()
    ]


def _list_entry(store: FeatureStore) -> dict[str, Any]:
    provenance = store.attrs.get("provenance")
    return {
        "path": str(store.path),
        "dataset": store.dataset_name(),
        "teacher": store.teacher_name(),
        "splits": list(store.split_names),
        "complete": store.complete(),
        "size_bytes": store.size_bytes(),
        "fingerprint": store.fingerprint,
        "request_key": store.attrs.get("request_key"),
        "num_samples": sum(store.num_samples(s) for s in store.split_names),
        "num_views": store.num_views,
        "created": provenance.get("created") if isinstance(provenance, dict) else None,
        "damaged": False,
        "error": "",
    }


def _damaged_entry(path: Path, error: Exception) -> dict[str, Any]:
    size = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                size += os.lstat(os.path.join(folder, name)).st_size
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return {
        "path": str(path),
        "dataset": None,
        "teacher": None,
        "splits": [],
        "complete": False,
        "size_bytes": size,
        "fingerprint": None,
        "request_key": None,
        "num_samples": None,
        "num_views": None,
        "created": None,
        "damaged": True,
        "error": text,
    }


# --- the store ---------------------------------------------------------------------------------


class FeatureStore:
    """An opened store. Get one from ``create_or_open_store`` or ``open_store``.

    Unknown split names raise StoreError naming the valid ones. Reads of features, boxes and
    statistics refuse (StoreError) units that are not done, so a reader never sees unwritten rows.
    """

    def __init__(self, path: Path, group: zarr.Group, attrs: dict[str, Any], *, writable: bool) -> None:
        self.path = path
        self.attrs = attrs
        self.writable = writable
        self.fingerprint: str = attrs["fingerprint"]
        self.split_names: tuple[str, ...] = tuple(attrs["splits"])
        self.num_views: int = int(attrs["num_views"])
        self.feature_dim: int = int(attrs["feature_dim"])
        self.unit_rows: int = int(attrs["unit_rows"])
        self.dtype = np.dtype(attrs["dtype"]).newbyteorder("<")  # as stored on disk
        self.quantized: bool = attrs["dtype"] == QUANTIZED_DTYPE
        self._group = group
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._ids: dict[str, tuple[str, ...]] = {}
        self._unit_names: dict[str, dict[str, str]] = {}

    def __repr__(self) -> str:
        splits = list(self.split_names)
        return f"FeatureStore({str(self.path)!r}, splits={splits}, fingerprint={self.fingerprint[:12]})"

    # --- geometry

    def num_samples(self, split: str) -> int:
        return int(self._array(split, "features").shape[0])

    def num_units(self, split: str) -> int:
        return num_units(self.num_samples(split), self.unit_rows)

    def units(self, split: str) -> list[range]:
        """Contiguous row ranges, one per work unit (== one chunk); the last may be short."""
        return unit_ranges(self.num_samples(split), self.unit_rows)

    def claim_dir(self, split: str) -> Path:
        """Where claims on this split's units live: ``<store>/.claims/<split>`` (not a zarr node)."""
        self._check_split(split)
        return self.path / CLAIMS_DIR / split

    # --- writing

    def done_units(self, split: str) -> np.ndarray:
        """(num_units,) bool: which units are done. An unreadable or partial marker counts as not done."""
        done = self._array(split, "done")
        try:
            return np.asarray(done[:]) == 1
        except Exception:  # one damaged marker fails the whole read; fall back to one read per unit
            return np.array([self.unit_done(split, k) for k in range(done.shape[0])], dtype=bool)

    def write_unit(
        self, split: str, unit: int, *, features: np.ndarray, boxes: np.ndarray, flips: np.ndarray
    ) -> None:
        """Write one whole work unit, then mark it done.

        Args:
            features: (n, V, D) float, n == len(units(split)[unit]); stored cast to the store dtype
                (int8: quantized with this unit's parameters, see ``quantize_unit``).
            boxes: (n, V, 4) float32 normalized crop boxes. flips: (n, V) bool.

        Everything is checked before anything is written. A failure midway leaves the unit not done;
        rewriting a done unit first clears its marker and the split's stats marker.

        Raises:
            ValueError: wrong shapes (expected vs got), non-float features, non-finite boxes.
            NonFiniteFeatureError: NaN/Inf features, or values the store dtype cannot hold (float16
                overflow, an int8 range beyond float32); the message names the split and the first
                sample ids.
            StoreError: the store was opened read-only or its directory cannot be written.
        """
        rows = self._unit_range(split, unit)
        n, v, d = len(rows), self.num_views, self.feature_dim
        features = _shaped(features, (n, v, d), "features")
        boxes = _shaped(boxes, (n, v, 4), "boxes").astype("<f4")
        flips = _shaped(flips, (n, v), "flips").astype(bool).astype(np.uint8)
        if features.dtype.kind != "f":
            raise ValueError(f"features must be floating point, got dtype {features.dtype}")
        if not np.isfinite(boxes).all():
            raise ValueError(f"split '{split}' unit {unit}: crop boxes contain NaN/Inf")
        self._check_finite(
            split,
            unit,
            features,
            what="the teacher produced NaN/Inf features",
            fix="check those images or run the teacher with teacher.precision = 'fp32'",
        )
        quant: dict[str, np.ndarray] = {}
        if self.quantized:
            stored, scale, offset = quantize_unit(features)
            decoded = dequantize(stored, scale, offset)
            self._check_finite(
                split,
                unit,
                decoded,
                what="features span more than the float32 range",
                fix="set store.dtype = 'float32' in the cache spec",
            )
            quant = {
                "quant_scale": scale,
                "quant_offset": offset,
                "quant_cosine": _cosine_record(features, decoded),
            }
        else:
            with np.errstate(over="ignore"):  # overflow is reported below with the sample ids
                stored = decoded = np.ascontiguousarray(features, dtype=self.dtype)
            self._check_finite(
                split,
                unit,
                stored,
                what=f"features exceed the {self.dtype.name} range",
                fix="set store.dtype = 'float32' in the cache spec",
            )
        total, total_sq = _unit_sums(decoded)
        self._require_writable()
        written = {
            "features": stored,
            "boxes": boxes,
            "flips": flips,
            "unit_sum": total,
            "unit_sumsq": total_sq,
            **quant,
        }
        try:
            if self.unit_done(split, unit):
                self._array(split, "done")[unit] = 0
            # stats written while this unit was not done (its marker lost) are recomputed from the sums
            if self._marker(split, "stats_done"):
                self._array(split, "stats_done")[0] = 0
            for name in ("features", "boxes", "flips"):
                self._array(split, name)[rows.start : rows.stop] = written[name]
            self._array(split, "unit_sum")[unit] = total
            self._array(split, "unit_sumsq")[unit] = total_sq
            for name, value in quant.items():
                self._array(split, name)[unit] = value
            # the rest of the unit's arrays (ids, labels, any other) as they are on disk now
            data = written | self._read_unit_data(split, unit, skip=tuple(written))
            self._array(split, "unit_sha256")[unit] = unit_digest(data)
            self._array(split, "done")[unit] = 1
        except OSError as e:  # read-only directory, disk full, quota
            raise StoreError(
                f"{self.path}: cannot write split '{split}' unit {unit} ({e.strerror or e}); free space "
                "or use a cache root you can write, then rerun (the unit is not marked done)"
            ) from None

    def finalize_split(self, split: str) -> bool:
        """Write mean/std (then the stats marker) once every unit is done; return whether the split
        is complete. Idempotent; two processes finalizing at once write identical bytes.

        Raises StoreError when the stats need writing but the store was opened read-only.
        """
        if not self.done_units(split).all():
            return False
        if self._marker(split, "stats_done"):
            return True
        self._require_writable()
        mean, std = self._stats_from_sums(split)
        try:
            self._array(split, "mean")[:] = mean
            self._array(split, "std")[:] = std
            self._array(split, "stats_done")[0] = 1
        except OSError as e:  # disk full, quota, read-only directory
            raise StoreError(
                f"{self.path}: cannot write the statistics of split '{split}' ({e.strerror or e}); "
                "free space or use a cache root you can write, then rerun"
            ) from None
        return True

    def _stats_from_sums(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(D,) float32 mean and population std from the unit sums (what ``finalize_split`` writes)."""
        total, total_sq, count = self.raw_sums(split)
        mean = total / count
        # population variance from exact-order float64 sums; clamp the rounding below zero
        var = np.maximum(total_sq / count - mean * mean, 0.0)
        return mean.astype(np.float32), np.sqrt(var).astype(np.float32)

    def repair(self, splits: Mapping[str, SplitInit], units: Sequence[tuple[str, int]]) -> list[str]:
        """Undo damage so that a cache run recomputes it; return what was repaired, one line each.

        ``splits``: the dataset manifest's ids and labels, rewritten where the store's differ (they
        are inputs, never recomputed). ``units``: the (split, unit) pairs to check; a done unit whose
        arrays fail their sha256, hold NaN/Inf or cannot be read is marked not done, and units whose
        marker is lost (missing, unreadable, not 1) are named: the run computes them all. Mean/std
        are marked not written when they disagree with the unit sums, cannot be read, or are marked
        written while a unit is not done, so the run rewrites them from the sums of the recomputed
        units. Nothing damaged is kept. Raises StoreError if read-only.
        """
        self._require_writable()
        try:
            repaired = self._repair_rows(splits)
            repaired += self._repair_units(units)
            repaired += self._repair_stats()
        except OSError as e:
            raise StoreError(
                f"{self.path}: cannot repair ({e.strerror or e}); use a store you can write"
            ) from None
        return repaired

    def _repair_rows(self, splits: Mapping[str, SplitInit]) -> list[str]:
        return [
            f"split '{split}': ids/labels rewritten from the dataset manifest"
            for split, init in splits.items()
            if self._rewrite_rows(split, init)
        ]

    def _repair_units(self, units: Sequence[tuple[str, int]]) -> list[str]:
        """Mark the damaged done units of ``units`` not done; name the units already not done."""
        repaired: list[str] = []
        lost: dict[str, list[int]] = {}
        for split, unit in units:
            if not self.unit_done(split, unit):
                lost.setdefault(split, []).append(unit)
                continue
            problem, _ = self._unit_problem(split, unit)
            if problem is not None:
                self._array(split, "done")[unit] = 0
                self._array(split, "stats_done")[0] = 0
                repaired.append(f"{self._where(split, unit)}: {problem}; marked for recompute")
        for split, indices in lost.items():
            repaired.append(
                f"split '{split}': units {format_units(indices)} of {self.num_units(split)} not done "
                "(marker missing, unreadable or 0); computed by this run"
            )
        return repaired

    def _repair_stats(self) -> list[str]:
        """Mark each split's mean/std not written where they cannot be trusted."""
        repaired = []
        for split in self.split_names:
            if not self._marker(split, "stats_done"):
                continue
            if not self.done_units(split).all():
                why = "marked written while units are not done"
            elif self._stats_problem(split):
                why = "disagree with the unit sums"
            else:
                continue
            self._array(split, "stats_done")[0] = 0
            repaired.append(
                f"split '{split}': mean/std {why}; rewritten from the unit sums once all are done"
            )
        return repaired

    def _rewrite_rows(self, split: str, init: SplitInit) -> bool:
        """Rewrite ids and labels from the manifest where they differ; whether anything changed."""
        ids = np.array([str(x) for x in init.ids], dtype=object)
        labels = np.asarray(init.labels, dtype=np.int64)
        changed = False
        for name, want in (("ids", ids), ("labels", labels)):
            arr = self._array(split, name)
            for rows in self.units(split):
                try:
                    same = np.array_equal(
                        np.asarray(arr[rows.start : rows.stop]).astype(want.dtype),
                        want[rows.start : rows.stop],
                    )
                except Exception:  # an unreadable chunk is rewritten too
                    same = False
                if not same:
                    arr[rows.start : rows.stop] = want[rows.start : rows.stop]
                    changed = True
        if changed:
            self._ids.pop(split, None)
        return changed

    def repair_command(self) -> str:
        """The command that repairs this store: the cache command it was made with plus ``--repair``."""
        return self._cache_command("--repair")

    def finish_command(self) -> str:
        """The command that finishes this store when units are not done: the cache command it was
        made with (it resumes, computing only what is missing)."""
        return self._cache_command()

    def _cache_command(self, *extra: str) -> str:
        command = self.attrs.get("provenance", {}).get("command")
        if isinstance(command, list) and command and all(isinstance(x, str) for x in command):
            return shlex.join([*command, *extra])
        tail = "".join(f" {x}" for x in extra)
        return f"customkd-cache cache --spec SPEC{tail} (SPEC: the cache spec this store was made from)"

    # --- status

    def split_complete(self, split: str) -> bool:
        """Every unit done and mean/std written."""
        return bool(self.done_units(split).all()) and self._marker(split, "stats_done")

    def complete(self) -> bool:
        return all(self.split_complete(split) for split in self.split_names)

    def require_complete(self) -> None:
        """Refuse (StoreError) a store that is not complete, in one line: the store, each incomplete
        split's missing units (``split 'train' units 3, 7-9 of 12 not done``) or missing mean/std,
        and the command that finishes it (``finish_command``). What stage two calls before reading."""
        gaps = [gap for split in self.split_names if (gap := self._split_gap(split))]
        if gaps:
            raise StoreError(
                f"{self.path}: cache is incomplete: {'; '.join(gaps)}; finish it with "
                f"`{self.finish_command()}` (it resumes), then rerun"
            )

    def _split_gap(self, split: str) -> str:
        """What keeps ``split`` from being complete, or ``""``."""
        done = self.done_units(split)
        if not done.all():
            missing = np.flatnonzero(~done).tolist()
            return f"split '{split}' units {format_units(missing)} of {done.size} not done"
        if not self._marker(split, "stats_done"):
            return f"split '{split}' has every unit done but no mean/std"
        return ""

    # --- reading

    def ids(self, split: str) -> tuple[str, ...]:
        """(N,) sample ids in dataset order."""
        if split not in self._ids:
            self._ids[split] = tuple(str(s) for s in np.asarray(self._array(split, "ids")[:]).tolist())
        return self._ids[split]

    def labels(self, split: str) -> np.ndarray:
        """(N,) int64 labels in dataset order."""
        return np.asarray(self._array(split, "labels")[:], dtype=np.int64)

    def read_unit(self, split: str, unit: int) -> np.ndarray:
        """(n, V, D) features of one work unit, one chunk read, checked against the unit's sha256:
        the stored float dtype, or float32 decoded from an int8 store.

        Raises StoreError if the unit is not done or is damaged (naming it and the repair command).
        """
        rows = self._unit_range(split, unit)
        return self.read_rows(split, rows.start, rows.stop)

    def read_rows(self, split: str, start: int, stop: int) -> np.ndarray:
        """(stop - start, V, D) features of contiguous rows (see ``read_unit``); read whole units for
        speed.

        Raises ValueError for a range outside [0, N], StoreError if a spanned unit is not done.
        """
        return self._read_features(split, start, stop, decode=True)

    def read_split(self, split: str) -> np.ndarray:
        """(N, V, D) features of the whole split (see ``read_unit``), unit by unit, each checked
        against its sha256.

        Raises StoreError if any unit is not done or is damaged.
        """
        return self.read_rows(split, 0, self.num_samples(split))

    def read_codes(self, split: str, start: int, stop: int) -> np.ndarray:
        """(stop - start, V, D) features as stored (int8 codes for an int8 store), not decoded;
        checked like ``read_rows``."""
        return self._read_features(split, start, stop, decode=False)

    def quant_params(self, split: str, units: range | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(len(units), D) float32 ``scale`` and ``offset`` of an int8 store's units (default: all), so
        unit ``units[i]`` decodes as ``dequantize(codes, scale[i], offset[i])``. Not checked against
        the units' sha256 (``read_codes`` checks them).

        Raises StoreError for a store that is not int8 or a unit that is not done.
        """
        if not self.quantized:
            raise StoreError(f"{self.path}: dtype {self.dtype.name} has no quantization parameters")
        units = range(self.num_units(split)) if units is None else units
        self._require_done(split, units)
        scale = np.asarray(self._array(split, "quant_scale")[units.start : units.stop], dtype=np.float32)
        return scale, np.asarray(
            self._array(split, "quant_offset")[units.start : units.stop], dtype=np.float32
        )

    def _read_features(self, split: str, start: int, stop: int, *, decode: bool) -> np.ndarray:
        n = self.num_samples(split)
        if not 0 <= start <= stop <= n:
            raise ValueError(f"rows [{start}, {stop}) outside split '{split}' of {n} samples")
        first, last = start // self.unit_rows, -(-stop // self.unit_rows)
        self._require_done(split, range(first, last))
        decoded = decode and self.quantized
        out = np.empty(
            (stop - start, self.num_views, self.feature_dim), np.float32 if decoded else self.dtype
        )
        for unit in range(first, last):
            rows = self.units(split)[unit]
            lo, hi = max(rows.start, start), min(rows.stop, stop)
            data = self._checked_unit(split, unit)
            part = data["features"][lo - rows.start : hi - rows.start]
            if decoded:
                part = dequantize(part, data["quant_scale"], data["quant_offset"])
            out[lo - start : hi - start] = part
        return out

    def read_boxes(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(N, V, 4) float32 boxes and (N, V) bool flips, every unit checked against its sha256.

        Raises StoreError if any unit is not done or is damaged.
        """
        self._require_done(split, range(self.num_units(split)))
        n, v = self.num_samples(split), self.num_views
        boxes, flips = np.empty((n, v, 4), np.float32), np.empty((n, v), bool)
        for unit, rows in enumerate(self.units(split)):
            data = self._checked_unit(split, unit)
            boxes[rows.start : rows.stop] = data["boxes"]
            flips[rows.start : rows.stop] = data["flips"].astype(bool)
        return boxes, flips

    def stats(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(D,) float32 mean and population std over the N * V stored rows.

        Raises StoreError when the split has not been finalized.
        """
        if not self._marker(split, "stats_done"):
            done = self.done_units(split)
            raise StoreError(
                f"{self.path}: split '{split}' has no mean/std yet ({int(done.sum())}/{done.size} units "
                f"done); finish it with `{self.finish_command()}` (it resumes)"
            )
        mean = np.asarray(self._array(split, "mean")[:], dtype=np.float32)
        return mean, np.asarray(self._array(split, "std")[:], dtype=np.float32)

    def raw_sums(self, split: str) -> tuple[np.ndarray, np.ndarray, int]:
        """(D,) float64 sum and sum of squares over all stored rows and views, and their count N * V,
        summed unit by unit in unit order (deterministic; add several splits' sums to combine them).

        Raises StoreError if any unit is not done.
        """
        self._require_done(split, range(self.num_units(split)))
        # reduce along axis 0 of a C-order array: a plain row-by-row running sum, so the result does
        # not depend on SIMD width or on the order units were written in
        total = np.add.reduce(np.asarray(self._array(split, "unit_sum")[:], dtype=np.float64), axis=0)
        total_sq = np.add.reduce(np.asarray(self._array(split, "unit_sumsq")[:], dtype=np.float64), axis=0)
        return total, total_sq, self.num_samples(split) * self.num_views

    # --- reporting

    def size_bytes(self) -> int:
        """Bytes of every file under the store directory."""
        total = 0
        for folder, _dirs, files in os.walk(self.path):
            for name in files:
                # a writer's temporary file may be renamed away meanwhile
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(folder, name)).st_size
        return total

    def dataset_name(self) -> str:
        """The dataset's name from ``identity["dataset"]`` (its ``name`` or ``kind``), else from the
        store's directory name."""
        return _name_of(self.attrs["identity"].get("dataset"), ("name", "kind")) or self._name_part(0)

    def teacher_name(self) -> str:
        """The teacher's name from ``identity["teacher"]``, else from the store's directory name."""
        return _name_of(self.attrs["identity"].get("teacher"), ("name",)) or self._name_part(1)

    def info(self) -> dict[str, Any]:
        """A JSON-able summary: path, complete, num_samples (total and per split), num_views,
        fingerprint, feature_dim, dtype, unit_rows, compressor, teacher (the identity's teacher entry
        plus feature_dim), dataset, splits (per split: num_samples, num_units, units_done, complete),
        provenance (its flat entries), size_bytes, bytes_per_view, for int8 stores cosine_to_float32
        (see ``bytes_per_view`` and ``quant_cosine``), and for bf16 teachers ``bf16_cosine_to_fp32``
        (the teacher's bf16 vs fp32 feature cosine, measured by stage one)."""
        splits = {}
        for split in self.split_names:
            done = self.done_units(split)
            splits[split] = {
                "num_samples": self.num_samples(split),
                "num_units": int(done.size),
                "units_done": int(done.sum()),
                "complete": bool(done.all()) and self._marker(split, "stats_done"),
            }
        identity = self.attrs["identity"]
        teacher = identity.get("teacher")
        teacher = {**teacher, "feature_dim": self.feature_dim} if isinstance(teacher, dict) else teacher
        num_samples = {"total": sum(s["num_samples"] for s in splits.values())}
        num_samples.update({name: s["num_samples"] for name, s in splits.items()})
        return {
            "path": str(self.path),
            "complete": all(s["complete"] for s in splits.values()),
            "num_samples": num_samples,
            "num_views": self.num_views,
            "fingerprint": self.fingerprint,
            "feature_dim": self.feature_dim,
            "dtype": self.dtype.name,
            "unit_rows": self.unit_rows,
            "compressor": self.attrs["compressor"],
            "teacher": teacher if teacher is not None else self.teacher_name(),
            "dataset": identity.get("dataset", self.dataset_name()),
            "splits": splits,
            "provenance": _flat_entries(self.attrs["provenance"]),
            "size_bytes": self.size_bytes(),
            "bytes_per_view": self.bytes_per_view(),
            **({"cosine_to_float32": self.quant_cosine()} if self.quantized else {}),
            **({FIDELITY_ATTR: self.attrs[FIDELITY_ATTR]} if FIDELITY_ATTR in self.attrs else {}),
        }

    def bytes_per_view(self) -> float | None:
        """Bytes on disk of the done units' feature chunks (and, for int8, their ``quant_scale`` and
        ``quant_offset`` chunks), divided by their rows times views; None before any unit is done."""
        total, views = 0, 0
        arrays = ("features", *QUANT_ARRAYS) if self.quantized else ("features",)
        for split in self.split_names:
            units = self.units(split)
            for unit in np.flatnonzero(self.done_units(split)).tolist():
                views += len(units[unit]) * self.num_views
                for name in arrays:
                    total += _file_bytes(self.path / split / name / "c" / str(unit))
        return total / views if views else None

    def quant_cosine(self) -> dict[str, float] | None:
        """``{"mean", "min"}`` over every stored row and view of the done units of an int8 store: the
        cosine between the decoded and the float32 features, measured when each unit was written.
        None before any unit is done. Raises StoreError for a store that is not int8."""
        if not self.quantized:
            raise StoreError(f"{self.path}: dtype {self.dtype.name} records no quantization cosine")
        sums, mins, count = [], [], 0
        for split in self.split_names:
            done = np.flatnonzero(self.done_units(split))
            if not done.size:
                continue
            record = np.asarray(self._array(split, "quant_cosine")[:], dtype=np.float64)[done]
            units = self.units(split)
            count += sum(len(units[k]) for k in done.tolist()) * self.num_views
            sums += record[:, 0].tolist()
            mins += record[:, 1].tolist()
        return {"mean": math.fsum(sums) / count, "min": min(mins)} if count else None

    def verify(self) -> list[str]:
        """Problems found, one line each; ``[]`` when healthy. Reads every done unit.

        Checks: array shapes and dtypes, units not done (their indices), unreadable chunks, NaN/Inf
        rows, each unit's stored bytes against its sha256 and sums, stats missing on a split whose
        units are all done.
        """
        problems: list[str] = []
        for split in self.split_names:
            problems += self._verify_split(split)
        return problems

    # --- internals

    def _verify_split(self, split: str) -> list[str]:
        shape_problems = self._verify_shapes(split)
        if shape_problems:
            return shape_problems
        problems = []
        done = self.done_units(split)
        missing = np.flatnonzero(~done).tolist()
        if missing:
            problems.append(f"split '{split}': units {format_units(missing)} of {done.size} not done")
        for unit in np.flatnonzero(done).tolist():
            problems += self._verify_unit(split, unit)
        if not missing and not self._marker(split, "stats_done"):
            problems.append(
                f"split '{split}': every unit is done but mean/std are missing (rerun cache to finalize)"
            )
        elif not missing and not problems and self._stats_problem(split):
            problems.append(f"split '{split}': mean/std disagree with the unit sums")
        return problems

    def _stats_problem(self, split: str) -> bool:
        """Whether the stored mean/std differ from what the unit sums give (or cannot be read)."""
        try:
            mean, std = self._stats_from_sums(split)
            got_mean = np.asarray(self._array(split, "mean")[:], dtype=np.float32)
            got_std = np.asarray(self._array(split, "std")[:], dtype=np.float32)
        except StoreError:
            raise
        except Exception:  # an unreadable chunk
            return True
        return not (np.array_equal(mean, got_mean) and np.array_equal(std, got_std))

    def _verify_shapes(self, split: str) -> list[str]:
        try:
            n, u = self.num_samples(split), self.num_units(split)
        except StoreError as e:
            return [f"split '{split}': array 'features' is {_why(e)}; remove the store and rebuild it"]
        dims = {"V": self.num_views, "D": self.feature_dim}
        problems = []
        for name, layout in _layout(self.attrs["dtype"]).items():
            shape = _shape(layout, n=n, units=u, dims=dims)
            dtype = (
                None
                if layout.dtype == "str"
                else self.dtype
                if layout.dtype == "store"
                else np.dtype(layout.dtype)
            )
            try:
                arr = self._array(split, name)
            except StoreError as e:
                problems.append(f"split '{split}': array '{name}' is {_why(e)}")
                continue
            if tuple(arr.shape) != shape or (dtype is not None and np.dtype(arr.dtype) != dtype):
                problems.append(
                    f"split '{split}': array '{name}' is {tuple(arr.shape)} {arr.dtype}, "
                    f"expected {shape} {dtype}"
                )
        return problems

    def _verify_unit(self, split: str, unit: int) -> list[str]:
        problem, _ = self._unit_problem(split, unit)
        return [] if problem is None else [f"{self._where(split, unit)}: {problem}"]

    def _where(self, split: str, unit: int) -> str:
        rows = self._unit_range(split, unit)
        return f"split '{split}' unit {unit} (rows {rows.start}-{rows.stop - 1})"

    def unit_array_names(self, split: str) -> dict[str, str]:
        """The arrays of a unit's data: name -> ``"row"`` or ``"unit"`` (what axis 0 runs over).

        Every array of the layout marked as unit data, plus any other array of the split whose first
        axis has N (rows) or U (units) entries; bookkeeping arrays (markers, hashes, mean/std) never.
        """
        if split not in self._unit_names:
            names = {name: a.per for name, a in _layout(self.attrs["dtype"]).items() if a.unit_data}
            n, u = self.num_samples(split), self.num_units(split)
            try:
                listed = sorted(self._group[split].array_keys())  # type: ignore[union-attr]
            except Exception as e:  # a damaged group or array metadata
                raise StoreError(
                    f"{self.path}: split '{split}' cannot be listed ({_short(e)}); the store is damaged"
                ) from None
            for name in listed:
                if name in names or name in _BOOKKEEPING:
                    continue
                first = tuple(self._array(split, name).shape[:1])
                if first == (u,):
                    names[name] = "unit"
                elif first == (n,):
                    names[name] = "row"
            self._unit_names[split] = dict(sorted(names.items()))
        return self._unit_names[split]

    def _read_unit_data(self, split: str, unit: int, *, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """The unit's slice of every unit array (rows of per-row arrays, the entry of per-unit ones)."""
        rows = self._unit_range(split, unit)
        out = {}
        for name, per in self.unit_array_names(split).items():
            if name not in skip:
                arr = self._array(split, name)
                out[name] = np.asarray(arr[rows.start : rows.stop] if per == "row" else arr[unit])
        return out

    def _unit_problem(self, split: str, unit: int) -> tuple[str | None, dict[str, np.ndarray]]:
        """What is wrong with a done unit (None if nothing) and its data as read."""
        try:
            data = self._read_unit_data(split, unit)
            digest = np.asarray(self._array(split, "unit_sha256")[unit], dtype=np.uint8)
        except StoreError:
            raise
        except Exception as e:  # a damaged chunk fails to decode with codec-specific errors
            return f"unreadable ({_short(e)})", {}
        stored = np.ascontiguousarray(data["features"], dtype=self.dtype)
        if self.quantized:
            stored = dequantize(stored, data["quant_scale"], data["quant_offset"])
        bad = np.flatnonzero(~np.isfinite(stored).reshape(len(stored), -1).all(axis=1))
        if bad.size:
            start = self._unit_range(split, unit).start
            return f"NaN/Inf in {bad.size} rows ({self._shown_ids(split, start + bad)})", data
        if not np.array_equal(unit_digest(data), digest):
            names = ", ".join(data)
            return f"its arrays ({names}) do not match their sha256: changed or lost since written", data
        total, total_sq = _unit_sums(stored)
        if not (np.array_equal(total, data["unit_sum"]) and np.array_equal(total_sq, data["unit_sumsq"])):
            return "unit_sum/unit_sumsq disagree with the stored features", data
        return None, data

    def _checked_unit(self, split: str, unit: int) -> dict[str, np.ndarray]:
        """The unit's arrays as read, after checking them; StoreError naming the unit and the repair."""
        problem, data = self._unit_problem(split, unit)
        if problem is not None:
            raise StoreError(
                f"{self.path}: {self._where(split, unit)} is damaged: {problem}; nothing damaged is used: "
                f"repair the store with `{self.repair_command()}`"
            )
        return data

    def _check_layout(self, attrs: Mapping[str, Any], num_samples: Mapping[str, int]) -> None:
        """A store found at a create path must match what the caller would have created."""
        keys = ("splits", "num_views", "feature_dim", "dtype")
        ours = {key: self.attrs[key] for key in keys} | {
            "num_samples": {s: self.num_samples(s) for s in self.split_names}
        }
        theirs = {key: attrs[key] for key in keys} | {"num_samples": dict(num_samples)}
        if ours != theirs:
            raise StoreError(
                f"{self.path}: store has the right fingerprint but another layout "
                f"({ours} vs asked {theirs}); remove it and rerun"
            )

    def _check_split(self, split: str) -> None:
        if split not in self.split_names:
            raise StoreError(
                f"{self.path}: no split '{split}'{closest(split, self.split_names)}; "
                f"splits: {', '.join(self.split_names)}"
            )

    def _array(self, split: str, name: str) -> zarr.Array:
        key = (split, name)
        if key not in self._arrays:
            self._check_split(split)
            try:
                node = self._group[f"{split}/{name}"]
            except KeyError:
                raise StoreError(
                    f"{self.path}: array '{split}/{name}' is missing; the store is damaged"
                ) from None
            except Exception as e:  # unreadable zarr.json of the array: zarr raises several types
                raise StoreError(
                    f"{self.path}: array '{split}/{name}' has unreadable metadata ({_short(e)}); the store "
                    "is damaged: remove it and rebuild it with `customkd-cache cache`"
                ) from None
            if not isinstance(node, zarr.Array):
                raise StoreError(f"{self.path}: '{split}/{name}' is not an array; the store is damaged")
            self._arrays[key] = node
        return self._arrays[key]

    def _unit_range(self, split: str, unit: int) -> range:
        units = self.units(split)
        if not 0 <= unit < len(units):
            raise ValueError(f"unit {unit} outside split '{split}', which has units 0..{len(units) - 1}")
        return units[unit]

    def unit_done(self, split: str, unit: int) -> bool:
        """Whether one unit's marker reads 1 (a damaged marker counts as not done)."""
        try:
            return int(np.asarray(self._array(split, "done")[unit])) == 1
        except StoreError:
            raise
        except Exception:  # a partial or damaged marker file
            return False

    def _marker(self, split: str, name: str) -> bool:
        try:
            return int(np.asarray(self._array(split, name)[0])) == 1
        except StoreError:
            raise
        except Exception:  # a partial or damaged marker file
            return False

    def _require_done(self, split: str, units: range) -> None:
        # read only the markers of ``units``: a streaming reader asks for one unit at a time, and
        # reading every marker each time would cost O(units) files per read
        if not len(units):
            return
        try:
            spanned = np.asarray(self._array(split, "done")[units.start : units.stop]) == 1
        except StoreError:
            raise
        except Exception:  # a damaged marker; the full read below names the state
            spanned = np.zeros(len(units), dtype=bool)
        if spanned.all():
            return
        done = self.done_units(split)
        missing = [k for k in units if not done[k]]

        if missing:
            raise StoreError(
                f"{self.path}: split '{split}' units {format_units(missing)} of {done.size} not done; "
                f"finish it with `{self.finish_command()}` (it resumes)"
            )

    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only; open it with open_store(path, writable=True)")

    def _check_finite(self, split: str, unit: int, x: np.ndarray, *, what: str, fix: str) -> None:
        bad = np.flatnonzero(~np.isfinite(x).reshape(x.shape[0], -1).all(axis=1))
        if bad.size:
            start = self._unit_range(split, unit).start
            raise NonFiniteFeatureError(
                f"{self.path}: split '{split}' unit {unit}: {what} for {bad.size} sample(s) "
                f"({self._shown_ids(split, start + bad)}); nothing was written; {fix}"
            )

    def _shown_ids(self, split: str, rows: np.ndarray) -> str:
        ids = self.ids(split)
        shown = ", ".join(repr(ids[int(i)]) for i in rows[:_SHOW_IDS])
        return shown + (f", ... {rows.size - _SHOW_IDS} more" if rows.size > _SHOW_IDS else "")

    def _name_part(self, index: int) -> str:
        parts = self.path.name.removesuffix(".zarr").split("__")
        return parts[index] if len(parts) == 3 else ""


# --- helpers -----------------------------------------------------------------------------------


def _root_attrs(
    *,
    fingerprint: str,
    identity: Mapping[str, Any],
    provenance: Mapping[str, Any],
    splits: Mapping[str, SplitInit],
    num_views: int,
    feature_dim: int,
    dtype: str,
    unit_rows: int,
    compressor: str,
    extra_attrs: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Validated root attributes (plain JSON)."""
    if not fingerprint:
        raise ValueError("fingerprint must not be empty: a store is never named by a missing key")
    for name, value in (("num_views", num_views), ("feature_dim", feature_dim), ("unit_rows", unit_rows)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if compressor not in COMPRESSORS:
        raise ValueError(f"compressor must be one of {COMPRESSORS}, got {compressor!r}")
    if not splits:
        raise ValueError("a store needs at least one split")
    for name, init in splits.items():
        _check_split_init(name, init)
    extra = dict(extra_attrs or {})
    clash = sorted(set(extra) & set(_BASE_ATTRS))
    if clash:
        raise ValueError(f"extra_attrs may not set {clash}")
    attrs = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "identity": dict(identity),
        "provenance": dict(provenance),
        "splits": list(splits),
        "num_views": int(num_views),
        "feature_dim": int(feature_dim),
        "dtype": dtype,
        "unit_rows": int(unit_rows),
        "compressor": compressor,
        **extra,
    }
    try:
        return dict(json.loads(json.dumps(attrs, allow_nan=False)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"store attributes must be plain JSON (no numpy values, NaN or Inf): {e}") from None


def _check_split_init(name: str, init: SplitInit) -> None:
    # '/' would nest groups, and zarr reserves '.'-leading and '__'-leading node names
    if not name or "/" in name or name.startswith((".", "__")):
        raise ValueError(f"split name {name!r} must be non-empty, without '/', not starting with '.' or '__'")
    labels = np.asarray(init.labels)
    if labels.shape != (len(init.ids),):
        raise ValueError(f"split '{name}': labels shape {labels.shape} != ({len(init.ids)},) ids")
    if len(init.ids) == 0:
        raise ValueError(f"split '{name}' has no samples")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"split '{name}': labels must be integers, got dtype {labels.dtype}")


def _build_and_rename(path: Path, attrs: dict[str, Any], splits: Mapping[str, SplitInit]) -> None:
    """Build the store in a temporary directory beside ``path`` and rename it into place.

    Losing the rename to a concurrent creator is fine: the caller opens the winner's store.
    """
    tmp = path.parent / f".{path.name}.tmp-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_builds(path)
        root = zarr.create_group(LocalStore(tmp), zarr_format=3, attributes=attrs)
        for name, init in splits.items():
            _create_split(root.create_group(name), init, attrs)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.lexists(path):  # not a lost race but a real failure
                raise
    except OSError as e:
        raise StoreError(
            f"{path}: cannot create the store ({e.strerror or e}); use a cache root you can write"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _host_tag() -> str:
    return _UNSAFE.sub("_", socket.gethostname()).replace("-", "_") or "host"


def _remove_dead_builds(path: Path) -> None:
    """Remove build directories of ``path`` left by killed processes of this host (a kill skips the
    cleanup); builds of live processes and of other hosts are left alone."""
    prefix = f".{path.name}.tmp-{_host_tag()}-"
    for child in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = child.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(child, ignore_errors=True)


def _create_split(group: zarr.Group, init: SplitInit, attrs: Mapping[str, Any]) -> None:
    n, u = len(init.ids), attrs["unit_rows"]
    units, dims = num_units(n, u), {"V": attrs["num_views"], "D": attrs["feature_dim"]}
    zstd: Any = [ZstdCodec(level=ZSTD_LEVEL, checksum=True)] if attrs["compressor"] == "zstd" else None
    for name, layout in _layout(attrs["dtype"]).items():
        shape = _shape(layout, n=n, units=units, dims=dims)
        chunks = {"row": (u, *shape[1:]), "unit": (1, *shape[1:]), "split": shape}[layout.per]
        kwargs: dict[str, Any] = {"dtype": str} if layout.dtype == "str" else {"fill_value": 0}
        if layout.dtype not in ("str", "store"):
            kwargs["dtype"] = layout.dtype
        elif layout.dtype == "store":
            kwargs["dtype"] = attrs["dtype"]
        # markers and per-unit records: one tiny uncompressed file per unit, owned by the unit's writer
        compressors = zstd if layout.compressed else None
        group.create_array(name, shape=shape, chunks=chunks, compressors=compressors, **kwargs)
    group["ids"][:] = np.array([str(s) for s in init.ids], dtype=object)  # type: ignore[index]
    group["labels"][:] = np.asarray(init.labels, dtype=np.int64)  # type: ignore[index]


def _shape(layout: _ArrayLayout, *, n: int, units: int, dims: Mapping[str, int]) -> tuple[int, ...]:
    tail = tuple(dims[x] if isinstance(x, str) else x for x in layout.tail)
    return {"row": (n, *tail), "unit": (units, *tail), "split": tail}[layout.per]


def unit_digest(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """(32,) uint8 sha256 of a unit's arrays: for each name in sorted order, the name, dtype, shape and
    bytes (little-endian, C order; strings as UTF-8, each preceded by its length)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        x = np.asarray(arrays[name])
        h.update(name.encode() + b"\0")
        if x.dtype.kind in "OUT":
            h.update(f"str{x.shape}".encode())
            for item in x.reshape(-1).tolist():
                b = str(item).encode()
                h.update(len(b).to_bytes(8, "little") + b)
        else:
            x = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<"))
            h.update(f"{x.dtype.str}{x.shape}".encode() + x.tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


def _short(e: BaseException) -> str:
    """``Type: first line of the message`` (zarr and codec errors can span lines)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _why(e: StoreError) -> str:
    return "unreadable" if "unreadable" in str(e) else "missing"


def _shaped(x: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
    return x


def quantize_unit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine int8 codes of one unit, per dimension: ``(n, V, D)`` float -> codes ``(n, V, D)`` int8 and
    ``scale``, ``offset`` ``(D,)`` float32, with ``features ~ codes * scale + offset``.

    Each dimension's minimum and maximum over the unit's ``n * V`` rows map to -128 and 127, so a
    decoded value is within ``scale / 2`` (plus float32 rounding) of the original; a constant
    dimension gets ``scale = 0`` and decodes exactly. Computed in float64 from min/max and elementwise
    operations only, so the result does not depend on summation order, SIMD width or who wrote it.
    """
    flat = np.asarray(features, dtype=np.float64).reshape(-1, features.shape[-1])
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    with np.errstate(over="ignore"):  # a range beyond float32 decodes to inf and is refused by the caller
        scale = ((hi - lo) / (_Q_MAX - _Q_MIN)).astype(np.float32)
        offset = (lo - _Q_MIN * scale.astype(np.float64)).astype(np.float32)
    step = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float64)
    with np.errstate(invalid="ignore"):
        codes = np.rint((flat - offset.astype(np.float64)) / step)
    codes = np.clip(np.nan_to_num(codes), _Q_MIN, _Q_MAX).astype(np.int8)
    return codes.reshape(features.shape), scale, offset


def dequantize(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``codes * scale + offset`` in float32: ``codes`` (..., D) int8, ``scale``/``offset`` broadcastable
    to it (``(D,)`` for one unit, ``(k, 1, D)`` for rows of several units)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return codes.astype(np.float32) * scale + offset


def _cosine_record(features: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """(2,) float64: sum and minimum over a unit's rows and views of cos(float32 features, decoded).

    Reductions run along axis 0 of C-order arrays and the sum is ``math.fsum``, so the record is the
    same on every machine. Two zero vectors count as cosine 1, one zero vector as 0.
    """
    d = features.shape[-1]
    x = np.ascontiguousarray(np.asarray(features, np.float32).reshape(-1, d).astype(np.float64).T)
    y = np.ascontiguousarray(decoded.reshape(-1, d).astype(np.float64).T)
    dot = np.add.reduce(x * y, axis=0)
    norms = np.sqrt(np.add.reduce(x * x, axis=0) * np.add.reduce(y * y, axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / norms, np.where(dot == norms, 1.0, 0.0))
    return np.array([math.fsum(cos.tolist()), cos.min()], dtype=np.float64)


def _unit_sums(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D,) float64 sum and sum of squares over rows and views of one unit's stored features."""
    x = stored.reshape(-1, stored.shape[-1]).astype(np.float64)
    return np.add.reduce(x, axis=0), np.add.reduce(x * x, axis=0)


def _file_bytes(path: Path) -> int:
    """Bytes of the file at ``path``, or of every file below it (0 when absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _name_of(entry: Any, keys: tuple[str, ...]) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        for key in keys:
            if isinstance(entry.get(key), str) and entry[key]:
                return str(entry[key])
    return ""


def _flat_entries(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Scalars and flat dicts (e.g. library versions) of the provenance; the nested resolved spec is
    left to ``attrs["provenance"]``."""
    scalar = (str, int, float, bool, type(None))
    return {
        key: value
        for key, value in provenance.items()
        if isinstance(value, scalar)
        or (isinstance(value, dict) and all(isinstance(x, scalar) for x in value.values()))
    }
