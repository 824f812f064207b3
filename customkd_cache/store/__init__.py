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
keep two writers off one unit live in ``<store>/.claims/<split>/`` (see ``claims``).

The package is the only one that imports zarr. Its modules, one job each:

- ``layout``: the arrays of a split, unit geometry, names and constants.
- ``codec``: int8 codes, cosine records, unit sums, mean/std from sums, unit hashes.
- ``create``: ``create_or_open_store`` (validated root attributes, build and rename).
- ``feature_store``: ``open_store`` and ``FeatureStore`` (reading features, boxes and statistics),
  built on ``base`` (attributes, geometry, arrays, markers) with the mixins of ``writer`` (units and
  statistics), ``integrity`` (verify and repair) and ``info`` (what ``info`` and ``ls`` show).
- ``listing``: ``store_dirs`` and ``list_stores`` over a cache root.
- ``claims`` (who writes which unit) and ``gc`` (what killed runs leave behind).
"""

from __future__ import annotations

from customkd_cache.store import claims
from customkd_cache.store.codec import (
    dequantize,
    mean_std_from_sums,
    quantize_unit,
    std_divisor,
    unit_digest,
)
from customkd_cache.store.create import create_or_open_store
from customkd_cache.store.feature_store import FeatureStore, open_store
from customkd_cache.store.layout import (
    CLAIMS_DIR,
    COMPRESSORS,
    DTYPES,
    FIDELITY_ATTR,
    FIDELITY_MIN_ATTR,
    QUANT_ARRAYS,
    QUANTIZED_DTYPE,
    ZSTD_LEVEL,
    SplitInit,
    format_units,
    num_units,
    store_name,
    unit_ranges,
)
from customkd_cache.store.listing import list_stores, store_dirs

__all__ = [
    "CLAIMS_DIR",
    "COMPRESSORS",
    "DTYPES",
    "FIDELITY_ATTR",
    "FIDELITY_MIN_ATTR",
    "QUANTIZED_DTYPE",
    "QUANT_ARRAYS",
    "ZSTD_LEVEL",
    "FeatureStore",
    "SplitInit",
    "claims",
    "create_or_open_store",
    "dequantize",
    "format_units",
    "list_stores",
    "mean_std_from_sums",
    "num_units",
    "open_store",
    "quantize_unit",
    "std_divisor",
    "store_dirs",
    "store_name",
    "unit_digest",
    "unit_ranges",
]
