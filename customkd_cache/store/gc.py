"""Housekeeping of a (shared) cache root: remove what killed runs leave behind.

``collect_garbage(root)`` looks at the entries directly under ``root`` and removes:

- **temporary creator directories** (``.NAME.zarr.tmp-*``, where a store is built before its
  rename) untouched for ``temp_grace_s`` seconds: a creator at work renames its directory within
  seconds, so an old one belongs to a killed process;
- **stale claim files** (and tombstones) in the ``.claims/`` of incomplete stores: claims of dead
  processes on this host, or whose lease ran out (see ``claims.py``);
- **incomplete stores** untouched for ``older_than_days`` that hold no live claim.

It never touches a complete store, a store it cannot read (``verify`` it; it is reported as kept),
or a live claim. Age is the newest mtime of any file in the tree, so a store with a writer at work
is young. Removal renames first, then deletes, so a half-deleted store never looks like a store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from customkd_cache.errors import StoreError
from customkd_cache.store.claims import is_stale, remove_if_stale
from customkd_cache.store.feature_store import open_store
from customkd_cache.store.layout import CLAIMS_DIR

Kind = Literal["temp_dir", "stale_claim", "tombstone", "incomplete_store"]
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
    """What was removed (or, with ``dry_run``, would be) and what was kept with the reason."""

    root: Path
    dry_run: bool
    removed: list[Removal] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)

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
        StoreError: ``root`` is not a directory, or ``older_than_days`` is negative.
    """
    root = Path(root)
    if not root.is_dir():
        raise StoreError(
            f"{root}: cache root not found; pass an existing directory or set CUSTOMKD_CACHE_ROOT"
        )
    if older_than_days < 0:
        raise StoreError(f"--older-than {older_than_days}: must be >= 0 days")
    now = time.time() if now is None else now
    result = GcResult(root, dry_run)
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.is_symlink():
            continue
        if child.name.startswith(".") and ".zarr.tmp-" in child.name:
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
    """Remove the stale claims and old tombstones of ``store``; return how many live claims it has."""
    live = 0
    for path in sorted((store / CLAIMS_DIR).rglob("*")):
        if path.name.endswith(".claim"):
            if not is_stale(path, lease_s=lease_s):
                live += 1
                continue
            size = _size(path)
            if result.dry_run or remove_if_stale(path, lease_s=lease_s):
                result.removed.append(
                    Removal(path, "stale_claim", size, "claim of a dead process or lapsed lease")
                )
        elif path.name.endswith(".tomb") and now - _mtime(path) >= grace_s:
            _remove(path, "tombstone", "left by a claim takeover that was killed", result)
    return live


def _remove(path: Path, kind: Kind, reason: str, result: GcResult) -> None:
    size = _size(path)
    if not result.dry_run:
        if path.is_dir():
            doomed = path.with_name(f".{path.name}.gc-{uuid.uuid4().hex}")
            try:
                os.rename(path, doomed)
            except FileNotFoundError:  # removed by another gc meanwhile
                return
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
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


def _size(path: Path) -> int:
    if not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            return os.lstat(path).st_size
        return 0
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _ago(seconds: float) -> str:
    if seconds >= DAY_S:
        return f"{seconds / DAY_S:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds:.0f} s"
