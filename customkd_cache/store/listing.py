"""Listing the stores of a cache root: ``store_dirs`` (the ``*.zarr`` directories, opening
nothing) and ``list_stores`` (one entry each for ``ls``; a store that cannot be read is listed as
damaged with the reason, and the listing goes on).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from customkd_cache.errors import StoreError, first_line
from customkd_cache.files import dir_size
from customkd_cache.store.feature_store import FeatureStore, open_store
from customkd_cache.store.layout import shown_path


def list_stores(root: Path) -> list[dict[str, Any]]:
    """One entry per store directly under ``root`` (``*.zarr`` directories), sorted by name.

    Entry keys: ``path``, ``dataset``, ``teacher`` (name), ``splits``, ``complete``, ``size_bytes``
    (on disk), ``fingerprint``, ``request_key``, ``num_samples`` (total), ``num_views``, ``created``
    (from the provenance), ``damaged``, ``unreadable`` and ``error``. A store that cannot be read is
    listed with ``damaged`` true and the reason in ``error`` instead of stopping the listing; an
    entry this user may not look into (another user's private directory) with ``unreadable`` true.
    Temporary build directories (dot-named) and ``*.zarr`` directories without ``zarr.json`` (not
    stores) are skipped. Raises StoreError when ``root`` is not a directory.
    """
    found, unreadable = scan_root(root)
    entries = []
    for child in found:
        try:
            entries.append(_list_entry(open_store(child)))
        except Exception as e:  # StoreError, or zarr's own errors for a damaged hierarchy
            entries.append(_damaged_entry(child, e))
    for child, why in unreadable:
        entries.append(_damaged_entry(child, StoreError(why)) | {"damaged": False, "unreadable": True})
    return sorted(entries, key=lambda e: e["path"])


def store_dirs(root: Path) -> list[Path]:
    """The store directories directly under ``root``, sorted by name: ``*.zarr`` directories with a
    ``zarr.json``, temporary (dot-named) build directories and entries this user cannot look into
    left out. Opens nothing. Raises StoreError when ``root`` is not a directory."""
    return scan_root(root)[0]


def scan_root(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(stores, unreadable)`` directly under ``root``: the ``*.zarr`` directories holding a
    ``zarr.json`` (of any kind: one that is not a file is a damaged store), and the ``*.zarr``
    entries that cannot be looked into, with the reason. Never follows into, nor fails on, another
    user's private directory. Raises StoreError when ``root`` is not a readable directory."""
    root = Path(root)
    try:
        children = sorted(os.scandir(root), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        raise StoreError(
            f"{shown_path(root)}: cache root not found; pass an existing directory or set CUSTOMKD_CACHE_ROOT"
        ) from None
    except OSError as e:
        raise StoreError(
            f"{shown_path(root)}: cache root cannot be read ({e.strerror or e}); "
            "pass a directory you can read"
        ) from None
    stores: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    for entry in children:
        if entry.name.startswith(".") or not entry.name.endswith(".zarr"):
            continue
        child = Path(entry.path)
        try:
            if not entry.is_dir():
                continue
            os.stat(child / "zarr.json")
        except FileNotFoundError:
            continue  # a directory, not a store
        except OSError as e:  # EACCES: a directory of another user (umask 077)
            unreadable.append((child, f"cannot be read ({e.strerror or e}); skipped"))
            continue
        stores.append(child)
    return stores, unreadable


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
        "unreadable": False,
        "error": "",
    }


def _damaged_entry(path: Path, error: Exception) -> dict[str, Any]:
    return {
        "path": str(path),
        "dataset": None,
        "teacher": None,
        "splits": [],
        "complete": False,
        "size_bytes": dir_size(path),
        "fingerprint": None,
        "request_key": None,
        "num_samples": None,
        "num_views": None,
        "created": None,
        "damaged": True,
        "unreadable": False,
        "error": shown_path(first_line(error, 1000)),
    }
