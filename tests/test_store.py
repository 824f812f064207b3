"""Feature store contracts: layout, identity, whole-unit writes, resume, statistics, verification."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from customkd_cache import FORMAT_VERSION
from customkd_cache import store as store_module
from customkd_cache.catalog import fingerprint
from customkd_cache.errors import NonFiniteFeatureError, StoreError
from customkd_cache.store import (
    FeatureStore,
    SplitInit,
    create_or_open_store,
    format_units,
    list_stores,
    open_store,
    store_name,
)

IDENTITY = {"dataset": {"kind": "officehome", "manifest": "abc"}, "teacher": {"name": "test_vit"}}
FP = fingerprint(IDENTITY)  # a store's fingerprint is the hash of its identity
OTHER_IDENTITY: dict[str, Any] = {}
OTHER_FP = fingerprint(OTHER_IDENTITY)
N, V, D, UNIT = 10, 2, 6, 4  # 3 units: rows 0-3, 4-7, 8-9


def _splits(n: int = N) -> dict[str, SplitInit]:
    return {
        "train": SplitInit(ids=[f"img/{i:03d}.jpg" for i in range(n)], labels=np.arange(n) % 3),
        "val-a_1": SplitInit(ids=["v0", "v1", "v2"], labels=np.array([2, 0, 1])),
    }


def _create(path: Path, *, fingerprint: str = FP, **kw: Any) -> FeatureStore:
    args: dict[str, Any] = {
        "fingerprint": fingerprint,
        "identity": IDENTITY if fingerprint == FP else OTHER_IDENTITY,
        "provenance": {"host": "here", "versions": {"zarr": zarr.__version__}, "spec": {"run": {"x": 1}}},
        "splits": _splits(),
        "num_views": V,
        "feature_dim": D,
        "dtype": "float16",
        "unit_rows": UNIT,
        "compressor": "zstd",
    }
    args.update(kw)
    return create_or_open_store(path, **args)


def _unit(store: FeatureStore, split: str, unit: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic data for one unit; row i's features start with i so placement is checkable."""
    rows = store.units(split)[unit]
    rng = np.random.default_rng([seed, unit])
    features = rng.normal(size=(len(rows), store.num_views, store.feature_dim)).astype(np.float32)
    features[:, :, 0] = np.asarray(rows, dtype=np.float32)[:, None]
    boxes = rng.random((len(rows), store.num_views, 4)).astype(np.float32)
    flips = rng.random((len(rows), store.num_views)) > 0.5
    return {"features": features, "boxes": boxes, "flips": flips}


def _write_all(store: FeatureStore, order: list[int] | None = None) -> None:
    for split in store.split_names:
        units = range(len(store.units(split)))
        for unit in order if order is not None and split == "train" else units:
            store.write_unit(split, unit, **_unit(store, split, unit))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _chunk(store: FeatureStore, split: str, unit: int) -> Path:
    return store.path / split / "features" / "c" / str(unit) / "0" / "0"


# --- spawned workers (module level so that spawn can import them) -------------------------------


def _create_worker(path: str, barrier: Any) -> None:
    barrier.wait()
    store = _create(Path(path))
    assert store.fingerprint == FP


def _write_worker(path: str, units: list[int], barrier: Any) -> None:
    store = open_store(Path(path), fingerprint=FP, writable=True)
    barrier.wait()
    for unit in units:
        store.write_unit("train", unit, **_unit(store, "train", unit))


def _run_spawned(target: Any, arg_lists: list[tuple[Any, ...]]) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(arg_lists))
    procs = [ctx.Process(target=target, args=(*args, barrier)) for args in arg_lists]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(procs)


# --- contracts ---------------------------------------------------------------------------------


