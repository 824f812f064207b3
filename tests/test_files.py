"""customkd_cache.files: nothing is written through a planted link, failures are one-line OutputErrors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest
import torch

from customkd_cache import files
from customkd_cache.errors import CustomKDError, OutputError, first_line


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n" * 100)
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_write_atomic_replaces_a_planted_link_never_its_target(tmp_path: Path, victim: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "results.json").symlink_to(victim)
    files.write_atomic(shared / "results.json", "{}\n")
    assert victim.read_text() == "precious\n" * 100
    assert not (shared / "results.json").is_symlink()
    assert (shared / "results.json").read_text() == "{}\n"
    assert leftovers(shared) == []


def test_write_atomic_takes_bytes_text_or_a_callback_and_keeps_the_umask(tmp_path: Path) -> None:
    files.write_atomic(tmp_path / "a", b"\x00\x01")
    files.write_atomic(tmp_path / "b", "é")
    files.write_atomic(tmp_path / "c", lambda f: f.write(b"cb"))
    files.write_atomic(tmp_path / "d", "x", mode=0o640)
    assert (tmp_path / "a").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b").read_text(encoding="utf-8") == "é"
    assert (tmp_path / "c").read_bytes() == b"cb"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")

    def full(f: IO[bytes]) -> None:
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="metrics.jsonl: cannot write .No space left on device.; free"):
        files.write_atomic(target, full)
    assert target.read_text() == "old\n"
    assert leftovers(tmp_path) == []


def test_a_domain_error_from_the_callback_passes_through(tmp_path: Path) -> None:
    class Mine(CustomKDError, ValueError):
        pass

    def refuse(f: IO[bytes]) -> None:
        raise Mine("nope")

    with pytest.raises(Mine):
        files.write_atomic(tmp_path / "x", refuse)
    assert list(tmp_path.iterdir()) == []


def test_save_torch_turns_a_full_disk_runtime_error_into_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def enospc(obj: object, f: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\nmore")

    files.save_torch(tmp_path / "ok.pt", {"a": torch.ones(2)})
    assert torch.load(tmp_path / "ok.pt", weights_only=True)["a"].tolist() == [1.0, 1.0]
    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(OutputError, match=r"last.pt: cannot write \(\[enforce fail") as info:
        files.save_torch(tmp_path / "last.pt", {})
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.pt"]


def test_write_atomic_refuses_a_directory_or_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="dir: is a directory"):
        files.write_atomic(tmp_path / "dir", "x")
    with pytest.raises(OutputError, match="file is a file, not a directory"):
        files.write_atomic(tmp_path / "file" / "x.json", "x")
    with pytest.raises(OutputError, match="does not exist"):
        files.write_atomic(tmp_path / "missing" / "x.json", "x")


def test_append_line_refuses_links_and_other_files(tmp_path: Path, victim: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    files.append_line(log, '{"epoch": 0}')
    files.append_line(log, '{"epoch": 1}\n')
    assert log.read_text() == '{"epoch": 0}\n{"epoch": 1}\n'
    link = tmp_path / "link.jsonl"
    link.symlink_to(victim)
    with pytest.raises(OutputError, match=r"link.jsonl is a symbolic link \(to .*victim.txt\)"):
        files.append_line(link, "x")
    hard = tmp_path / "hard.jsonl"
    os.link(victim, hard)
    with pytest.raises(OutputError, match="2 hard links"):
        files.append_line(hard, "x")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="not a regular file"):
        files.append_line(fifo, "x")  # opened non-blocking: no reader needed to fail fast
    assert victim.read_text() == "precious\n" * 100


def test_ensure_dir_refuses_links_below_the_users_directory(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    user = tmp_path / "link-the-user-chose"
    user.symlink_to(elsewhere)
    assert files.ensure_dir(user / "a" / "b", within=user).is_dir()
    (elsewhere / "planted").symlink_to(tmp_path)
    with pytest.raises(OutputError, match="--out .*planted is a symbolic link"):
        files.ensure_dir(user / "planted" / "checkpoints", within=user, what="--out")
    (elsewhere / "afile").write_text("")
    with pytest.raises(OutputError, match="afile is a file, not a directory"):
        files.ensure_dir(user / "afile" / "x", within=user)
    with pytest.raises(OutputError, match="afile is a file, not a directory"):
        files.ensure_dir(user / "afile" / "x")


def test_check_no_links_names_the_unexpected_ones(tmp_path: Path, victim: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    files.check_no_links(run)
    files.check_no_links(tmp_path / "missing")
    (run / "checkpoints" / "last.tmp").symlink_to(victim)
    (run / "ok").symlink_to(victim)
    with pytest.raises(OutputError, match=r"checkpoints/last.tmp -> .*victim.txt\)") as info:
        files.check_no_links(run, expected=["ok"])
    assert ", ok ->" not in str(info.value)


def test_scratch_dir_is_removed_when_sigterm_ends_the_process(tmp_path: Path) -> None:
    code = (
        "import os, signal, sys\n"
        "from customkd_cache.files import scratch_dir\n"
        f"with scratch_dir({str(tmp_path)!r}) as d:\n"
        "    (d / 'student.int8.pre.onnx').write_bytes(b'x' * 100)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    import time; time.sleep(5)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_dir_size_counts_files_never_follows_links(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_bytes(b"x" * 10)
    (tmp_path / "d" / "g").write_bytes(b"x" * 5)
    (tmp_path / "d" / "h").symlink_to(tmp_path / "d" / "e")
    assert files.dir_size(tmp_path / "d") == 15  # the link to e/ is not followed
    assert files.dir_size(tmp_path / "d" / "g") == 5
    assert files.dir_size(tmp_path / "nothing") == 0


def test_first_line() -> None:
    assert first_line(ValueError("\n  first  \nsecond")) == "first"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError("x" * 500), limit=10) == "x" * 10


def test_a_read_only_directory_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def read_only(path: str, flags: int, *args: int, **kwargs: object) -> int:
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(
        OutputError, match=r"table.md: cannot write \(Permission denied\); free space, or choose"
    ):
        files.write_atomic(tmp_path / "table.md", "x")
    with pytest.raises(OutputError, match="metrics.jsonl: cannot write .Permission denied."):
        files.append_line(tmp_path / "metrics.jsonl", "x")


def test_sigterm_while_writing_leaves_no_temporary(tmp_path: Path) -> None:
    code = (
        "import os, signal, time\n"
        "from customkd_cache.files import write_atomic\n"
        "def slow(f):\n"
        "    f.write(b'x' * 100)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        f"write_atomic({str(tmp_path / 'last.pt')!r}, slow)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert list(tmp_path.iterdir()) == []
