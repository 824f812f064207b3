"""The layout of a store: its arrays, unit geometry, names and constants.

Owns ``_LAYOUT`` (the one table of a split's arrays, read by creation and ``verify``), the store
dtypes and compressors, the root attribute names, ``SplitInit``, how rows are cut into work units
(``num_units``, ``unit_ranges``, ``format_units``), how a store directory is named (``store_name``)
and the one-line wording of zarr and codec errors (``_short``). Imports nothing of the store.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from customkd_cache.errors import StoreError, first_line

DTYPES: tuple[str, ...] = ("float16", "float32", "int8")
QUANTIZED_DTYPE = "int8"  # stored as per-unit affine codes (see the module docstring)
QUANT_ARRAYS = ("quant_scale", "quant_offset")  # what decoding needs, beside the codes
COMPRESSORS: tuple[str, ...] = ("zstd", "none")
ZSTD_LEVEL = 3
CLAIMS_DIR = ".claims"
# Store attribute written by stage one for bf16 teachers: mean cosine of bf16 vs fp32 features.
# A bf16 store's cosine between its teacher's bf16 and fp32 features on the first rows it computed:
# the mean and the minimum over those rows (provenance: not in the identity).
FIDELITY_ATTR = "bf16_cosine_to_fp32"
FIDELITY_MIN_ATTR = "bf16_cosine_to_fp32_min"
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


def _shape(layout: _ArrayLayout, *, n: int, units: int, dims: Mapping[str, int]) -> tuple[int, ...]:
    tail = tuple(dims[x] if isinstance(x, str) else x for x in layout.tail)
    return {"row": (n, *tail), "unit": (units, *tail), "split": tail}[layout.per]


def _short(e: BaseException) -> str:
    """``Type: first line of the message`` (zarr and codec errors can span lines)."""
    return f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__


def _why(e: StoreError) -> str:
    return "unreadable" if "unreadable" in str(e) else "missing"


def shown_path(path: object) -> str:
    """A path (or any text) for a one-line message: as it is, with control characters such as a
    newline escaped (``\\n``), so the message stays one line."""
    text = str(path)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shell_quote(text: str) -> str:
    """``text`` as one shell word on one line: ``shlex.quote``, or bash's ``$'...'`` with escapes when
    it holds control characters."""
    if text.isprintable():
        return shlex.quote(text)
    body = "".join(
        "\\\\" if c == "\\" else "\\'" if c == "'" else c if c.isprintable() else repr(c)[1:-1] for c in text
    )
    return f"$'{body}'"
