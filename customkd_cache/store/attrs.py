"""The root attributes of a store, checked in one place: ``check_root_attrs`` runs on every open.

A store found in a shared cache root may have been written by another version, damaged, or edited
by hand, so nothing in its ``zarr.json`` is trusted before it is checked here: the types and
ranges of the geometry (``splits``, ``num_views``, ``feature_dim``, ``unit_rows``), the allowed
``dtype`` and ``compressor``, the shape of ``identity`` and ``provenance`` (tables where the
lookup and the reports read them), and the identity itself: the ``fingerprint`` is recomputed from
the recorded identity and must match it and the directory name, and a recorded ``request_key`` or
``teacher_key`` must be the one recomputed from the identity (``catalog.stored_keys``). Any
problem is a StoreError naming the store and the attribute; callers that list or look up stores
catch it and treat the store as damaged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from customkd_cache import FORMAT_VERSION
from customkd_cache.errors import StoreError
from customkd_cache.store.layout import (
    _BASE_ATTRS,
    COMPRESSORS,
    DTYPES,
    FIDELITY_ATTR,
    FIDELITY_MIN_ATTR,
    shown_path,
)

_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_NAMED = re.compile(r".+__.+__([0-9a-f]{12})\.zarr")  # what ``store_name`` gives
MAX_VIEWS = 1 << 16
MAX_FEATURE_DIM = 1 << 20
MAX_UNIT_ROWS = 1 << 24


def check_root_attrs(path: Path, attrs: Mapping[str, Any]) -> None:
    """Raise StoreError (``PATH: damaged store: attribute 'X' ...; remove it and rebuild``) unless the
    root attributes of the store at ``path`` are what ``create_or_open_store`` writes."""
    where = shown_path(path)
    missing = [key for key in _BASE_ATTRS if key not in attrs]
    if missing:
        raise StoreError(f"{where}: not a customkd-cache store (attributes {missing} missing)")
    if attrs["format_version"] != FORMAT_VERSION:
        raise StoreError(
            f"{where}: store format {attrs['format_version']!r}, this customkd-cache reads format "
            f"{FORMAT_VERSION}; rebuild the store with `customkd-cache cache` or use a matching version"
        )
    problem = _problem(path, attrs)
    if problem:
        raise StoreError(
            f"{where}: damaged store: {problem}; it is not used: remove it and rebuild it with "
            "`customkd-cache cache`"
        )


def _problem(path: Path, attrs: Mapping[str, Any]) -> str:
    """The first thing wrong with the attributes, or ``""``."""
    bounds = (("num_views", MAX_VIEWS), ("feature_dim", MAX_FEATURE_DIM), ("unit_rows", MAX_UNIT_ROWS))
    for name, top in bounds:
        value = attrs[name]
        if not _is_int(value) or not 1 <= value <= top:
            return f"attribute '{name}' is {_show(value)}, expected an integer in [1, {top}]"
    if attrs["dtype"] not in DTYPES:
        return f"attribute 'dtype' is {_show(attrs['dtype'])}, expected one of {', '.join(DTYPES)}"
    if attrs["compressor"] not in COMPRESSORS:
        allowed = ", ".join(COMPRESSORS)
        return f"attribute 'compressor' is {_show(attrs['compressor'])}, expected one of {allowed}"
    splits = attrs["splits"]
    if not isinstance(splits, list) or not splits or not all(_split_name(s) for s in splits):
        return f"attribute 'splits' is {_show(splits)}, expected a list of split names"
    if len(set(splits)) != len(splits):
        return f"attribute 'splits' names a split twice: {_show(splits)}"
    for name in ("identity", "provenance"):
        if not isinstance(attrs[name], dict):
            return f"attribute '{name}' is {_show(attrs[name])}, expected a table"
    for key in ("dataset", "teacher"):
        entry = attrs["identity"].get(key)
        if entry is not None and not isinstance(entry, dict):
            return f"attribute 'identity.{key}' is {_show(entry)}, expected a table"
    for key in ("spec", "versions"):
        entry = attrs["provenance"].get(key)
        if entry is not None and not isinstance(entry, dict):
            return f"attribute 'provenance.{key}' is {_show(entry)}, expected a table"
    for name in (FIDELITY_ATTR, FIDELITY_MIN_ATTR):
        fidelity = attrs.get(name)
        if fidelity is not None and not (_is_number(fidelity) and -1.0 <= fidelity <= 1.0):
            return f"attribute '{name}' is {_show(fidelity)}, expected a cosine in [-1, 1]"
    return _identity_problem(path, attrs)


def _identity_problem(path: Path, attrs: Mapping[str, Any]) -> str:
    """Whether the fingerprint is the identity's, matches the directory name, and the request key is
    the identity's."""
    from customkd_cache import catalog  # catalog looks stores up: imported when first needed

    fp = attrs["fingerprint"]
    if not isinstance(fp, str) or not _FINGERPRINT.fullmatch(fp):
        return f"attribute 'fingerprint' is {_show(fp)}, expected 64 lowercase hex digits"
    try:
        recomputed = catalog.fingerprint(attrs["identity"])
    except (TypeError, ValueError) as e:  # not JSON-able: NaN and the like
        return f"attribute 'identity' cannot be hashed ({e})"
    if recomputed != fp:
        return (
            f"attribute 'fingerprint' {fp[:12]}... is not the hash of the recorded identity "
            f"({recomputed[:12]}...)"
        )
    named = _NAMED.fullmatch(path.name)
    if named and named.group(1) != fp[:12]:
        return f"the directory name ends in {named.group(1)}, but the store's fingerprint begins {fp[:12]}"
    recorded = [key for key in ("request_key", "teacher_key") if key in attrs]
    if recorded:
        try:
            keys = catalog.stored_keys(attrs["identity"], attrs["provenance"])
        except ValueError as e:
            return f"attribute '{recorded[0]}' cannot be checked: {e}"
        for key in recorded:
            if attrs[key] != keys[key]:
                return (
                    f"attribute '{key}' {str(attrs[key])[:12]}... is not the one its identity and spec "
                    f"give ({keys[key][:12]}...)"
                )
    return ""


def _split_name(name: Any) -> bool:
    # '/' would nest groups, and zarr reserves '.'-leading and '__'-leading node names
    return isinstance(name, str) and bool(name) and "/" not in name and not name.startswith((".", "__"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: Any) -> str:
    """A short ``repr`` of an attribute value for a one-line message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
