"""What every part of an opened store stands on: its root attributes, geometry, array access and
unit markers.

``StoreBase`` holds the opened Zarr group and the attributes ``open_store`` validated, answers the
geometry (samples, units, row ranges), opens arrays by name (refusing unknown splits and missing or
unreadable arrays with StoreError), reads the ``done`` and ``stats_done`` markers (a damaged marker
counts as not done), ids, labels and unit sums, says whether a split is complete, and words the
commands that finish or repair the store. Writing, checking, reading features and reporting are
the mixins of ``writer``, ``integrity``, ``feature_store`` and ``info``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from customkd_cache.errors import StoreError, closest
from customkd_cache.store.layout import (
    _SHOW_IDS,
    CLAIMS_DIR,
    QUANTIZED_DTYPE,
    _layout,
    _shape,
    _short,
    format_units,
    num_units,
    shell_quote,
    shown_path,
    unit_ranges,
)

# What a store whose metadata (not its unit data) is damaged needs: ``repair`` cannot rebuild it.
DAMAGED_FIX = (
    "the store is damaged and cannot be repaired: remove it and rebuild it with `customkd-cache cache`"
)


class StoreBase:
    """The common ground of an opened store (see the module docstring); get a store from
    ``open_store`` or ``create_or_open_store``."""

    def __init__(self, path: Path, group: zarr.Group, attrs: dict[str, Any], *, writable: bool) -> None:
        self.path = path
        self.shown = shown_path(path)  # the path as error messages show it: one line
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
        self._nodes: dict[tuple[str, str], zarr.Array] = {}
        self._rows: dict[str, int] = {}  # samples of each split whose metadata was checked
        self._ids: dict[str, tuple[str, ...]] = {}
        self._unit_names: dict[str, dict[str, str]] = {}

    def __repr__(self) -> str:
        splits = list(self.split_names)
        return f"FeatureStore({str(self.path)!r}, splits={splits}, fingerprint={self.fingerprint[:12]})"

    def num_samples(self, split: str) -> int:
        if split not in self._rows:
            self._check_split_metadata(split)
        return self._rows[split]

    def num_units(self, split: str) -> int:
        return num_units(self.num_samples(split), self.unit_rows)

    def units(self, split: str) -> list[range]:
        """Contiguous row ranges, one per work unit (== one chunk); the last may be short."""
        return unit_ranges(self.num_samples(split), self.unit_rows)

    def claim_dir(self, split: str) -> Path:
        """Where claims on this split's units live: ``<store>/.claims/<split>`` (not a zarr node)."""
        self._check_split(split)
        return self.path / CLAIMS_DIR / split

    def done_units(self, split: str) -> np.ndarray:
        """(num_units,) bool: which units are done. An unreadable or partial marker counts as not done."""
        done = self._array(split, "done")
        try:
            return np.asarray(done[:]) == 1
        except Exception:  # one damaged marker fails the whole read; fall back to one read per unit
            return np.array([self.unit_done(split, k) for k in range(done.shape[0])], dtype=bool)

    def unit_done(self, split: str, unit: int) -> bool:
        """Whether one unit's marker reads 1 (a damaged marker counts as not done)."""
        try:
            return int(np.asarray(self._array(split, "done")[unit])) == 1
        except StoreError:
            raise
        except Exception:  # a partial or damaged marker file
            return False

    def split_complete(self, split: str) -> bool:
        """Every unit done and mean/std written."""
        return bool(self.done_units(split).all()) and self._marker(split, "stats_done")

    def complete(self) -> bool:
        return all(self.split_complete(split) for split in self.split_names)

    def require_complete(self, splits: Iterable[str] | None = None) -> None:
        """Refuse (StoreError) a store whose ``splits`` (default: all) are not complete, in one line:
        the store, each incomplete split's missing units (``split 'train' units 3, 7-9 of 12 not
        done``) or missing mean/std, and the command that finishes it (``finish_command``). What
        stage two calls before reading."""
        wanted = self.split_names if splits is None else list(splits)
        gaps = [gap for split in wanted if (gap := self._split_gap(split))]
        if gaps:
            raise StoreError(
                f"{self.shown}: cache is incomplete: {'; '.join(gaps)}; finish it with "
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

    def repair_command(self) -> str:
        """The command that repairs this store: the cache command it was made with plus ``--repair``."""
        return self._cache_command("--repair")

    def finish_command(self) -> str:
        """The command that finishes this store when units are not done: the cache command it was
        made with (it resumes, computing only what is missing)."""
        return self._cache_command()

    def _cache_command(self, *extra: str) -> str:
        """The recorded cache command plus ``extra``, run with ``CUSTOMKD_CACHE_ROOT`` set to the
        directory that holds this store (so it acts on this store, wherever the current root is), on
        one line even when a path holds a newline."""
        root = f"CUSTOMKD_CACHE_ROOT={shell_quote(os.path.abspath(self.path.parent))}"
        command = self.attrs["provenance"].get("command")
        if isinstance(command, list) and command and all(isinstance(x, str) for x in command):
            return " ".join([root, *(shell_quote(x) for x in [*command, *extra])])
        tail = "".join(f" {x}" for x in extra)
        return (
            f"{root} customkd-cache cache --spec SPEC{tail} (SPEC: the cache spec this store was made from)"
        )

    def ids(self, split: str) -> tuple[str, ...]:
        """(N,) sample ids in dataset order."""
        if split not in self._ids:
            self._ids[split] = tuple(str(s) for s in np.asarray(self._array(split, "ids")[:]).tolist())
        return self._ids[split]

    def labels(self, split: str) -> np.ndarray:
        """(N,) int64 labels in dataset order."""
        return np.asarray(self._array(split, "labels")[:], dtype=np.int64)

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

    def _check_split(self, split: str) -> None:
        if split not in self.split_names:
            raise StoreError(
                f"{self.shown}: no split '{split}'{closest(split, self.split_names)}; "
                f"splits: {', '.join(self.split_names)}"
            )

    def _array(self, split: str, name: str) -> zarr.Array:
        """The array ``split/name``, its metadata checked against the layout first (StoreError naming
        the array when it is missing, unreadable or of another shape or dtype)."""
        key = (split, name)
        if key not in self._arrays:
            n = self.num_samples(split)
            node = self._node(split, name)
            problem = self._shape_problem(name, node, n)
            if problem:
                raise StoreError(f"{self.shown}: split '{split}': {problem}; {DAMAGED_FIX}")
            self._arrays[key] = node
        return self._arrays[key]

    def _check_split_metadata(self, split: str) -> None:
        """Check the split group's metadata and its ``features`` array (shape (N, V, D), the store
        dtype, one chunk per unit), then record N."""
        self._check_split(split)
        try:
            group = self._group[split]
        except Exception as e:  # unreadable zarr.json of the split: zarr raises several types
            raise StoreError(
                f"{self.shown}: split '{split}' has unreadable metadata ({_short(e)}); {DAMAGED_FIX}"
            ) from None
        if not isinstance(group, zarr.Group):
            raise StoreError(f"{self.shown}: split '{split}' is not a group; {DAMAGED_FIX}")
        features = self._node(split, "features")
        want = (self.num_views, self.feature_dim)
        shape, chunks = tuple(features.shape), tuple(features.chunks)
        if len(shape) != 3 or shape[1:] != want or np.dtype(features.dtype) != self.dtype:
            raise StoreError(
                f"{self.shown}: split '{split}': array 'features' is {shape} {features.dtype}, expected "
                f"(N, {want[0]}, {want[1]}) {self.dtype.name}; {DAMAGED_FIX}"
            )
        if shape[0] < 1 or chunks != (self.unit_rows, *want):
            raise StoreError(
                f"{self.shown}: split '{split}': array 'features' has chunks {chunks} for {shape[0]} rows, "
                f"expected ({self.unit_rows}, {want[0]}, {want[1]}); {DAMAGED_FIX}"
            )
        self._rows[split] = int(shape[0])

    def _shape_problem(self, name: str, node: zarr.Array, n: int) -> str:
        """How ``node`` differs from the layout's array ``name`` for ``n`` rows, or ``""`` (arrays
        outside the layout are not checked)."""
        layout = _layout(self.attrs["dtype"]).get(name)
        if layout is None:
            return ""
        dims = {"V": self.num_views, "D": self.feature_dim}
        shape = _shape(layout, n=n, units=num_units(n, self.unit_rows), dims=dims)
        dtype = (
            None
            if layout.dtype == "str"
            else self.dtype
            if layout.dtype == "store"
            else np.dtype(layout.dtype)
        )
        if tuple(node.shape) != shape or (dtype is not None and np.dtype(node.dtype) != dtype):
            return f"array '{name}' is {tuple(node.shape)} {node.dtype}, expected {shape} {dtype}"
        return ""

    def _node(self, split: str, name: str) -> zarr.Array:
        """The array ``split/name`` as it is on disk, unchecked (StoreError when missing or unreadable)."""
        key = (split, name)
        if key not in self._nodes:
            self._check_split(split)
            try:
                node = self._group[f"{split}/{name}"]
            except KeyError:
                raise StoreError(f"{self.shown}: array '{split}/{name}' is missing; {DAMAGED_FIX}") from None
            except Exception as e:  # unreadable zarr.json of the array: zarr raises several types
                raise StoreError(
                    f"{self.shown}: array '{split}/{name}' has unreadable metadata ({_short(e)}); "
                    f"{DAMAGED_FIX}"
                ) from None
            if not isinstance(node, zarr.Array):
                raise StoreError(f"{self.shown}: '{split}/{name}' is not an array; {DAMAGED_FIX}")
            self._nodes[key] = node
        return self._nodes[key]

    def _unit_range(self, split: str, unit: int) -> range:
        units = self.units(split)
        if not 0 <= unit < len(units):
            raise ValueError(f"unit {unit} outside split '{split}', which has units 0..{len(units) - 1}")
        return units[unit]

    def _where(self, split: str, unit: int) -> str:
        rows = self._unit_range(split, unit)
        return f"split '{split}' unit {unit} (rows {rows.start}-{rows.stop - 1})"

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
                f"{self.shown}: split '{split}' units {format_units(missing)} of {done.size} not done; "
                f"finish it with `{self.finish_command()}` (it resumes)"
            )

    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"{self.shown}: opened read-only; open it with open_store(path, writable=True)")

    def _shown_ids(self, split: str, rows: np.ndarray) -> str:
        ids = self.ids(split)
        shown = ", ".join(repr(ids[int(i)]) for i in rows[:_SHOW_IDS])
        return shown + (f", ... {rows.size - _SHOW_IDS} more" if rows.size > _SHOW_IDS else "")

    def _name_part(self, index: int) -> str:
        parts = self.path.name.removesuffix(".zarr").split("__")
        return parts[index] if len(parts) == 3 else ""