class TestCreateOpen:
    def test_round_trip(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr", extra_attrs={"note": "hi"})
        again = open_store(tmp_path / "s.zarr", fingerprint=FP)
        for s in (store, again):
            assert s.split_names == ("train", "val-a_1")
            assert (s.num_views, s.feature_dim, s.unit_rows, s.fingerprint) == (V, D, UNIT, FP)
            assert s.attrs["note"] == "hi" and s.attrs["format_version"] == FORMAT_VERSION
            assert s.ids("train")[3] == "img/003.jpg"
            np.testing.assert_array_equal(s.labels("val-a_1"), [2, 0, 1])
            assert s.labels("train").dtype == np.int64
            assert s.units("train") == [range(0, 4), range(4, 8), range(8, 10)]
            assert s.num_samples("train") == N and not s.done_units("train").any()

    def test_zarr_reads_it_as_a_v3_group(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr")
        group = zarr.open_group(store.path, mode="r")
        assert group.metadata.zarr_format == 3
        assert group.attrs["fingerprint"] == FP
        features = group["train/features"]
        assert isinstance(features, zarr.Array)
        assert features.shape == (N, V, D) and features.chunks == (UNIT, V, D)
        assert features.dtype == np.float16

    def test_reopen_with_create_keeps_data(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr")
        store.write_unit("train", 1, **_unit(store, "train", 1))
        again = _create(tmp_path / "s.zarr")
        np.testing.assert_array_equal(again.done_units("train"), [False, True, False])

    def test_fingerprint_mismatch_is_refused(self, tmp_path: Path) -> None:
        _create(tmp_path / "s.zarr")
        with pytest.raises(StoreError, match=f"{OTHER_FP}.*s.zarr|s.zarr.*{OTHER_FP}") as err:
            _create(tmp_path / "s.zarr", fingerprint=OTHER_FP)
        assert FP in str(err.value)
        with pytest.raises(StoreError, match=OTHER_FP):
            open_store(tmp_path / "s.zarr", fingerprint=OTHER_FP)

    def test_what_is_not_a_store_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "file.zarr").write_text("x")
        (tmp_path / "dir.zarr").mkdir()
        (tmp_path / "group.zarr").mkdir()
        zarr.create_group(str(tmp_path / "group.zarr"), zarr_format=3)
        for name in ("file.zarr", "dir.zarr", "group.zarr", "missing.zarr"):
            with pytest.raises(StoreError, match=name):
                open_store(tmp_path / name)
        for name in ("file.zarr", "dir.zarr", "group.zarr"):
            with pytest.raises(StoreError, match=name):
                _create(tmp_path / name)

    @pytest.mark.parametrize("name", ["a/b", ".hidden", "", "__x"])
    def test_bad_split_names_are_refused(self, tmp_path: Path, name: str) -> None:
        with pytest.raises(ValueError, match="split name"):
            _create(tmp_path / "s.zarr", splits={name: SplitInit(ids=["a"], labels=np.zeros(1, int))})
        assert not (tmp_path / "s.zarr").exists()

    def test_store_name(self) -> None:
        fp = "3fa9c2e1d4b7" + "0" * 52
        name = store_name(dataset="officehome", teacher="vit_small_patch14_dinov2.lvd142m", fingerprint=fp)
        assert name == "officehome__vit_small_patch14_dinov2.lvd142m__3fa9c2e1d4b7.zarr"
        assert store_name(dataset="my data", teacher="ViT-B-32/laion", fingerprint=fp).startswith(
            "my_data__ViT-B-32_laion__"
        )
        with pytest.raises(ValueError):
            store_name(dataset="d", teacher="t", fingerprint="")

    def test_concurrent_create_gives_one_store(self, tmp_path: Path) -> None:
        path = tmp_path / "s.zarr"
        _run_spawned(_create_worker, [(str(path),), (str(path),)])
        assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # the loser's temp dir is gone
        assert open_store(path, fingerprint=FP).ids("val-a_1") == ("v0", "v1", "v2")

    def test_losing_the_rename_opens_the_winner(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        winner = _create(tmp_path / "s.zarr")
        winner.write_unit("train", 0, **_unit(winner, "train", 0))
        real = os.path.lexists
        calls: list[str] = []

        def first_miss(p: Any) -> bool:  # as if the winner renamed just after our existence check
            calls.append(str(p))
            return len(calls) > 1 and real(p)

        monkeypatch.setattr(os.path, "lexists", first_miss)
        loser = _create(tmp_path / "s.zarr")
        monkeypatch.undo()
        assert len(calls) == 2  # the rename was tried and lost
        assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]
        np.testing.assert_array_equal(loser.done_units("train"), [True, False, False])

    def test_a_build_left_by_a_killed_creator_is_removed(self, tmp_path: Path) -> None:
        dead = multiprocessing.get_context("spawn").Process(target=int)
        dead.start()
        dead.join()
        tag = store_module.create._host_tag()
        left = tmp_path / f".s.zarr.tmp-{tag}-{dead.pid}-0123"
        alive = tmp_path / f".s.zarr.tmp-{tag}-{os.getpid()}-4567"
        other = tmp_path / ".s.zarr.tmp-elsewhere-1-89ab"
        for d in (left, alive, other):
            d.mkdir()
        _create(tmp_path / "s.zarr")
        assert not left.exists() and alive.exists() and other.exists()

    def test_read_only_directory(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr")
        _write_all(store)
        assert store.finalize_split("train") and store.finalize_split("val-a_1")
        before = _snapshot(store.path)
        modes = {p: p.stat().st_mode for p in [store.path, *store.path.rglob("*")]}
        try:
            for p in modes:
                p.chmod(stat.S_IMODE(modes[p]) & ~0o222)
            ro = open_store(store.path, fingerprint=FP)
            np.testing.assert_array_equal(ro.read_split("train"), store.read_split("train"))
            assert ro.complete() and ro.verify() == [] and ro.stats("train")[0].shape == (D,)
            with pytest.raises(StoreError, match="read-only"):
                ro.write_unit("train", 0, **_unit(ro, "train", 0))
        finally:
            for p, mode in modes.items():
                p.chmod(stat.S_IMODE(mode))
        assert _snapshot(store.path) == before


class TestWriteUnits:
    def test_rows_land_at_their_index_whatever_the_order(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr")
        _write_all(store, order=[2, 0, 1])
        features = store.read_split("train")
        assert features.dtype == np.float16 and features.shape == (N, V, D)
        np.testing.assert_array_equal(features[:, :, 0], np.arange(N)[:, None].repeat(V, 1))
        np.testing.assert_array_equal(store.read_unit("train", 2), features[8:10])
        np.testing.assert_array_equal(store.read_rows("train", 3, 9), features[3:9])
        boxes, flips = store.read_boxes("train")
        np.testing.assert_array_equal(boxes[4:8], _unit(store, "train", 1)["boxes"])
        np.testing.assert_array_equal(flips[4:8], _unit(store, "train", 1)["flips"])
        assert flips.dtype == bool and boxes.dtype == np.float32

    def test_resume_skips_done_units_and_gives_the_same_bytes(self, tmp_path: Path) -> None:
        first = _create(tmp_path / "a.zarr")
        first.write_unit("train", 1, **_unit(first, "train", 1))
        resumed = open_store(first.path, fingerprint=FP, writable=True)
        todo = [k for k, done in enumerate(resumed.done_units("train")) if not done]
        assert todo == [0, 2]
        for k in todo:
            resumed.write_unit("train", k, **_unit(resumed, "train", k))
        straight = _create(tmp_path / "b.zarr")
        _write_all(straight)
        for k in range(3):
            assert _chunk(resumed, "train", k).read_bytes() == _chunk(straight, "train", k).read_bytes()

    def test_reads_refuse_units_not_done(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr")
        store.write_unit("train", 0, **_unit(store, "train", 0))
        assert store.read_rows("train", 0, 4).shape == (4, V, D)
        for read in (lambda: store.read_unit("train", 1), lambda: store.read_split("train")):
            with pytest.raises(StoreError, match="not done"):
                read()
        with pytest.raises(StoreError, match="did you mean 'train'"):
            store.read_split("trian")

    def test_wrong_shapes_are_refused_before_writing(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr")
        data = _unit(store, "train", 2)
        with pytest.raises(ValueError, match=r"expected shape \(2, 2, 6\), got \(3, 2, 6\)"):
            store.write_unit("train", 2, **{**data, "features": np.zeros((3, V, D), np.float32)})
        with pytest.raises(ValueError, match="boxes"):
            store.write_unit("train", 2, **{**data, "boxes": np.zeros((2, V, 3), np.float32)})
        with pytest.raises(ValueError, match="unit 3"):
            store.write_unit("train", 3, **data)
        assert not store.done_units("train").any()

    def test_nan_names_the_sample_and_writes_nothing(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr")
        store.write_unit("train", 0, **_unit(store, "train", 0))
        before = _snapshot(store.path)
        for unit in (0, 1):  # a rewrite of a done unit and a fresh unit
            data = _unit(store, "train", unit, seed=1)
            data["features"][2, 1, 3] = np.nan
            with pytest.raises(NonFiniteFeatureError, match=f"'train'.*img/00{4 * unit + 2}.jpg"):
                store.write_unit("train", unit, **data)
        assert _snapshot(store.path) == before
        np.testing.assert_array_equal(store.done_units("train"), [True, False, False])

    def test_float16_overflow_is_refused(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr")
        data = _unit(store, "train", 1)
        data["features"][0, 0, 1] = 1e6
        with pytest.raises(NonFiniteFeatureError, match=r"float16 range.*img/004.jpg.*float32"):
            store.write_unit("train", 1, **data)
        assert not store.done_units("train")[1]
        wide = _create(tmp_path / "f32.zarr", dtype="float32")
        wide.write_unit("train", 1, **data)
        assert wide.read_unit("train", 1)[0, 0, 1] == 1e6

    def test_partial_marker_counts_as_not_done(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr")
        _write_all(store)
        (store.path / "train" / "done" / "c" / "1").write_bytes(b"")
        np.testing.assert_array_equal(store.done_units("train"), [True, False, True])

    def test_two_processes_write_disjoint_units(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr", splits=_splits(n=24))  # 6 units
        _run_spawned(_write_worker, [(str(store.path), [0, 2, 4]), (str(store.path), [1, 3, 5])])
        assert store.done_units("train").all()
        features = store.read_split("train")
        for k, rows in enumerate(store.units("train")):
            expected = _unit(store, "train", k)["features"].astype(np.float16)
            np.testing.assert_array_equal(features[rows.start : rows.stop], expected)


class TestStats:
    def test_finalize_matches_numpy_and_is_order_free(self, tmp_path: Path) -> None:
        a, b = _create(tmp_path / "a.zarr"), _create(tmp_path / "b.zarr")
        _write_all(a, order=[0, 1, 2])
        assert not b.finalize_split("train")
        _write_all(b, order=[2, 1, 0])
        for s in (a, b):
            assert s.finalize_split("train") and s.finalize_split("train")  # idempotent
        stored = a.read_split("train").astype(np.float64).reshape(-1, D)
        mean, std = a.stats("train")
        assert mean.dtype == std.dtype == np.float32
        np.testing.assert_allclose(mean, stored.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(std, stored.std(0), rtol=1e-6, atol=1e-6)
        for name in ("mean", "std"):
            chunk = Path("train") / name / "c" / "0"
            assert (a.path / chunk).read_bytes() == (b.path / chunk).read_bytes()
        total, total_sq, count = a.raw_sums("train")
        assert count == N * V
        np.testing.assert_allclose(total, stored.sum(0), rtol=1e-12)
        np.testing.assert_allclose(total_sq, (stored**2).sum(0), rtol=1e-12)

    def test_stats_before_finalize_are_refused(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr")
        _write_all(store)
        assert not store.split_complete("train")
        with pytest.raises(StoreError, match="no mean/std"):
            store.stats("train")
        assert store.finalize_split("train") and store.split_complete("train")
        assert not store.complete()
        assert store.finalize_split("val-a_1") and store.complete()


class TestComplete:
    def test_format_units(self) -> None:
        assert format_units([9, 3, 7, 8]) == "3, 7-9"
        assert format_units([0]) == "0" and format_units([]) == ""
        assert (
            format_units(list(range(0, 100, 2))) == ", ".join(map(str, range(0, 40, 2))) + ", ... (50 in all)"
        )

    def test_require_complete_names_missing_units_and_the_command(self, tmp_path: Path) -> None:
        command = ["customkd-cache", "cache", "--spec", "/specs/s.toml"]
        store = _create(tmp_path / "s.zarr", provenance={"command": command})
        store.write_unit("train", 1, **_unit(store, "train", 1))
        store.write_unit("val-a_1", 0, **_unit(store, "val-a_1", 0))
        with pytest.raises(StoreError) as err:
            open_store(store.path).require_complete()
        message = str(err.value)
        assert "\n" not in message and str(store.path) in message
        assert "split 'train' units 0, 2 of 3 not done" in message
        assert "split 'val-a_1' has every unit done but no mean/std" in message
        root = f"CUSTOMKD_CACHE_ROOT={tmp_path}"
        assert f"`{root} customkd-cache cache --spec /specs/s.toml`" in message and "--repair" not in message
        _write_all(store)
        assert store.finalize_split("train") and store.finalize_split("val-a_1")
        open_store(store.path).require_complete()

    def test_reads_of_units_not_done_name_them_and_the_command(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr", provenance={"command": ["customkd-cache", "cache"]})
        store.write_unit("train", 1, **_unit(store, "train", 1))
        with pytest.raises(StoreError, match=r"'train' units 0, 2 of 3 not done; .* customkd-cache cache`"):
            store.read_split("train")


class TestVerify:
    def test_healthy_store(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr")
        _write_all(store)
        store.finalize_split("train")
        store.finalize_split("val-a_1")
        assert store.verify() == []

    def test_missing_units_and_stats(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr")
        store.write_unit("train", 1, **_unit(store, "train", 1))
        store.write_unit("val-a_1", 0, **_unit(store, "val-a_1", 0))
        problems = store.verify()
        assert len(problems) == 2
        assert "'train'" in problems[0] and "units 0, 2 of 3 not done" in problems[0]
        assert "'val-a_1'" in problems[1] and "mean/std are missing" in problems[1]

    @pytest.mark.parametrize("compressor", ["zstd", "none"])
    def test_a_flipped_byte_in_a_chunk_file(self, tmp_path: Path, compressor: str) -> None:
        store = _create(tmp_path / "s.zarr", compressor=compressor)
        _write_all(store)
        store.finalize_split("train")
        store.finalize_split("val-a_1")
        chunk = bytearray(_chunk(store, "train", 1).read_bytes())
        chunk[len(chunk) // 2 & ~1] ^= 0x01  # low byte of a float16: a mantissa bit, stays finite
        _chunk(store, "train", 1).write_bytes(bytes(chunk))
        problems = open_store(store.path).verify()
        assert len(problems) == 1 and "'train' unit 1" in problems[0]
        assert ("sha256" if compressor == "none" else "unreadable") in problems[0]


def _complete(path: Path, **kw: Any) -> FeatureStore:
    store = _create(path, **kw)
    _write_all(store)
    assert store.finalize_split("train") and store.finalize_split("val-a_1")
    return store


def _shift(store: FeatureStore, split: str, name: str, rows: range) -> None:
    """Roll one array's values over ``rows`` by one row, as a misplaced write would."""
    arr = zarr.open_array(str(store.path / split / name), mode="r+")
    arr[rows.start : rows.stop] = np.roll(np.asarray(arr[rows.start : rows.stop]), 1, axis=0)


class TestDamage:
    """Every array of a unit is covered by its sha256: verify reports damage, reads refuse it, and
    ``repair`` (what ``cache --repair`` runs) undoes it so a rerun restores the bytes."""

    @pytest.mark.parametrize("name", ["features", "boxes", "flips", "ids", "labels"])
    def test_a_shifted_array_is_reported_and_refused(self, tmp_path: Path, name: str) -> None:
        store = _complete(tmp_path / "s.zarr")
        unit = store.units("train")[1]
        _shift(store, "train", name, unit)
        problems = open_store(store.path).verify()
        assert len(problems) == 1 and "'train' unit 1" in problems[0] and "sha256" in problems[0]
        with pytest.raises(StoreError, match=r"unit 1 .*damaged.*--repair"):
            open_store(store.path).read_boxes("train")
        with pytest.raises(StoreError, match="unit 1"):
            open_store(store.path).read_split("train")

    @pytest.mark.parametrize("compressor", ["zstd", "none"])
    def test_a_deleted_chunk_is_refused_not_read_as_zeros(self, tmp_path: Path, compressor: str) -> None:
        store = _complete(tmp_path / "s.zarr", compressor=compressor)
        _chunk(store, "train", 1).unlink()
        reader = open_store(store.path)
        reader.read_unit("train", 0)  # the other units stay readable
        for read in (lambda: reader.read_unit("train", 1), lambda: reader.read_rows("train", 2, 6)):
            with pytest.raises(StoreError, match=r"split 'train' unit 1 \(rows 4-7\) is damaged"):
                read()
        assert "'train' unit 1" in reader.verify()[0]

    def test_a_corrupt_zstd_chunk_is_one_line(self, tmp_path: Path) -> None:
        store = _complete(tmp_path / "s.zarr")
        data = bytearray(_chunk(store, "train", 1).read_bytes())
        data[len(data) // 2] ^= 0xFF
        _chunk(store, "train", 1).write_bytes(bytes(data))
        with pytest.raises(StoreError) as err:
            open_store(store.path).read_split("train")
        assert "unit 1" in str(err.value) and "unreadable" in str(err.value) and "\n" not in str(err.value)

    def test_an_array_added_to_the_layout_is_hashed_too(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr")
        units = len(store.units("train"))
        extra = zarr.open_group(str(store.path / "train"), mode="r+").create_array(
            "unit_scale", shape=(units, D), chunks=(1, D), dtype="float32", fill_value=1
        )
        store = open_store(store.path, writable=True)
        assert store.unit_array_names("train")["unit_scale"] == "unit"
        _write_all(store)
        assert store.finalize_split("train") and store.finalize_split("val-a_1")
        assert open_store(store.path).verify() == []
        extra[1] = np.full(D, 2, np.float32)
        problems = open_store(store.path).verify()
        assert len(problems) == 1 and "unit_scale" in problems[0] and "unit 1" in problems[0]

    def test_stats_that_disagree_with_the_unit_sums(self, tmp_path: Path) -> None:
        store = _complete(tmp_path / "s.zarr")
        zarr.open_array(str(store.path / "train" / "mean"), mode="r+")[0] = 123
        assert open_store(store.path).verify() == ["split 'train': mean/std disagree with the unit sums"]

    def test_repair_then_rewrite_restores_the_bytes(self, tmp_path: Path) -> None:
        store = _complete(tmp_path / "s.zarr", compressor="none")
        before = _snapshot(store.path)
        _chunk(store, "train", 0).unlink()
        _shift(store, "train", "labels", store.units("train")[2])
        zarr.open_array(str(store.path / "val-a_1" / "std"), mode="r+")[0] = 7
        writer = open_store(store.path, writable=True)
        all_units = [(s, u) for s in writer.split_names for u in range(writer.num_units(s))]
        repaired = writer.repair(_splits(), all_units)
        assert len(repaired) == 3, repaired  # labels rewritten, unit 0 cleared, val stats cleared
        np.testing.assert_array_equal(writer.done_units("train"), [False, True, True])
        writer.write_unit("train", 0, **_unit(writer, "train", 0))
        assert writer.finalize_split("train") and writer.finalize_split("val-a_1")
        assert writer.verify() == [] and _snapshot(store.path) == before

    @pytest.mark.parametrize("damage", ["deleted", "zeroed", "garbage"])
    def test_a_lost_done_marker_is_recomputed_and_its_stats_rewritten(
        self, tmp_path: Path, damage: str
    ) -> None:
        store = _complete(tmp_path / "s.zarr", compressor="none")
        before = _snapshot(store.path)
        marker = store.path / "train" / "done" / "c" / "1"
        {
            "deleted": marker.unlink,
            "zeroed": lambda: marker.write_bytes(b"\0"),
            "garbage": lambda: marker.write_bytes(b"\xfe\x01"),
        }[damage]()
        writer = open_store(store.path, writable=True)
        all_units = [(s, u) for s in writer.split_names for u in range(writer.num_units(s))]
        repaired = writer.repair(_splits(), all_units)  # raised StoreError: the stats check read sums
        assert any("units 1 of 3 not done" in line for line in repaired), repaired
        assert any("mean/std marked written while units are not done" in line for line in repaired)
        assert not writer.split_complete("train")
        writer.write_unit("train", 1, **_unit(writer, "train", 1))
        assert writer.finalize_split("train")
        assert writer.verify() == [] and _snapshot(store.path) == before

    def test_rewriting_a_unit_after_a_lost_marker_recomputes_the_stats(self, tmp_path: Path) -> None:
        store = _complete(tmp_path / "s.zarr")
        (store.path / "train" / "done" / "c" / "1").unlink()
        writer = open_store(store.path, writable=True)
        writer.write_unit("train", 1, **_unit(writer, "train", 1, seed=7))  # other data than before
        assert writer.finalize_split("train")
        assert writer.verify() == []  # mean/std come from the sums of the units as they are now

    def test_the_repair_command_comes_from_the_provenance(self, tmp_path: Path) -> None:
        command = ["customkd-cache", "cache", "--spec", "/specs/my spec.toml", "--set", "dataset.root=/d"]
        store = _create(tmp_path / "s.zarr", provenance={"command": command})
        assert store.repair_command() == (
            f"CUSTOMKD_CACHE_ROOT={tmp_path} "
            "customkd-cache cache --spec '/specs/my spec.toml' --set dataset.root=/d --repair"
        )
        assert "SPEC" in _create(tmp_path / "t.zarr").repair_command()
        assert (
            store.finish_command() == f"CUSTOMKD_CACHE_ROOT={tmp_path} "
            "customkd-cache cache --spec '/specs/my spec.toml' --set dataset.root=/d"
        )

    def test_a_corrupt_array_zarr_json_is_reported(self, tmp_path: Path) -> None:
        store = _complete(tmp_path / "s.zarr")
        (store.path / "train" / "boxes" / "zarr.json").write_text("{not json")
        reader = open_store(store.path)
        assert any("'boxes'" in p and "unreadable" in p for p in reader.verify())
        with pytest.raises(StoreError, match="damaged"):
            reader.read_boxes("train")

    def test_disk_full_is_a_store_error_and_leaves_the_unit_not_done(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store = _create(tmp_path / "s.zarr")
        real = zarr.Array.__setitem__

        def full(self: zarr.Array, key: Any, value: Any) -> None:
            if self.path in ("train/boxes", "val-a_1/mean"):
                raise OSError(28, "No space left on device")
            real(self, key, value)

        monkeypatch.setattr(zarr.Array, "__setitem__", full)
        with pytest.raises(StoreError, match="No space left on device"):
            store.write_unit("train", 0, **_unit(store, "train", 0))
        assert not store.unit_done("train", 0)
        for unit in range(len(store.units("val-a_1"))):
            store.write_unit("val-a_1", unit, **_unit(store, "val-a_1", unit))
        with pytest.raises(StoreError, match="statistics of split 'val-a_1'.*No space"):
            store.finalize_split("val-a_1")


class TestListAndInfo:
    def test_list_stores(self, tmp_path: Path) -> None:
        full = _create(tmp_path / store_name(dataset="officehome", teacher="test_vit", fingerprint=FP))
        _write_all(full)
        full.finalize_split("train")
        full.finalize_split("val-a_1")
        _create(tmp_path / "other.zarr", fingerprint=OTHER_FP, identity={})
        (tmp_path / ".x.zarr.tmp-123").mkdir()
        (tmp_path / "junk.zarr").mkdir()
        (tmp_path / "notes.txt").write_text("x")
        entries = list_stores(tmp_path)
        assert [Path(e["path"]).name for e in entries] == [full.path.name, "other.zarr"]
        first = entries[0]
        assert (first["dataset"], first["teacher"], first["fingerprint"]) == ("officehome", "test_vit", FP)
        assert first["complete"] and not entries[1]["complete"]
        assert first["splits"] == ["train", "val-a_1"] and first["size_bytes"] > N * V * D * 2 * 0.5
        json.dumps(entries)
        with pytest.raises(StoreError):
            list_stores(tmp_path / "missing")

    def test_info(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr")
        store.write_unit("train", 0, **_unit(store, "train", 0))
        info = json.loads(json.dumps(store.info()))
        assert info["num_samples"] == {"total": N + 3, "train": N, "val-a_1": 3}
        assert info["splits"]["train"] == {
            "num_samples": N,
            "num_units": 3,
            "units_done": 1,
            "complete": False,
        }
        assert info["teacher"] == {"name": "test_vit", "feature_dim": D}
        assert info["dataset"]["kind"] == "officehome"
        assert (info["num_views"], info["fingerprint"], info["dtype"], info["complete"]) == (
            V,
            FP,
            "float16",
            False,
        )
        assert info["provenance"] == {"host": "here", "versions": {"zarr": zarr.__version__}}
        assert info["size_bytes"] == store.size_bytes() > 0
        assert info["path"] == str(store.path)


def test_claim_dir_lives_in_the_store(tmp_path: Path) -> None:
    store = _create(tmp_path / "s.zarr")
    assert store.claim_dir("train") == store.path / ".claims" / "train"
    os.makedirs(store.claim_dir("train"))
    assert open_store(store.path).split_names == ("train", "val-a_1")
