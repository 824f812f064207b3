"""Reporting on an opened store: its size, names, the ``info`` summary, bytes per view and the
int8 cosine record. Reads markers and records, never the features.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from customkd_cache.errors import StoreError
from customkd_cache.files import dir_size
from customkd_cache.store.base import StoreBase
from customkd_cache.store.codec import cosine_record_problem
from customkd_cache.store.layout import FIDELITY_ATTR, FIDELITY_MIN_ATTR, QUANT_ARRAYS


class StoreInfo(StoreBase):
    """What ``info`` and ``ls`` show of an opened store (see the module docstring)."""

    def size_bytes(self) -> int:
        """Bytes of every file under the store directory."""
        return dir_size(self.path)

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
            **{k: self.attrs[k] for k in (FIDELITY_ATTR, FIDELITY_MIN_ATTR) if k in self.attrs},
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
                    total += dir_size(self.path / split / name / "c" / str(unit))
        return total / views if views else None

    def quant_cosine(self) -> dict[str, float] | None:
        """``{"mean", "min"}`` over every stored row and view of the done units of an int8 store: the
        cosine between the decoded and the float32 features, measured when each unit was written.
        None before any unit is done. Raises StoreError for a store that is not int8."""
        if not self.quantized:
            raise StoreError(f"{self.shown}: dtype {self.dtype.name} records no quantization cosine")
        sums, mins, count = [], [], 0
        for split in self.split_names:
            done = np.flatnonzero(self.done_units(split))
            if not done.size:
                continue
            record = np.asarray(self._array(split, "quant_cosine")[:], dtype=np.float64)[done]
            units = self.units(split)
            for k, row in zip(done.tolist(), record, strict=True):
                problem = cosine_record_problem(row, len(units[k]) * self.num_views)
                if problem:
                    raise StoreError(
                        f"{self.shown}: split '{split}' unit {k}: {problem}: the record is damaged; "
                        f"repair the store with `{self.repair_command()}`"
                    )
            count += sum(len(units[k]) for k in done.tolist()) * self.num_views
            sums += record[:, 0].tolist()
            mins += record[:, 1].tolist()
        return {"mean": math.fsum(sums) / count, "min": min(mins)} if count else None


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
