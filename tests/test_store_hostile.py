"""A shared cache root holds stores other people (or other versions, or damage) wrote.

Whatever one store's ``zarr.json`` holds, every command on the root gives one line naming the store
and what is wrong, never a traceback; ``ls`` lists it as damaged and goes on; the store lookup of
``train`` skips it. A colleague's private ``*.zarr`` directory is skipped with a note. A store's
fingerprint and keys are recomputed from its identity, never trusted as written. ``verify`` prints a
repair command only when repair can fix the damage, and one that acts on that store. ``gc`` never
follows links, refuses ages that are not numbers, and goes on past what it cannot remove.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from test_find_store import find, make_store

from customkd_cache.catalog import fingerprint
from customkd_cache.errors import StoreError
from customkd_cache.store import (
    FeatureStore,
    SplitInit,
    create_or_open_store,
    list_stores,
    open_store,
    store_dirs,
    store_name,
)
from customkd_cache.store.gc import DAY_S, collect_garbage

REPO = Path(__file__).resolve().parents[1]
N, V, D, UNIT = 6, 2, 4, 4


def _store(root: Path, tag: str = "a", *, dtype: str = "float16", complete: bool = True) -> FeatureStore:
    """A small store ``officehome__t__<fp>.zarr`` under ``root`` (its identity told apart by ``tag``)."""
    identity = {"dataset": {"kind": "officehome", "tag": tag}, "teacher": {"name": "t"}}
    fp = fingerprint(identity)
    store = create_or_open_store(
        root / store_name(dataset="officehome", teacher="t", fingerprint=fp),
        fingerprint=fp,
        identity=identity,
        provenance={"command": ["customkd-cache", "cache", "--spec", "c.toml"]},
        splits={"train": SplitInit(ids=[f"i{k}" for k in range(N)], labels=np.arange(N) % 2)},
        num_views=V,
        feature_dim=D,
        dtype=dtype,
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
        assert store.finalize_split("train")
    return store


def _edit_json(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set_attr(store: Path, key: str, value: Any) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["attributes"][key] = value

    _edit_json(store / "zarr.json", edit)


def _cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    from customkd_cache.cli import main

    monkeypatch.setattr(sys, "argv", ["customkd-cache", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return int(exit_.value.code or 0), out.out, out.err


MALFORMED = [
    ("identity", []),
    ("provenance", "x"),
    ("identity", {"dataset": "x", "teacher": 5}),
    ("num_views", "abc"),
    ("num_views", True),
    ("feature_dim", -3),
    ("dtype", "bogus"),
    ("compressor", 7),
    ("splits", 5),
    ("splits", ["a/b"]),
    ("unit_rows", 0),
    ("fingerprint", "0" * 64),
    ("fingerprint", None),
]


class TestMalformedAttributes:
    @pytest.mark.parametrize(("key", "value"), MALFORMED)
    def test_one_line_naming_the_store_and_attribute(self, tmp_path: Path, key: str, value: Any) -> None:
        path = _store(tmp_path).path
        _set_attr(path, key, value)
        with pytest.raises(StoreError) as err:
            open_store(path)
        message = str(err.value)
        assert str(path) in message and f"'{key}" in message and "\n" not in message

    @pytest.mark.parametrize(("key", "value"), MALFORMED)
    def test_ls_info_verify_on_the_root(
        self,
        tmp_path: Path,
        key: str,
        value: Any,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        good = _store(tmp_path, "good").path
        bad = _store(tmp_path, "bad").path
        _set_attr(bad, key, value)
        entries = {Path(e["path"]): e for e in list_stores(tmp_path)}
        assert entries[good]["complete"] and not entries[good]["damaged"]
        assert (
            entries[bad]["damaged"]
            and not entries[bad]["complete"]
            and key.split(".")[0] in entries[bad]["error"]
        )
        code, out, _ = _cli(monkeypatch, capsys, "ls", str(tmp_path))
        assert code == 0 and f"{bad}  DAMAGED" in out and f"{good}  complete" in out
        for command in ("info", "verify"):
            code, out, err = _cli(monkeypatch, capsys, command, str(bad))
            assert code == 2 and len(err.strip().splitlines()) == 1 and str(bad) in err, (command, err)

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("identity", []),
            ("provenance", "x"),
            ("identity", {"dataset": "x", "teacher": 5}),
            ("unit_rows", 0),
        ],
    )
    def test_train_lookup_skips_it(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: Any
    ) -> None:
        monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path))
        good = make_store(tmp_path)
        other = make_store(tmp_path, "views.seed=3")  # another store of the same teacher
        _set_attr(other, key, value)
        assert find() == good

    def test_a_changed_feature_dim_is_named_before_any_read(self, tmp_path: Path) -> None:
        path = _store(tmp_path).path
        _set_attr(path, "feature_dim", D // 2)
        store = open_store(path)
        with pytest.raises(StoreError, match=r"array 'features' is \(6, 2, 4\).*expected \(N, 2, 2\)"):
            store.read_split("train")
        problems, repairable = store.verify_report()
        assert problems and not repairable

    def test_a_shrunk_array_gives_one_line_in_info(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = _store(tmp_path).path

        def shrink(data: dict[str, Any]) -> None:
            data["shape"][0] = UNIT - 1  # one unit of rows, where done holds two

        _edit_json(path / "train" / "features" / "zarr.json", shrink)
        code, _, err = _cli(monkeypatch, capsys, "info", str(path))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "'done'" in err
        assert not list_stores(tmp_path)[0]["complete"]


class TestIdentity:
    def test_a_forged_fingerprint_is_a_damaged_store(self, tmp_path: Path) -> None:
        path = _store(tmp_path).path
        _set_attr(path, "fingerprint", "0" * 64)
        with pytest.raises(StoreError, match="not the hash of the recorded identity"):
            open_store(path)

    def test_an_edited_identity_is_a_damaged_store(self, tmp_path: Path) -> None:
        path = _store(tmp_path).path
        _set_attr(
            path, "identity", {"dataset": {"kind": "officehome", "tag": "other"}, "teacher": {"name": "t"}}
        )
        with pytest.raises(StoreError, match="'fingerprint'"):
            open_store(path)

    def test_the_directory_name_must_carry_the_fingerprint(self, tmp_path: Path) -> None:
        path = _store(tmp_path).path
        moved = path.with_name("officehome__t__0123456789ab.zarr")
        path.rename(moved)
        with pytest.raises(StoreError, match="directory name ends in 0123456789ab"):
            open_store(moved)
        other = path.with_name("my_copy.zarr")  # a name store_name did not give is not checked
        moved.rename(other)
        assert open_store(other).complete()

    def test_a_copied_key_does_not_make_another_teachers_store_match(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path))
        real = make_store(tmp_path)
        keys = {k: open_store(real).attrs[k] for k in ("request_key", "teacher_key")}
        shutil.rmtree(real)
        other = make_store(tmp_path, "teacher.init_seed=1")  # another teacher init, same name
        for key, value in keys.items():
            _set_attr(other, key, value)
        with pytest.raises(StoreError, match="'request_key'|'teacher_key'"):
            open_store(other)
        with pytest.raises(StoreError, match="no store under"):
            find()

    def test_a_legitimate_stores_keys_are_recomputed_equal(self, tmp_path: Path) -> None:
        store = open_store(make_store(tmp_path, "store.dtype=int8"))
        assert store.attrs["request_key"] and store.attrs["teacher_key"]


class TestPrivateDirectory:
    def test_an_unreadable_entry_is_skipped_with_a_note(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        good = _store(tmp_path).path
        private = tmp_path / "noperm.zarr"
        private.mkdir()
        (private / "zarr.json").write_text("{}")
        real_stat = os.stat

        def stat(path: Any, *args: Any, **kw: Any) -> os.stat_result:
            if str(path).startswith(str(private) + os.sep):  # as for another user's mode-700 directory
                raise PermissionError(13, "Permission denied", str(path))
            return real_stat(path, *args, **kw)

        monkeypatch.setattr(os, "stat", stat)
        assert store_dirs(tmp_path) == [good]
        entries = {Path(e["path"]): e for e in list_stores(tmp_path)}
        assert entries[private]["unreadable"] and "Permission denied" in entries[private]["error"]
        assert entries[good]["complete"]
        code, out, _ = _cli(monkeypatch, capsys, "ls", str(tmp_path))
        assert code == 0 and f"{private}  UNREADABLE" in out and f"{good}  complete" in out
        with pytest.raises(StoreError, match="cannot be read"):
            open_store(private)

    @pytest.mark.skipif(
        shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs setpriv and root to act as nobody"
    )
    def test_as_another_user(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="ckd-shared-"))
        try:
            root.chmod(0o755)
            good = _store(root).path
            for p in [good, *good.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
            private = root / "colleague.zarr"
            private.mkdir(mode=0o700)
            (private / "zarr.json").write_text("{}")
            private.chmod(0o700)
            env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": "/tmp"}
            nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
            probe = subprocess.run(
                [*nobody, sys.executable, "-c", "import customkd_cache"], env=env, check=False
            )
            if probe.returncode != 0:
                pytest.skip("the package is not readable by nobody here")
            res = subprocess.run(
                [*nobody, sys.executable, "-m", "customkd_cache", "ls", str(root)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
            assert res.returncode == 0, res.stderr
            assert f"{private}  UNREADABLE" in res.stdout and f"{good}  complete" in res.stdout
        finally:
            shutil.rmtree(root, ignore_errors=True)


class TestVerifyAdvice:
    def test_the_repair_command_names_the_stores_root(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        elsewhere = tmp_path / "other root"
        elsewhere.mkdir()
        path = _store(elsewhere).path
        chunk = path / "train" / "features" / "c" / "0" / "0" / "0"
        data = bytearray(chunk.read_bytes())
        data[-3] ^= 0xFF
        chunk.write_bytes(bytes(data))
        monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path))
        code, _, err = _cli(monkeypatch, capsys, "verify", str(path))
        assert code == 1 and f"repair with: CUSTOMKD_CACHE_ROOT='{elsewhere}' customkd-cache cache" in err
        assert err.rstrip().endswith("--repair")

    def test_no_repair_command_when_metadata_is_lost(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = _store(tmp_path).path
        (path / "train" / "done" / "zarr.json").write_text('{"zarr_format": 3, "node_')
        code, _, err = _cli(monkeypatch, capsys, "verify", str(path))
        assert code == 1 and "'done'" in err and "--repair" not in err
        assert "remove the store and rebuild it with: CUSTOMKD_CACHE_ROOT=" in err

    def test_a_split_with_unreadable_metadata_is_not_complete(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = _store(tmp_path).path
        (path / "train" / "zarr.json").write_text("{")
        entry = list_stores(tmp_path)[0]
        assert entry["damaged"] and not entry["complete"] and "split 'train'" in entry["error"]
        code, _, err = _cli(monkeypatch, capsys, "info", str(path))
        assert code == 2 and len(err.strip().splitlines()) == 1

    def test_a_root_zarr_json_that_is_a_directory_is_listed_as_damaged(self, tmp_path: Path) -> None:
        path = _store(tmp_path).path
        (path / "zarr.json").unlink()
        (path / "zarr.json").mkdir()
        entry = list_stores(tmp_path)[0]
        assert entry["damaged"] and "not a file" in entry["error"]

    def test_an_impossible_cosine_record_is_damage(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from customkd_cache.store import unit_digest

        store = _store(tmp_path, dtype="int8")
        writer = open_store(store.path, writable=True)
        writer._array("train", "quant_cosine")[0] = np.array([2.0 * UNIT * V, 2.0])  # noqa: SLF001
        data = writer._read_unit_data("train", 0)  # noqa: SLF001 - re-hashed, as a forger would
        writer._array("train", "unit_sha256")[0] = unit_digest(data)  # noqa: SLF001
        problems = open_store(store.path).verify()
        assert len(problems) == 1 and "outside [-1, 1]" in problems[0]
        code, _, err = _cli(monkeypatch, capsys, "info", str(store.path))
        assert code == 2 and "quant_cosine" in err and len(err.strip().splitlines()) == 1

    def test_a_newline_in_the_path_stays_escaped(self, tmp_path: Path) -> None:
        root = tmp_path / "a\nb"
        root.mkdir()
        path = _store(root).path
        _set_attr(path, "num_views", "abc")
        with pytest.raises(StoreError) as err:
            open_store(path)
        assert "\n" not in str(err.value) and "a\\nb" in str(err.value)
        entry = list_stores(root)[0]
        assert "\n" not in entry["error"]
        healthy = _store(root, "b")
        assert "\n" not in healthy.repair_command() and "$'" in healthy.repair_command()

    def test_too_many_threads_are_not_blamed_on_the_store(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = _store(tmp_path).path

        def no_thread(*args: Any, **kw: Any) -> Any:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(zarr, "open_group", no_thread)
        with pytest.raises(StoreError) as err:
            open_store(path)
        assert "run.threads" in str(err.value) and "not a readable" not in str(err.value)


class TestGc:
    def test_a_claims_link_out_of_the_root_is_never_followed(self, tmp_path: Path) -> None:
        root, victim = tmp_path / "root", tmp_path / "victim"
        root.mkdir()
        victim.mkdir()
        (victim / "old.tomb").write_text("x")
        (victim / "sub").mkdir()
        (victim / "sub" / "deep.tomb").mkdir()
        past = time.time() - 30 * DAY_S
        for p in (victim / "old.tomb", victim / "sub" / "deep.tomb"):
            os.utime(p, (past, past))
        store = _store(root, complete=False).path
        (store / ".claims").symlink_to(victim, target_is_directory=True)
        collect_garbage(root, older_than_days=1000)
        assert (victim / "old.tomb").exists() and (victim / "sub" / "deep.tomb").exists()

    @pytest.mark.parametrize("age", ["nan", "inf", "-inf", "-1"])
    def test_ages_that_are_not_numbers_are_refused(
        self, tmp_path: Path, age: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        _store(tmp_path, complete=False)
        with pytest.raises(StoreError, match="finite"):
            collect_garbage(tmp_path, older_than_days=float(age))
        code, _, err = _cli(monkeypatch, capsys, "gc", str(tmp_path), f"--older-than={age}")
        assert code == 2 and "--older-than" in err
        assert len(list_stores(tmp_path)) == 1

    def test_what_cannot_be_removed_is_reported_and_the_run_goes_on(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        stuck = tmp_path / ".a.zarr.tmp-h-1-x"
        free = tmp_path / ".b.zarr.tmp-h-1-y"
        for d in (stuck, free):
            (d / "train").mkdir(parents=True)
            past = time.time() - 2 * DAY_S
            os.utime(d / "train", (past, past))
            os.utime(d, (past, past))
        real_rename = os.rename

        def rename(src: Any, dst: Any) -> None:
            if Path(src) == stuck:  # someone else's directory on a sticky shared root
                raise PermissionError(1, "Operation not permitted", str(src))
            real_rename(src, dst)

        monkeypatch.setattr(os, "rename", rename)
        result = collect_garbage(tmp_path)
        assert [p for p, _ in result.failed] == [stuck] and not free.exists() and stuck.exists()
        code, _, err = _cli(monkeypatch, capsys, "gc", str(tmp_path))
        assert code == 1 and f"could not remove {stuck}" in err

    def test_leftovers_of_a_killed_gc_are_collected(self, tmp_path: Path) -> None:
        left = tmp_path / ".x.zarr.gc-0123abcd"
        (left / "train" / "features").mkdir(parents=True)
        (left / "zarr.json").write_text("{}")
        result = collect_garbage(tmp_path)
        assert not left.exists() and [r.kind for r in result.removed] == ["gc_leftover"]
