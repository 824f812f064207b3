"""The values a store records, computed in one place: int8 codes, cosine records, unit sums, the
mean/std derived from them, and each unit's sha256.

``quantize_unit``/``dequantize`` are the int8 codec (per-unit, per-dimension affine codes),
``_cosine_record`` what an int8 unit records of its decoding error, ``_unit_sums`` a unit's float64
sums, ``mean_std_from_sums`` the population mean/std from such sums (the rule for a dimension of
zero spread is ``std_divisor``), and ``unit_digest`` the hash that covers a unit's arrays. Every
function is deterministic: independent writers and resumed runs give the same bytes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np

_Q_MIN, _Q_MAX = -128, 127


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


def mean_std_from_sums(total: np.ndarray, total_sq: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(D,) float32 mean and population std from float64 sums and sums of squares over ``count`` rows."""
    mean = total / count
    # population variance from exact-order float64 sums; clamp the rounding below zero
    var = np.maximum(total_sq / count - mean * mean, 0.0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def std_divisor(std: np.ndarray) -> np.ndarray:
    """What features are divided by when standardized: ``std``, with 1 where it is 0 (a constant
    dimension is only centred), so no value becomes inf or NaN."""
    return np.where(std > 0, std, np.float32(1.0)).astype(np.float32)


def cosine_record_problem(record: np.ndarray, count: int) -> str:
    """Why a unit's ``quant_cosine`` record (sum and minimum of ``count`` cosines) cannot be one
    ``_cosine_record`` wrote, or ``""``: each cosine lies in [-1, 1] (up to rounding)."""
    total, low = (float(x) for x in np.asarray(record, np.float64).reshape(2))
    tol = 1e-6
    if not (math.isfinite(total) and math.isfinite(low)):
        return "quant_cosine record is not finite"
    if not -1 - tol <= low <= 1 + tol or not -1 - tol <= total / count <= 1 + tol:
        return f"quant_cosine record (mean {total / count:.4g}, min {low:.4g}) lies outside [-1, 1]"
    if low > total / count + tol:
        return f"quant_cosine record has its minimum {low:.4g} above its mean {total / count:.4g}"
    return ""
