"""Listing the stores of a cache root: ``store_dirs`` (the ``*.zarr`` directories, opening
nothing) and ``list_stores`` (one entry each for ``ls``; a store that cannot be read is listed as
damaged with the reason, and the listing goes on).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from customkd_cache.errors import StoreError
from customkd_cache.store.feature_store import FeatureStore, open_store


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
