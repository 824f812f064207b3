"""Claims on work units, as plain files, so writers sharing one store do not compute a unit twice.

A claim is the file ``<dir>/<key>.claim`` holding JSON ``{host, pid, time, token}``. It is written
whole to a private temporary file first and then hard-linked to its name (atomic, and exclusive, on
local file systems and on NFS), so a claim never exists without its record: a process killed while
claiming leaves no claim that only its lease could expire. Its mtime is the heartbeat:
``Claim.refresh`` touches it. A claim is stale when its process is gone (same host, pid not alive)
or its lease ran out (mtime older than ``lease_s``, the test that works across hosts); a stale claim
is taken over by renaming it to a unique tombstone, which only one of several stealers can do.

Claims prevent duplicate work; they are not what keeps the data correct. A unit computed twice
(after a lease ran out under a slow writer) is written twice with the same bytes, each file by
rename, and a unit is done only once its own writer has finished it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import uuid
from pathlib import Path
from types import TracebackType

_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class Claim:
    """A held claim; a context manager that releases it on exit."""

    def __init__(self, path: Path, token: str) -> None:
        self.path = path
        self.token = token

    def __enter__(self) -> Claim:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def held(self) -> bool:
        """Whether the claim file still carries this claim's token (it may have been taken over)."""
        record = _read(self.path)
        return record is not None and record.get("token") == self.token

    def refresh(self) -> None:
        """Heartbeat: touch the claim file so its lease starts again. No-op if it was taken over."""
        if self.held():
            with contextlib.suppress(FileNotFoundError):  # taken over between the check and the touch
                os.utime(self.path)

    def release(self) -> None:
        """Remove the claim file, unless another process has taken it over meanwhile."""
        if self.held():
            self.path.unlink(missing_ok=True)


def try_claim(dir: Path, key: str, *, lease_s: float = 600.0) -> Claim | None:
    """Claim ``key`` in ``dir`` (created if missing); ``None`` if another process holds a live claim.

    A stale claim (dead pid on this host, or mtime older than ``lease_s`` seconds) is taken over.

    Raises:
        ValueError: ``key`` is not a plain file name ([A-Za-z0-9._-], not starting with '.').
        OSError: ``dir`` cannot be created or written (e.g. a read-only shared store).
    """
    if not _KEY.fullmatch(key):
        raise ValueError(
            f"claim key {key!r} must be a plain file name of [A-Za-z0-9._-], not starting with '.'"
        )
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    path = dir / f"{key}.claim"
    # create; else judge the holder and steal a stale claim, then create once more. A third attempt
    # covers a holder that released (file gone) while we were judging it.
    for _ in range(3):
        claim = _create(path)
        if claim is not None:
            return claim
        seen = _read_raw(path)
        if seen is None:
            continue
        if not _is_stale(path, seen, lease_s) or not _steal(path, seen):
            return None
    return None


def _create(path: Path) -> Claim | None:
    """The claim at ``path`` with this process's record, or None if a claim is there already.

    The record is complete before the claim's name exists: an empty claim (a kill between an
    exclusive create and the write) would name no process, so nobody could tell that its holder
    died, and every other writer would wait out the whole lease for it.
    """
    token = uuid.uuid4().hex
    record = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "token": token}
    tmp = path.with_name(f".{path.name}.{token}.tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # O_EXCL: never via a link
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.link(tmp, path)  # fails if any file, or a planted link, is at path already
    except FileExistsError:
        return None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return Claim(path, token)


def _read_raw(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _read(path: Path) -> dict[str, object] | None:
    raw = _read_raw(path)
    return _parse(raw) if raw is not None else None


def _parse(raw: bytes) -> dict[str, object] | None:
    try:
        record = json.loads(raw)
    except ValueError:  # being written right now, or damaged: judged by its mtime alone
        return None
    return record if isinstance(record, dict) else None


def _is_stale(path: Path, raw: bytes, lease_s: float) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: the next create attempt decides
    if age > lease_s:
        return True
    record = _parse(raw) or {}
    pid = record.get("pid")
    return record.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this host (someone else's counts as running)."""
    return _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _steal(path: Path, judged: bytes) -> bool:
    """Take over the stale claim whose bytes were ``judged``; True if this process removed it.

    Only one stealer's rename of ``path`` succeeds. If what was renamed is not the claim judged stale
    (another stealer already replaced it with a live claim), it is linked back into place.
    """
    tomb = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tomb")
    try:
        os.rename(path, tomb)
    except FileNotFoundError:
        return False
    try:
        if tomb.read_bytes() == judged:
            return True
        # link never overwrites: a claim created meanwhile wins (and file systems without hard
        # links lose the live claim, which costs duplicate work, never wrong data)
        with contextlib.suppress(OSError):
            os.link(tomb, path)
        return False
    finally:
        tomb.unlink(missing_ok=True)


def remove_if_stale(path: Path, *, lease_s: float = 600.0) -> bool:
    """Housekeeping: remove the claim file ``path`` if ``is_stale``; True if this call removed it.

    A claim replaced by a live one meanwhile is left in place.
    """
    seen = _read_raw(path)
    return seen is not None and _stale_for_housekeeping(path, seen, lease_s) and _steal(path, seen)


def is_stale(path: Path, *, lease_s: float = 600.0) -> bool:
    """Housekeeping's judgement, stricter than ``try_claim``'s: a claim of a live process on this host
    is never stale (even past its lease: the holder may be slow, not gone); others are stale when
    their process is gone or their lease ran out."""
    seen = _read_raw(path)
    return seen is not None and _stale_for_housekeeping(path, seen, lease_s)


def _stale_for_housekeeping(path: Path, raw: bytes, lease_s: float) -> bool:
    record = _parse(raw) or {}
    pid = record.get("pid")
    if record.get("host") == socket.gethostname() and isinstance(pid, int) and _pid_alive(pid):
        return False
    return _is_stale(path, raw, lease_s)
