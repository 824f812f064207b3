"""Creating a store: ``create_or_open_store`` validates the root attributes, builds the whole
store (attributes, ids, labels, empty markers) in a temporary directory beside its path and renames
it into place, so concurrent creators all end up with the one store that won the rename. Build
directories of killed creators on this host are removed.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

from customkd_cache import FORMAT_VERSION
from customkd_cache.errors import StoreError
from customkd_cache.store.claims import pid_alive
from customkd_cache.store.feature_store import FeatureStore, open_store
from customkd_cache.store.layout import (
    _BASE_ATTRS,
    _UNSAFE,
    COMPRESSORS,
    DTYPES,
    ZSTD_LEVEL,
    SplitInit,
    _layout,
    _shape,
    num_units,
)


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
    _check_layout(store, attrs, {name: len(init.ids) for name, init in splits.items()})
    return store


def _check_layout(store: FeatureStore, attrs: Mapping[str, Any], num_samples: Mapping[str, int]) -> None:
    """A store found at a create path must match what the caller would have created."""
    keys = ("splits", "num_views", "feature_dim", "dtype")
    ours = {key: store.attrs[key] for key in keys} | {
        "num_samples": {s: store.num_samples(s) for s in store.split_names}
    }
    theirs = {key: attrs[key] for key in keys} | {"num_samples": dict(num_samples)}
    if ours != theirs:
        raise StoreError(
            f"{store.path}: store has the right fingerprint but another layout "
            f"({ours} vs asked {theirs}); remove it and rerun"
        )


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
    from customkd_cache import catalog  # catalog looks stores up: imported when first needed

    try:
        hashed = catalog.fingerprint(dict(identity))
    except (TypeError, ValueError) as e:
        raise ValueError(f"identity must be plain JSON (no numpy values, NaN or Inf): {e}") from None
    if fingerprint != hashed:
        raise ValueError(f"fingerprint {fingerprint!r} is not the hash of the identity ({hashed})")
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
