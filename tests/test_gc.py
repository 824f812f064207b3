"""Housekeeping of a shared cache root: `gc` and `ls`.

A cache root is planted with what killed runs leave (an old temporary creator directory, a stale
claim of a dead process, an old incomplete store) next to what must survive (a complete store, even
with a stale claim inside; an incomplete store with a live claim; young temporary and incomplete
entries; a damaged store). ``gc --dry-run`` lists exactly the garbage and changes nothing; ``gc``
removes exactly it; ``ls`` lists every store, the damaged one as damaged.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from customkd_cache.catalog import fingerprint
from customkd_cache.errors import StoreError
from customkd_cache.store import FeatureStore, SplitInit, create_or_open_store, list_stores
from customkd_cache.store.gc import DAY_S, collect_garbage

N, V, D, UNIT = 6, 2, 4, 4
OLD_DAYS = 10.0


def make_store(root: Path, name: str, *, complete: bool) -> FeatureStore:
    """A store ``NAME__t__<fingerprint>.zarr`` under ``root``, whose identity is told apart by ``name``."""
    identity = {"dataset": {"kind": "officehome", "tag": name}, "teacher": {"name": "test_vit"}}
    fp = fingerprint(identity)
    store = create_or_open_store(
        root / f"{name}__t__{fp[:12]}.zarr",
        fingerprint=fp,
        identity=identity,
        provenance={"created": "2026-01-02T03:04:05+00:00"},
        splits={"train": SplitInit(ids=[f"i{k}" for k in range(N)], labels=np.arange(N) % 2)},
        num_views=V,
        feature_dim=D,
        dtype="float16",
        unit_rows=UNIT,
        compressor="zstd",
    )
    if complete:
        rng = np.random.default_rng(0)
        for unit, rows in enumerate(store.units("train")):
            store.write_unit(
                "train",
                unit,
                features=rng.normal(size=(len(rows), V, D)).astype(np.float32),
                boxes=rng.random((len(rows), V, 4)).astype(np.float32),
                flips=np.zeros((len(rows), V), bool),
            )
        store.finalize_split("train")
    return store


def age(path: Path, days: float) -> None:
    """Set the mtime of ``path`` and everything under it ``days`` into the past."""
    past = time.time() - days * DAY_S
    for folder, dirs, files in os.walk(path):
        for name in [*files, *dirs]:
            os.utime(Path(folder) / name, (past, past), follow_symlinks=False)
    os.utime(path, (past, past))


def claim(path: Path, *, pid: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "time": time.time(), "token": "t"}))
    return path


def dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    return int(done.stdout)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def planted(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "caches"
    root.mkdir()
    p = {
        "complete": make_store(root, "done", complete=True).path,
        "old_incomplete": make_store(root, "old", complete=False).path,
        "young_incomplete": make_store(root, "new", complete=False).path,
        "live": make_store(root, "live", complete=False).path,
        "damaged": make_store(root, "bad", complete=False).path,
        "old_temp": root / ".x__t__666666666666.zarr.tmp-0123abcd",
        "young_temp": root / ".y__t__777777777777.zarr.tmp-4567cdef",
    }
    for key in ("old_temp", "young_temp"):
        (p[key] / "train").mkdir(parents=True)
        (p[key] / "zarr.json").write_text("{}")
    dead = dead_pid()
    p["stale_claim"] = claim(p["young_incomplete"] / ".claims" / "train" / "0.claim", pid=dead)
    p["complete_claim"] = claim(p["complete"] / ".claims" / "train" / "1.claim", pid=dead)
    p["live_claim"] = claim(p["live"] / ".claims" / "train" / "0.claim", pid=os.getpid())
    (p["damaged"] / "zarr.json").write_text("{not json")
    for key in ("old_incomplete", "old_temp", "live", "damaged", "complete"):
        age(p[key], OLD_DAYS)
    p["root"] = root
    return p


def test_dry_run_lists_exactly_the_garbage_and_changes_nothing(planted: dict[str, Path]) -> None:
    before = snapshot(planted["root"])
    res = collect_garbage(planted["root"], older_than_days=OLD_DAYS / 2, dry_run=True)
    assert {(r.kind, r.path) for r in res.removed} == {
        ("temp_dir", planted["old_temp"]),
        ("stale_claim", planted["stale_claim"]),
        ("incomplete_store", planted["old_incomplete"]),
    }
    assert res.bytes_freed == sum(r.bytes for r in res.removed) > 0
    kept = {path for path, _ in res.kept}
    assert kept == {planted["young_temp"], planted["young_incomplete"], planted["live"], planted["damaged"]}
    assert snapshot(planted["root"]) == before


def test_gc_removes_the_garbage_and_never_a_complete_store_or_live_claim(planted: dict[str, Path]) -> None:
    complete_before = snapshot(planted["complete"])
    res = collect_garbage(planted["root"], older_than_days=OLD_DAYS / 2)
    assert len(res.removed) == 3
    for key in ("old_temp", "stale_claim", "old_incomplete"):
        assert not planted[key].exists(), key
    for key in ("young_temp", "young_incomplete", "live", "live_claim", "damaged", "complete_claim"):
        assert planted[key].exists(), key
    assert snapshot(planted["complete"]) == complete_before
    assert not [p for p in planted["root"].iterdir() if ".gc-" in p.name]  # nothing half-deleted left
    again = collect_garbage(planted["root"], older_than_days=OLD_DAYS / 2)
    assert again.removed == []


def test_the_threshold_keeps_younger_incomplete_stores(planted: dict[str, Path]) -> None:
    res = collect_garbage(planted["root"], older_than_days=OLD_DAYS * 2, dry_run=True)
    assert planted["old_incomplete"] not in {r.path for r in res.removed}
    reasons = dict(res.kept)
    assert "threshold" in reasons[planted["old_incomplete"]]
    assert "live claim" in reasons[planted["live"]] and "verify" in reasons[planted["damaged"]]


def test_ls_lists_every_store_and_the_damaged_one_as_damaged(planted: dict[str, Path]) -> None:
    entries = {Path(e["path"]).name: e for e in list_stores(planted["root"])}
    assert set(entries) == {
        planted[k].name for k in ("complete", "old_incomplete", "young_incomplete", "live", "damaged")
    }
    done = entries[planted["complete"].name]
    assert done["complete"] and not done["damaged"] and done["error"] == ""
    assert (done["num_samples"], done["num_views"], done["teacher"]) == (N, V, "test_vit")
    assert done["created"] == "2026-01-02T03:04:05+00:00" and done["size_bytes"] > N * V * D
    assert not entries[planted["old_incomplete"].name]["complete"]
    bad = entries[planted["damaged"].name]
    assert bad["damaged"] and not bad["complete"] and "zarr" in bad["error"].lower() and bad["size_bytes"] > 0
    json.dumps(list(entries.values()))


def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    from customkd_cache.cli import main

    monkeypatch.setattr(sys, "argv", ["customkd-cache", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return int(exit_.value.code or 0), out.out, out.err


def test_cli_gc_and_ls(
    planted: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(planted["root"])
    code, out, _ = run_cli(monkeypatch, capsys, "gc", root, "--older-than", str(OLD_DAYS / 2), "--dry-run")
    assert code == 0 and "would remove 3 entries" in out
    assert str(planted["old_temp"]) in out and str(planted["stale_claim"]) in out
    assert not any(line.startswith("would") and planted["complete"].name in line for line in out.splitlines())
    code, out, _ = run_cli(monkeypatch, capsys, "ls", root)
    assert code == 0 and f"{planted['damaged']}  DAMAGED" in out
    assert f"{planted['complete']}  complete  officehome  test_vit  {N} x {V}" in out
    for args, needle in (
        (["gc", str(planted["root"] / "nope")], "cache root not found"),
        (["gc", root, "--older-than", "-1"], ">= 0 days"),
    ):
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_missing_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cache root not found"):
        collect_garbage(tmp_path / "missing")
