"""The opened store: ``open_store`` (the one place a store's root attributes are read and checked)
and ``FeatureStore``, which reads features, boxes and statistics, each unit checked against its
sha256 first, and carries the writing, integrity and reporting mixins.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from customkd_cache.errors import StoreError
from customkd_cache.store.attrs import check_root_attrs
from customkd_cache.store.codec import dequantize
from customkd_cache.store.info import StoreInfo
from customkd_cache.store.layout import _short, shown_path
from customkd_cache.store.writer import StoreWriter


def open_store(path: Path, *, fingerprint: str | None = None, writable: bool = False) -> FeatureStore:
    """Open an existing store; read-only unless ``writable`` (works on a read-only directory).

    The root attributes are checked here, once (``check_root_attrs``): whatever a damaged or
    hand-edited store holds, opening it raises StoreError or gives a store whose attributes are sound.

    Raises:
        StoreError: the path is missing, is not a customkd-cache store, was written in another
            format version, has damaged attributes (naming the attribute), or carries a fingerprint
            other than ``fingerprint``.
    """
    path = Path(path)
    where = shown_path(path)
    try:
        exists, meta = _kind(path), _kind(path / "zarr.json")
    except OSError as e:  # another user's private directory
        raise StoreError(f"{where}: cannot be read ({e.strerror or e}); it is not used") from None
    if exists is None:
        raise StoreError(f"{where}: no feature store here; build it with `customkd-cache cache --spec FILE`")
    if meta is None:
        raise StoreError(
            f"{where}: not a feature store (no zarr.json); give the path of a NAME.zarr directory"
        )
    if meta != "file":
        raise StoreError(
            f"{where}: damaged store: its zarr.json is not a file; remove it and rebuild it with "
            "`customkd-cache cache`"
        )
    try:
        group = zarr.open_group(
            LocalStore(path, read_only=not writable), mode="r+" if writable else "r", zarr_format=3
        )
        attrs = group.attrs.asdict()
    except RuntimeError as e:
        if "thread" in str(e):  # too many threads asked for (run.threads): not the store's fault
            raise StoreError(
                f"cannot open {where}: the system refused a new thread ({_short(e)}); lower run.threads"
            ) from None
        raise StoreError(f"{where}: not a readable Zarr v3 group ({_short(e)}); {_UNREADABLE_FIX}") from None
    except Exception as e:  # zarr raises several types for a malformed or foreign hierarchy
        raise StoreError(f"{where}: not a readable Zarr v3 group ({_short(e)}); {_UNREADABLE_FIX}") from None
    check_root_attrs(path, attrs)
    if fingerprint is not None and attrs["fingerprint"] != fingerprint:
        raise StoreError(
            f"{where}: store fingerprint {attrs['fingerprint']} differs from the spec's {fingerprint}; "
            "it was built from another spec and is never reused: remove it or point at the right store"
        )
    return FeatureStore(path, group, attrs, writable=writable)


def _kind(path: Path) -> str | None:
    """``"file"``, ``"dir"`` or ``"other"`` for what is at ``path`` (links followed), None when nothing
    is. Raises OSError (PermissionError) when it cannot be looked at."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"


_UNREADABLE_FIX = "its metadata cannot be repaired: remove it and rebuild it with `customkd-cache cache`"


class FeatureStore(StoreWriter, StoreInfo):
    """An opened store. Get one from ``create_or_open_store`` or ``open_store``.

    Unknown split names raise StoreError naming the valid ones. Reads of features, boxes and
    statistics refuse (StoreError) units that are not done, so a reader never sees unwritten rows.
    """

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
            raise StoreError(f"{self.shown}: dtype {self.dtype.name} has no quantization parameters")
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
                f"{self.shown}: split '{split}' has no mean/std yet ({int(done.sum())}/{done.size} units "
                f"done); finish it with `{self.finish_command()}` (it resumes)"
            )
        mean = np.asarray(self._array(split, "mean")[:], dtype=np.float32)
        return mean, np.asarray(self._array(split, "std")[:], dtype=np.float32)
