"""Creating files in directories that other users may write to (shared run, sweep and output folders).

Anyone who can write to a shared folder can plant a symbolic link where this tool is about to write
(``metrics.jsonl -> ~victim/.bashrc``). Writing through it would overwrite or truncate a file of the
user who runs the command. So every file the package creates goes through this module:

- ``write_atomic(path, data)``: the bytes go to a new temporary file created with ``O_CREAT|O_EXCL|
  O_NOFOLLOW`` in the target's directory (never an existing file, never a link), are flushed and
  fsynced, and the file is renamed over ``path``. A rename replaces a link at ``path`` itself, never
  the file it points to, and a reader never sees a half-written file. ``data`` may be a callback that
  writes to the open temporary file (``torch.save``, ``torch.onnx.export``). Nothing is ever rewritten
  in place: to shorten a file, write the kept part with ``write_atomic``.
- ``save_torch(path, obj)``: ``torch.save`` through ``write_atomic``; torch reports a failed write (a
  full disk) as ``RuntimeError``, which becomes the same one-line ``OutputError``.
- ``append_line(path, text)``: appends with ``O_APPEND|O_NOFOLLOW`` to a regular file with one link;
  a symbolic link, a hard link or anything else at ``path`` is refused.
- ``ensure_dir(path, within=base)``: creates a directory whose components below ``base`` must be real
  directories (a planted link there would move every later write into someone else's folder).
- ``check_no_links(directory)``: refuses a directory (a run directory) holding links the tool never
  makes, naming them.
- ``scratch_dir(parent)``: a fresh private directory for tools that write their own files by name
  (the onnxruntime quantizer), removed on exit and when SIGTERM ends the process.

A SIGTERM that arrives while a temporary file or scratch directory exists ends the process with
status 143 after removing it (where SIGTERM has its default action), so a killed command leaves no
temporary files behind.

Every failure is an ``OutputError`` (exit 2) naming the path and the fix; the temporary file is
removed. ``dir_size`` is the one place that sizes a directory tree (links are not followed).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

from customkd_cache.errors import CustomKDError, OutputError, first_line

Writer = Callable[[IO[bytes]], None]

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_FIX = "free space, or choose a directory you can write"


def write_atomic(path: Path, data: bytes | str | Writer, *, mode: int | None = None, fix: str = _FIX) -> None:
    """Replace ``path`` with ``data`` (bytes, UTF-8 text, or a callback writing to a binary file).

    ``mode`` sets the file's permissions exactly (e.g. ``0o644`` for files shared with a lab); by
    default they are ``0o666`` less the umask, as for any new file.

    Raises:
        OutputError: the directory cannot be written, ``path`` is a directory, or the write failed
            (no space, quota); ``fix`` is appended to the message. A ``CustomKDError`` raised by the
            callback passes through unchanged.
    """
    path = Path(path)
    fd, tmp = _create_temp(path, fix)
    try:
        with _exit_on_sigterm(), os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, CustomKDError):
            raise OutputError(_cannot_write(path, e, fix)) from None
        raise
    _fsync_dir(path.parent)


def save_torch(path: Path, obj: Any, *, fix: str = _FIX) -> None:
    """``torch.save(obj)`` to ``path`` through ``write_atomic`` (same guarantees, same errors)."""
    import torch

    def write(f: IO[bytes]) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's stream writer reports ENOSPC / EIO as RuntimeError
            raise OSError(errno.EIO, first_line(e)) from None

    write_atomic(path, write, fix=fix)


def append_line(path: Path, text: str) -> None:
    """Append ``text`` and a newline to the regular file ``path`` (created if missing).

    Raises:
        OutputError: ``path`` is a symbolic link, has other hard links, is not a regular file, or
            cannot be written.
    """
    path = Path(path)
    try:
        fd = os.open(path, _APPEND, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(_planted(path, "a symbolic link")) from None
        if e.errno == errno.ENXIO:  # a FIFO without a reader (opened non-blocking: no hang)
            raise OutputError(_planted(path, "not a regular file")) from None
        raise OutputError(_cannot_write(path, e, _FIX)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(_planted(path, "not a regular file"))
        if st.st_nlink > 1:
            raise OutputError(_planted(path, f"a file with {st.st_nlink} hard links"))
        payload = (text.rstrip("\n") + "\n").encode("utf-8")
        while payload:
            payload = payload[os.write(fd, payload) :]
    except OSError as e:
        if isinstance(e, CustomKDError):
            raise
        raise OutputError(_cannot_write(path, e, _FIX)) from None
    finally:
        os.close(fd)


def ensure_dir(path: Path, *, within: Path | None = None, what: str = "") -> Path:
    """Create the directory ``path`` (and its parents) and return it.

    With ``within`` (a directory the user named, e.g. a sweep's ``--out``), every component of
    ``path`` below ``within`` must be a real directory: a symbolic link there is refused, because it
    would send later writes into another folder. ``within`` itself and its parents may be links (the
    user chose them). ``what`` prefixes the messages (e.g. ``"--out"``).

    Raises:
        OutputError: a component is a link (below ``within``) or a file, or cannot be created.
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    base = Path(within) if within is not None else path
    try:
        rest = path.relative_to(base).parts
    except ValueError:
        raise ValueError(f"{path} is not inside {base}") from None
    _makedirs(base, label)
    current = base
    for part in rest:
        current = current / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(current)  # mkdir never follows a link: an existing entry is checked below
        try:
            st = os.lstat(current)
        except OSError as e:
            raise OutputError(f"{label}: cannot create {current} ({e.strerror or e}); {_FIX}") from None
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(_planted(current, "a symbolic link", prefix=label))
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(
                f"{label}: {current} is a file, not a directory; remove it or choose another path"
            )
    return path


def check_no_links(directory: Path, expected: Iterable[str] = ()) -> None:
    """Refuse a directory (and everything below it) that holds symbolic links other than the
    ``expected`` ones (paths relative to ``directory``); a missing directory passes.

    Raises:
        OutputError: naming up to five unexpected links and where they point.
    """
    directory = Path(directory)
    allowed = set(expected)
    found = [rel for rel in _links_below(directory, "") if rel not in allowed]
    if found:
        shown = ", ".join(f"{rel} -> {_target(directory / rel)}" for rel in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise OutputError(
            f"{directory}: holds symbolic links this tool never makes ({shown}{more}); another user may "
            "have planted them to redirect its writes: remove them, or use another directory"
        )


@contextlib.contextmanager
def scratch_dir(parent: Path) -> Iterator[Path]:
    """A fresh directory in ``parent`` (``mkdtemp``: private, never an existing path), removed on
    exit, also when SIGTERM ends the process meanwhile (in the main thread, SIGTERM raises
    ``SystemExit(143)`` inside the block, so the removal runs)."""
    import tempfile

    try:
        path = Path(tempfile.mkdtemp(prefix=".scratch-", dir=parent))
    except OSError as e:
        raise OutputError(_cannot_write(Path(parent), e, _FIX)) from None
    try:
        with _exit_on_sigterm():
            yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def dir_size(path: Path) -> int:
    """Bytes of the file at ``path``, or of every file below the directory ``path`` (0 when absent).

    Links are counted as links (their own size), never followed; files that vanish meanwhile (a
    writer's temporary file renamed away) are skipped.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


# --- helpers -----------------------------------------------------------------------------------


def _create_temp(path: Path, fix: str) -> tuple[int, str]:
    """A new file beside ``path``, created exclusively (an existing name or a link is never opened)."""
    stem = path.name[:200]
    for _ in range(100):
        tmp = str(path.with_name(f".{stem}.{secrets.token_hex(4)}.tmp"))
        try:
            return os.open(tmp, _CREATE, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(_cannot_write(path, e, fix)) from None
    raise OutputError(f"{path}: cannot create a temporary file beside it; {fix}")


def _cannot_write(path: Path, e: OSError, fix: str) -> str:
    if isinstance(e, IsADirectoryError) or (e.errno == errno.EISDIR):
        return f"{path}: is a directory; give the path of a file to write"
    if isinstance(e, NotADirectoryError) or e.errno == errno.ENOTDIR:
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path.parent)
        return f"{path}: {blocker} is a file, not a directory; choose another path"
    if isinstance(e, FileNotFoundError):
        return f"{path}: directory {path.parent} does not exist; create it or choose another path"
    reason = e.strerror or first_line(e)
    return f"{path}: cannot write ({reason}); {fix}"


def _planted(path: Path, kind: str, *, prefix: str = "") -> str:
    where = f" (to {_target(path)})" if kind == "a symbolic link" else ""
    head = f"{prefix}: " if prefix else ""
    return (
        f"{head}{path} is {kind}{where}, which this tool never makes; another user may have planted it to "
        "redirect the write: remove it, or use another directory"
    )


def _target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _links_below(directory: Path, prefix: str) -> list[str]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise OutputError(
            f"{directory}: cannot be listed ({e.strerror or e}); check its permissions"
        ) from None
    found: list[str] = []
    for entry in entries:
        rel = f"{prefix}{entry.name}"
        if entry.is_symlink():
            found.append(rel)
        elif entry.is_dir(follow_symlinks=False):
            found += _links_below(Path(entry.path), f"{rel}/")
    return found


def _makedirs(path: Path, label: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{label}: {path} is a file, not a directory; choose another path") from None
    except NotADirectoryError:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise OutputError(f"{label}: {blocker} is a file, not a directory; choose another path") from None
    except OSError as e:
        raise OutputError(f"{label}: cannot create the directory ({e.strerror or e}); {_FIX}") from None


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: some file systems refuse to fsync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` inside the block, so that its cleanup runs; only in the main
    thread, and only where SIGTERM has its default action (a handler someone installed is kept)."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
