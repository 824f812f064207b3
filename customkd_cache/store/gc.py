"""Housekeeping of a (shared) cache root: remove what killed runs leave behind.

``collect_garbage(root)`` looks at the entries directly under ``root`` and removes:

- **temporary creator directories** (``.NAME.zarr.tmp-*``, where a store is built before its
  rename) untouched for ``temp_grace_s`` seconds: a creator at work renames its directory within
  seconds, so an old one belongs to a killed process;
- **stale claim files** (and tombstones) in the ``.claims/`` of incomplete stores: claims of dead
  processes on this host, or whose lease ran out (see ``claims.py``);
- **incomplete stores** untouched for ``older_than_days`` that hold no live claim;
- **leftovers of a killed gc** (``.NAME.zarr.gc-*``, renamed for deletion but not deleted).

It never touches a complete store, a store it cannot read (``verify`` it; it is reported as kept),
or a live claim. Age is the newest mtime of any file in the tree, so a store with a writer at work
is young. Removal renames first, then deletes, so a half-deleted store never looks like a store.
Links are never followed. On a shared or read-only root, what cannot be removed is recorded in
``GcResult.failed`` and the run goes on.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from customkd_cache.errors import StoreError
from customkd_cache.files import dir_size
from customkd_cache.store.claims import is_stale, remove_if_stale
from customkd_cache.store.feature_store import open_store
from customkd_cache.store.layout import CLAIMS_DIR

Kind = Literal["temp_dir", "gc_leftover", "stale_claim", "tombstone", "incomplete_store"]
DAY_S = 86400.0
TEMP_GRACE_S = 3600.0
LEASE_S = 600.0


@dataclass(frozen=True)
class Removal:
    path: Path
    kind: Kind
    bytes: int
    reason: str


@dataclass
class GcResult:
    """What was removed (or, with ``dry_run``, would be), what was kept and what could not be
    removed, each with the reason."""

    root: Path
    dry_run: bool
    removed: list[Removal] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # could not be removed: why

    @property
    def bytes_freed(self) -> int:
        return sum(r.bytes for r in self.removed)


def collect_garbage(
    root: Path,
    *,
    older_than_days: float = 7.0,
    dry_run: bool = False,
    lease_s: float = LEASE_S,
    temp_grace_s: float = TEMP_GRACE_S,
    now: float | None = None,
) -> GcResult:
    """Clean ``root`` as the module docstring says; return what was done.

    Raises:
        StoreError: ``root`` is not a directory, or ``older_than_days`` is negative, NaN or infinite.
    """
    root = Path(root)
    if not root.is_dir():
        raise StoreError(
            f"{root}: cache root not found; pass an existing directory or set CUSTOMKD_CACHE_ROOT"
        )
    if not math.isfinite(older_than_days) or older_than_days < 0:
        raise StoreError(f"--older-than {older_than_days}: must be a finite number >= 0 days")
    now = time.time() if now is None else now
    result = GcResult(root, dry_run)
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.is_symlink():
            continue
        if child.name.startswith(".") and ".zarr.gc-" in child.name:
            _remove(child, "gc_leftover", "left by a gc that was killed while removing it", result)
        elif child.name.startswith(".") and ".zarr.tmp-" in child.name:
            _temp_dir(child, result, now=now, grace_s=temp_grace_s)
        elif child.suffix == ".zarr" and not child.name.startswith("."):
            _store(
                child,
                result,
                now=now,
                max_age_s=older_than_days * DAY_S,
                lease_s=lease_s,
                grace_s=temp_grace_s,
            )
    return result


def _temp_dir(path: Path, result: GcResult, *, now: float, grace_s: float) -> None:
    age = now - newest_mtime(path)
    if age < grace_s:
        result.kept.append((path, f"temporary creator directory touched {_ago(age)} ago: may be at work"))
        return
    _remove(path, "temp_dir", f"temporary creator directory untouched for {_ago(age)}", result)


def _store(
    path: Path, result: GcResult, *, now: float, max_age_s: float, lease_s: float, grace_s: float
) -> None:
    try:
        complete = open_store(path).complete()
    except Exception as e:  # a damaged store raises StoreError or zarr's own errors: never removed here
        result.kept.append(
            (path, f"unreadable store, left alone (check it with `customkd-cache verify`): {e}")
        )
        return
    if complete:
        return
    live = _claims(path, result, now=now, lease_s=lease_s, grace_s=grace_s)
    if live:
        result.kept.append((path, f"incomplete store with {live} live claim(s): a writer is at work"))
        return
    age = now - newest_mtime(path, skip=CLAIMS_DIR)
    if age < max_age_s:
        result.kept.append((path, f"incomplete store touched {_ago(age)} ago (threshold {_ago(max_age_s)})"))
        return
    _remove(path, "incomplete_store", f"incomplete store untouched for {_ago(age)}, no live claim", result)


def _claims(store: Path, result: GcResult, *, now: float, lease_s: float, grace_s: float) -> int:
    """Remove the stale claims and old tombstones of ``store``; return how many live claims it has.

    Links are never followed (a ``.claims`` that is a link, or a link inside it, is left alone), so
    nothing outside the store is looked at or removed."""
    live = 0
    for path in _claim_entries(store / CLAIMS_DIR):
        if path.name.endswith(".claim"):
            try:
                stale = is_stale(path, lease_s=lease_s)
            except OSError:  # cannot be read: counted as live, never removed
                stale = False
            if not stale:
                live += 1
                continue
            size = dir_size(path)
            try:
                gone = result.dry_run or remove_if_stale(path, lease_s=lease_s)
            except OSError as e:  # a claim of another user in a shared root, a read-only mount
                result.failed.append((path, e.strerror or str(e)))
                continue
            if gone:
                result.removed.append(
                    Removal(path, "stale_claim", size, "claim of a dead process or lapsed lease")
                )
        elif path.name.endswith(".tomb") and now - _mtime(path) >= grace_s:
            _remove(path, "tombstone", "left by a claim takeover that was killed", result)
    return live


def _claim_entries(claims: Path) -> list[Path]:
    """Every file and directory under ``claims`` (sorted), without following links; [] when
    ``claims`` is not a real directory."""
    try:
        if not stat.S_ISDIR(os.lstat(claims).st_mode):
            return []
    except OSError:
        return []
    found: list[Path] = []
    for folder, dirs, files in os.walk(claims, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            with contextlib.suppress(OSError):
                if not stat.S_ISLNK(os.lstat(path).st_mode):
                    found.append(path)
    return sorted(found)


def _remove(path: Path, kind: Kind, reason: str, result: GcResult) -> None:
    """Remove ``path`` (a directory: renamed away first, then deleted; never through a link); what
    cannot be removed (permissions, a read-only mount) is recorded in ``result.failed``."""
    size = dir_size(path)
    if not result.dry_run:
        try:
            is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
            if is_dir:
                doomed = path
                if ".gc-" not in path.name:  # a leftover of a killed gc is already renamed
                    doomed = path.with_name(f".{path.name}.gc-{uuid.uuid4().hex}")
                    os.rename(path, doomed)
                shutil.rmtree(doomed)
            else:
                path.unlink(missing_ok=True)
        except FileNotFoundError:  # removed by another gc meanwhile
            return
        except OSError as e:
            result.failed.append((path, e.strerror or str(e)))
            return
    result.removed.append(Removal(path, kind, size, reason))


def newest_mtime(path: Path, *, skip: str = "") -> float:
    """The newest mtime of ``path`` and everything under it (``skip``: a child directory name left out)."""
    newest = _mtime(path)
    for folder, dirs, files in os.walk(path):
        if skip and Path(folder) == path and skip in dirs:
            dirs.remove(skip)
        for name in [*files, *dirs]:
            newest = max(newest, _mtime(Path(folder) / name))
    return newest


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return 0.0


def _ago(seconds: float) -> str:
    if seconds >= DAY_S:
        return f"{seconds / DAY_S:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds:.0f} s"


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
