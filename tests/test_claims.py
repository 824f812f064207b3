"""Work-unit claims: exclusive while held, taken over when the holder died or its lease ran out."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from customkd_cache.store.claims import Claim, try_claim

RACE_KEYS = 12


def _write_claim(path: Path, *, host: str, pid: int, age_s: float = 0.0) -> None:
    path.write_text(json.dumps({"host": host, "pid": pid, "time": time.time() - age_s}))
    if age_s:
        past = time.time() - age_s
        os.utime(path, (past, past))


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    return int(done.stdout)


def _steal_worker(dir: str, barrier: Any, results: Any) -> None:
    won = []
    for i in range(RACE_KEYS):
        barrier.wait()
        claim = try_claim(Path(dir), f"unit-{i}", lease_s=60.0)
        won.append(claim is not None)
    results.put(won)


def test_a_held_claim_excludes_others(tmp_path: Path) -> None:
    first = try_claim(tmp_path / "claims", "unit-3")
    assert isinstance(first, Claim)
    record = json.loads(first.path.read_text())
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
    assert try_claim(tmp_path / "claims", "unit-3") is None
    assert try_claim(tmp_path / "claims", "unit-4") is not None
    first.release()
    again = try_claim(tmp_path / "claims", "unit-3")
    assert again is not None
    with again:
        assert again.held()
    assert not (tmp_path / "claims" / "unit-3.claim").exists()


def test_a_dead_process_claim_is_taken_over(tmp_path: Path) -> None:
    _write_claim(tmp_path / "unit-0.claim", host=socket.gethostname(), pid=_dead_pid())
    claim = try_claim(tmp_path, "unit-0")
    assert claim is not None and claim.held()
    assert json.loads(claim.path.read_text())["pid"] == os.getpid()
    assert [p.name for p in tmp_path.iterdir()] == ["unit-0.claim"]  # no tombstone left


def test_a_live_claim_on_another_host_is_respected(tmp_path: Path) -> None:
    _write_claim(tmp_path / "unit-0.claim", host="elsewhere", pid=_dead_pid())
    assert try_claim(tmp_path, "unit-0") is None


def test_an_expired_lease_is_taken_over_and_refresh_renews_it(tmp_path: Path) -> None:
    _write_claim(tmp_path / "unit-0.claim", host="elsewhere", pid=1, age_s=120.0)
    claim = try_claim(tmp_path, "unit-0", lease_s=60.0)
    assert claim is not None
    past = time.time() - 120.0
    os.utime(claim.path, (past, past))
    claim.refresh()
    assert try_claim(tmp_path, "unit-0", lease_s=60.0) is None


def test_a_taken_over_claim_is_not_released_by_its_old_holder(tmp_path: Path) -> None:
    old = try_claim(tmp_path, "unit-0")
    assert old is not None
    past = time.time() - 120.0
    os.utime(old.path, (past, past))
    new = try_claim(tmp_path, "unit-0", lease_s=60.0)
    assert new is not None and not old.held()
    old.release()
    assert new.held()


def test_bad_keys_are_refused(tmp_path: Path) -> None:
    for key in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ValueError):
            try_claim(tmp_path, key)


def test_two_processes_stealing_one_stale_claim(tmp_path: Path) -> None:
    for i in range(RACE_KEYS):
        _write_claim(tmp_path / f"unit-{i}.claim", host="elsewhere", pid=1, age_s=120.0)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_steal_worker, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    won = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [a + b for a, b in zip(*won, strict=True)] == [1] * RACE_KEYS
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"unit-{i}.claim" for i in range(RACE_KEYS))


def test_an_unwritable_store_is_a_store_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cache`` on an incomplete store it cannot write (a read-only share): one line, no traceback."""
    from types import SimpleNamespace

    from customkd_cache.errors import StoreError
    from customkd_cache.stage_one import extract
    from customkd_cache.store import claims

    def refused(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(claims, "try_claim", refused)
    store = SimpleNamespace(path=tmp_path / "s.zarr", claim_dir=lambda split: tmp_path / split)
    sampler = extract._UnitBatches(store, [("train", 0)], batch=1, lease_s=1.0)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match=r"s\.zarr: cannot claim split 'train' unit 0 \(Permission denied\)"):
        sampler._claim(("train", 0))


def test_a_writer_holding_a_unit_never_waits_for_another_writers_unit(tmp_path: Path) -> None:
    """Two writers deadlocked when each held a unit and waited in its batch sampler for the other's:
    DataLoader asks for the next batch before handing over the current one, so a sampler that waits
    while holding a claim keeps its own unit from being written. It must end the pass instead."""
    import threading
    from types import SimpleNamespace

    from customkd_cache.stage_one import extract

    units = {"train": [range(0, 2), range(2, 4)]}
    store = SimpleNamespace(
        units=lambda split: units[split],
        unit_done=lambda split, unit: False,
        claim_dir=lambda split: tmp_path / split,
    )
    (tmp_path / "train").mkdir()
    _write_claim(tmp_path / "train" / "unit-000001.claim", host=socket.gethostname(), pid=os.getppid())
    sampler = extract._UnitBatches(store, [("train", 0), ("train", 1)], batch=1, lease_s=600.0)  # type: ignore[arg-type]
    got: list[list[tuple[str, int]]] = []
    walker = threading.Thread(target=lambda: got.extend(sampler), daemon=True)
    walker.start()
    walker.join(timeout=10)
    assert not walker.is_alive(), "the sampler waits for another writer's unit while holding its own"
    assert got == [[("train", 0)], [("train", 1)]] and not sampler.finished
    assert set(sampler.held) == {("train", 0)}  # still held: the caller writes it, then starts a new pass
    sampler.release_all()


def test_a_claimer_stopped_before_its_record_is_written_leaves_no_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed while claiming (here: its write fails at that moment) must not leave a claim
    without a record: such a claim names no process, so every other writer waited out the whole
    lease for it (the likely cause of a SIGKILL-then-rerun cache test that once waited past its
    180 s timeout)."""
    from customkd_cache.store import claims

    def stopped(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # stands for the kill between creating the file and writing into it

    monkeypatch.setattr(claims.json, "dump", stopped)
    with pytest.raises(KeyboardInterrupt):
        try_claim(tmp_path, "unit-000001")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # neither a claim nor its temporary file
    assert try_claim(tmp_path, "unit-000001") is not None  # the next writer claims it at once
