"""Content digests of a dataset's samples, and the per-user cache that keeps them cheap.

The manifest digest, and so every cache fingerprint, covers the sha256 of every sample's bytes (of
the file for file datasets, of the image row for array datasets): an image replaced by a different
one of the same byte size gives another fingerprint, so a store of the earlier bytes is never used
for it. The digests depend only on the bytes, never on paths, times or the machine, so a store made
on one machine serves the same files copied to another.

Reading every file on every command would cost a full read of the dataset, so, as git's index does,
each user keeps a cache of the digests keyed by what ``stat`` says of each file (size, mtime_ns,
ctime_ns, inode): a file whose ``stat`` is unchanged is not read again. ``ctime`` cannot be set by a
user, so restoring a file's mtime after rewriting it does not hide the change. A file changed less
than ``RACY_NS`` before it was hashed is not cached (git's "racily clean" entries): a second change
within the file system's time granularity would otherwise keep its stat. The cache lives in
``CUSTOMKD_CACHE_ROOT/.digests/``, one file per user, dataset root and split; it is written through
``files.write_atomic`` (never through a link) with mode 0600, and read only when it is a regular file
owned by the current user and well formed: anything else is ignored (and replaced), never trusted.
Losing it costs one read of the dataset, never a wrong digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from customkd_cache.data.manifest import Sample, SplitManifest
from customkd_cache.errors import CustomKDError, DatasetError

CACHE_DIR = ".digests"
CACHE_FORMAT = 1
RACY_NS = 2_000_000_000
MAX_CACHE_BYTES = 1 << 30
HASH_THREADS = 4
_HEX = re.compile(r"[0-9a-f]{64}")

# (size, mtime_ns, ctime_ns, inode) and the sha256 hex of the bytes
Entry = tuple[int, int, int, int, str]


@dataclass(frozen=True)
class Digested:
    """A split with every sample's ``digest`` set, the ids whose bytes differ from what this user's
    cache recorded for them (same name, other content), and how many files were read."""

    split: SplitManifest
    changed: tuple[str, ...]
    files_read: int


def row_digests(split: SplitManifest, rows: np.ndarray, index_of: Any) -> SplitManifest:
    """The split with each sample's ``digest`` = sha256 of its image row (``rows[index_of(id)]``)."""
    samples = tuple(
        Sample(
            s.id,
            s.label,
            s.size,
            hashlib.sha256(np.ascontiguousarray(rows[index_of(s.id)]).tobytes()).hexdigest(),
        )
        for s in split.samples
    )
    return SplitManifest(split.name, samples)


def file_digests(root: Path, split: SplitManifest, *, cache_dir: Path | None) -> Digested:
    """The split with each sample's ``digest`` = sha256 of the file ``root / id``, read only when the
    cache in ``cache_dir`` (None: no cache) has no entry with the file's current ``stat``.

    Raises DatasetError naming the file when it cannot be read, or when its size is no longer the
    size listed (it changed while the dataset was being listed).
    """
    cache = _cache_path(cache_dir, root, split.name) if cache_dir is not None else None
    known = _read_cache(cache, root, split.name) if cache is not None else {}
    digests: list[str] = [""] * len(split.samples)
    todo: list[int] = []
    base = os.fspath(root)
    for i, s in enumerate(split.samples):
        entry = known.get(s.id)
        if entry is not None and entry[:4] == _stat_key(_stat(os.path.join(base, s.id))):
            digests[i] = entry[4]
        else:
            todo.append(i)
    fresh: dict[str, Entry] = {}
    changed: list[str] = []
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        hashed = pool.map(lambda i: _hash_file(os.path.join(base, split.samples[i].id)), todo)
        now = time.time_ns()  # before any file is read: the racy test errs on the side of rereading
        for i, (key, digest, stable) in zip(todo, hashed, strict=True):
            s = split.samples[i]
            if key[0] != s.size:
                raise DatasetError(
                    f"{root / s.id}: changed while the dataset was listed ({s.size} then {key[0]} bytes); "
                    "rerun once it is written"
                )
            digests[i] = digest
            old = known.get(s.id)
            if old is not None and old[4] != digest:
                changed.append(s.id)
            if stable and now - key[1] >= RACY_NS and now - key[2] >= RACY_NS:
                fresh[s.id] = (*key, digest)
    if cache is not None and fresh:
        _write_cache(cache, root, split.name, {**known, **fresh})
    samples = tuple(Sample(s.id, s.label, s.size, d) for s, d in zip(split.samples, digests, strict=True))
    return Digested(SplitManifest(split.name, samples), tuple(changed), len(todo))


# --- files -------------------------------------------------------------------------------------


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        raise DatasetError(
            f"{path}: cannot be read ({e.strerror}); fix it or list it in dataset.skip_list"
        ) from None


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _hash_file(path: str) -> tuple[tuple[int, int, int, int], str, bool]:
    """(stat key before reading, sha256 hex, whether the stat is the same after reading)."""
    try:
        with open(path, "rb") as f:
            before = _stat_key(os.fstat(f.fileno()))
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            after = _stat_key(os.fstat(f.fileno()))
    except OSError as e:
        raise DatasetError(
            f"{path}: cannot be read ({e.strerror}); fix it or list it in dataset.skip_list"
        ) from None
    return before, digest, before == after


# --- the cache ---------------------------------------------------------------------------------


def _cache_path(cache_dir: Path, root: Path, split: str) -> Path:
    key = hashlib.sha256(f"{root}\0{split}".encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return cache_dir / f"{key}.{os.getuid()}.json"


def _read_cache(path: Path, root: Path, split: str) -> dict[str, Entry]:
    """The entries of the cache file, or ``{}`` when it is absent, not a regular file owned by this
    user, too large, or malformed in any way."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size > MAX_CACHE_BYTES:
            return {}
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    finally:
        os.close(fd)
    return _entries(data, root, split)


def _entries(data: Any, root: Path, split: str) -> dict[str, Entry]:
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return {}
    if (
        data.get("root") != str(root)
        or data.get("split") != split
        or not isinstance(data.get("entries"), dict)
    ):
        return {}
    entries: dict[str, Entry] = {}
    for sample_id, value in data["entries"].items():
        if (
            not isinstance(value, list)
            or len(value) != 5
            or not all(type(x) is int and x >= 0 for x in value[:4])
            or not isinstance(value[4], str)
            or not _HEX.fullmatch(value[4])
        ):
            return {}  # one bad entry: the whole file is suspect
        entries[sample_id] = (value[0], value[1], value[2], value[3], value[4])
    return entries


def _write_cache(path: Path, root: Path, split: str, entries: dict[str, Entry]) -> None:
    """Best effort: a cache root that cannot be written (read-only, full) only costs a reread."""
    from customkd_cache.files import ensure_dir, write_atomic

    data = {
        "format": CACHE_FORMAT,
        "root": str(root),
        "split": split,
        "entries": dict(sorted(entries.items())),
    }
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    if not path.parent.parent.is_dir():
        return  # no cache root yet: nothing is created for it
    with contextlib.suppress(CustomKDError, OSError):
        ensure_dir(path.parent, within=path.parent.parent)  # a planted link there is refused
        write_atomic(path, text, mode=0o600)
