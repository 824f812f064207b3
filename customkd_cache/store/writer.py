"""Writing a store: one whole work unit at a time (``write_unit``), then the split's mean/std
(``finalize_split``).

A unit's data is checked before anything is written (shapes, finite values, what the store dtype
can hold), written first, hashed, and marked done last, so a kill at any moment leaves the unit not
done and a rerun writes the same bytes.
"""

from __future__ import annotations

import numpy as np

from customkd_cache.errors import NonFiniteFeatureError, StoreError
from customkd_cache.store.codec import _cosine_record, _unit_sums, dequantize, quantize_unit, unit_digest
from customkd_cache.store.integrity import StoreIntegrity


class StoreWriter(StoreIntegrity):
    """Writing units and statistics (see the module docstring)."""

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
                f"{self.shown}: cannot write split '{split}' unit {unit} ({e.strerror or e}); free space "
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
                f"{self.shown}: cannot write the statistics of split '{split}' ({e.strerror or e}); "
                "free space or use a cache root you can write, then rerun"
            ) from None
        return True

    def _check_finite(self, split: str, unit: int, x: np.ndarray, *, what: str, fix: str) -> None:
        bad = np.flatnonzero(~np.isfinite(x).reshape(x.shape[0], -1).all(axis=1))
        if bad.size:
            start = self._unit_range(split, unit).start
            raise NonFiniteFeatureError(
                f"{self.shown}: split '{split}' unit {unit}: {what} for {bad.size} sample(s) "
                f"({self._shown_ids(split, start + bad)}); nothing was written; {fix}"
            )


def _shaped(x: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
    return x
