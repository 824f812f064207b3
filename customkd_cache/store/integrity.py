"""Integrity of a store: checking units against their records (``verify``) and undoing damage so a
cache run recomputes it (``repair``).

A done unit is trusted only when its arrays decode, hold no NaN/Inf, match the unit's sha256 and
its unit sums; ``_checked_unit`` is the one gate every feature read passes. ``verify`` also checks
array shapes and dtypes against the layout and mean/std against the unit sums. ``repair`` marks
what cannot be trusted not done (units) or not written (mean/std) and rewrites ids and labels from
the dataset manifest; it never recomputes features itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from customkd_cache.errors import StoreError
from customkd_cache.store.base import StoreBase
from customkd_cache.store.codec import (
    _unit_sums,
    cosine_record_problem,
    dequantize,
    mean_std_from_sums,
    unit_digest,
)
from customkd_cache.store.layout import _BOOKKEEPING, SplitInit, _layout, _short, _why, format_units


class StoreIntegrity(StoreBase):
    """Checking and repairing an opened store (see the module docstring)."""

    def verify(self) -> list[str]:
        """Problems found, one line each; ``[]`` when healthy. Reads every done unit.

        Checks: array shapes and dtypes, units not done (their indices), unreadable chunks, NaN/Inf
        rows, each unit's stored bytes against its sha256 and sums, stats missing on a split whose
        units are all done.
        """
        return self.verify_report()[0]

    def verify_report(self) -> tuple[list[str], bool]:
        """``verify``'s problems and whether ``repair`` (``repair_command``) can undo them: damaged
        units and statistics it can; lost or altered metadata (a split group, an array's metadata,
        shapes or dtypes) it cannot, the store must be rebuilt."""
        metadata = [p for split in self.split_names for p in self._verify_shapes(split)]
        if metadata:
            return metadata, False
        problems: list[str] = []
        for split in self.split_names:
            problems += self._verify_split(split)
        return problems, True

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

    def _stats_from_sums(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(D,) float32 mean and population std from the unit sums (what ``finalize_split`` writes)."""
        return mean_std_from_sums(*self.raw_sums(split))

    def _verify_shapes(self, split: str) -> list[str]:
        """Metadata problems of a split, one line each: its group, then every array of the layout
        (missing, unreadable, another shape or dtype). ``repair`` cannot undo any of them."""
        try:
            self.num_samples(split)  # the split group and its features array
        except StoreError as e:
            return [f"split '{split}': {_reason(str(e), self.shown)}"]
        n = self.num_samples(split)
        problems = []
        for name in _layout(self.attrs["dtype"]):
            try:
                node = self._node(split, name)
            except StoreError as e:
                problems.append(f"split '{split}': array '{name}' is {_why(e)}")
                continue
            problem = self._shape_problem(name, node, n)
            if problem:
                problems.append(f"split '{split}': {problem}")
        return problems

    def _verify_unit(self, split: str, unit: int) -> list[str]:
        problem, _ = self._unit_problem(split, unit)
        return [] if problem is None else [f"{self._where(split, unit)}: {problem}"]

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
                    f"{self.shown}: split '{split}' cannot be listed ({_short(e)}); the store is damaged"
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
        if self.quantized:
            problem = cosine_record_problem(data["quant_cosine"], stored.shape[0] * stored.shape[1])
            if problem:
                return problem, data
        return None, data

    def _checked_unit(self, split: str, unit: int) -> dict[str, np.ndarray]:
        """The unit's arrays as read, after checking them; StoreError naming the unit and the repair."""
        problem, data = self._unit_problem(split, unit)
        if problem is not None:
            raise StoreError(
                f"{self.shown}: {self._where(split, unit)} is damaged: {problem}; nothing damaged is used: "
                f"repair the store with `{self.repair_command()}`"
            )
        return data

    def require_intact(self, split: str, rows: Sequence[int]) -> None:
        """Check the done units holding ``rows`` of ``split`` (their sha256, sums and values); the
        first damaged one is a StoreError naming it and the repair. Used before a mismatch with the
        dataset is called a store altered on purpose: a damaged unit is repaired, not rebuilt."""
        done = self.done_units(split)
        for unit, span in enumerate(self.units(split)):
            if done[unit] and any(span.start <= r < span.stop for r in rows):
                self._checked_unit(split, unit)

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
                f"{self.shown}: cannot repair ({e.strerror or e}); use a store you can write"
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


def _reason(message: str, shown: str) -> str:
    """A StoreError's message without the store path in front and the advice after the ``;``."""
    return message.removeprefix(f"{shown}: ").split("; ")[0]
