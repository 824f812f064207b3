"""int8 stores: the decode error bound, deterministic bytes, verify, info, and both stages end to end.

An int8 store keeps per-unit, per-dimension affine codes (``store.quantize_unit``): every decoded value
is within half a quantization step of the teacher's float32 feature, the parameters depend on the
unit's features alone (a resumed or killed-and-rerun cache gives the clean run's bytes), and stage two
reads the decoded float32 features through the same ``FeatureSource`` as a float16 store.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from test_stage_one import (
    SMOKE,
    chunk_bytes,
    cli,
    done_units,
    env_for,
    kill_after_units,
    only_store,
    popen,
    smoke_args,
)
from test_store import _create, _snapshot, _unit, _write_all

from customkd_cache.catalog import fingerprint
from customkd_cache.stage_two.replay import FeatureSource
from customkd_cache.store import create_or_open_store, dequantize, open_store, quantize_unit
from customkd_cache.testing import fakedata

TRAIN_SPEC = Path(__file__).resolve().parents[1] / "pipelines" / "smoke" / "officehome.toml"
EPS32 = float(np.finfo(np.float32).eps)
STORED = ("features", "quant_scale", "quant_offset", "quant_cosine", "unit_sum", "unit_sumsq", "unit_sha256")


def _decode_error_bound(x: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Half a step, plus float32 rounding of the parameters and of ``codes * scale + offset``."""
    magnitude = np.abs(x).max(axis=(0, 1)) + np.abs(offset) + 128 * scale
    return 0.5 * scale + 4 * EPS32 * magnitude


class TestQuantizeUnit:
    @pytest.mark.parametrize("shift", [0.0, 1e3])
    def test_decode_is_within_half_a_step(self, shift: float) -> None:
        rng = np.random.default_rng(0)
        x = (rng.standard_t(3, size=(37, 3, 20)) * rng.uniform(0.01, 10, 20) + shift).astype(np.float32)
        x[:, :, 5] = 0.25  # a constant dimension decodes exactly
        codes, scale, offset = quantize_unit(x)
        assert codes.dtype == np.int8 and codes.shape == x.shape
        assert scale.dtype == offset.dtype == np.float32 and scale.shape == (20,)
        decoded = dequantize(codes, scale, offset)
        assert decoded.dtype == np.float32
        assert (np.abs(decoded - x) <= _decode_error_bound(x, scale, offset)).all()
        assert scale[5] == 0 and (decoded[:, :, 5] == 0.25).all()
        flat = codes.reshape(-1, 20)
        others = np.delete(np.arange(20), 5)
        # each dimension's extremes use the whole code range
        assert (flat.min(0)[others] == -128).all() and (flat.max(0)[others] == 127).all()

    def test_parameters_depend_on_the_unit_alone(self) -> None:
        x = np.random.default_rng(1).normal(size=(16, 2, 8)).astype(np.float32)
        a, b = quantize_unit(x), quantize_unit(x.copy(order="F").astype(np.float64))
        for u, v in zip(a, b, strict=True):
            assert u.tobytes() == v.tobytes()


# --- the store ---------------------------------------------------------------------------------


class TestInt8Store:
    def test_reads_decode_within_the_bound(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr", dtype="int8")
        _write_all(store)
        assert store.finalize_split("train") and store.finalize_split("val-a_1")
        assert store.verify() == []
        got = store.read_split("train")
        assert got.dtype == np.float32 and got.shape == (10, 2, 6)
        np.testing.assert_array_equal(store.read_rows("train", 3, 9), got[3:9])
        scale, offset = store.quant_params("train")
        assert scale.shape == offset.shape == (3, 6)
        for unit, rows in enumerate(store.units("train")):
            x = _unit(store, "train", unit)["features"]
            bound = _decode_error_bound(x, scale[unit], offset[unit])
            assert (np.abs(got[rows.start : rows.stop] - x) <= bound).all()
            assert store.read_codes("train", rows.start, rows.stop).dtype == np.int8
        # statistics are over the decoded values
        mean, std = store.stats("train")
        np.testing.assert_allclose(mean, got.reshape(-1, 6).mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(std, got.reshape(-1, 6).std(0), rtol=1e-5, atol=1e-6)

    def test_ram_and_streaming_decode_alike(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr", dtype="int8")
        _write_all(store)
        store.finalize_split("train")
        stats = store.stats("train")
        rows, views = np.array([9, 0, 5, 4, 4, 1]), np.array([1, 0, 1, 0, 1, 1])
        ram = FeatureSource(store.path, in_ram=True, standardize=stats)
        streamed = FeatureSource(store.path, in_ram=False, standardize=stats, cache_units=1)
        np.testing.assert_array_equal(
            ram.get_many("train", rows, views), streamed.get_many("train", rows, views)
        )
        np.testing.assert_array_equal(ram.all_views("train", rows), streamed.all_views("train", rows))
        expected = (store.read_split("train")[rows, views] - stats[0]) / stats[1]
        np.testing.assert_allclose(ram.get_many("train", rows, views), expected, rtol=1e-5, atol=1e-5)

    def test_resume_gives_the_same_bytes(self, tmp_path: Path) -> None:
        first = _create(tmp_path / "a.zarr", dtype="int8")
        first.write_unit("train", 1, **_unit(first, "train", 1))
        resumed = open_store(first.path, writable=True)
        for split in resumed.split_names:
            for k in np.flatnonzero(~resumed.done_units(split)).tolist():
                resumed.write_unit(split, k, **_unit(resumed, split, k))
        straight = _create(tmp_path / "b.zarr", dtype="int8")
        _write_all(straight)
        a, b = _snapshot(first.path), _snapshot(straight.path)
        assert {k: v for k, v in a.items() if "/c/" in k} == {k: v for k, v in b.items() if "/c/" in k}

    def test_verify_catches_a_damaged_scale(self, tmp_path: Path) -> None:
        store = _create(tmp_path / "s.zarr", dtype="int8")
        _write_all(store)
        store.finalize_split("train")
        store.finalize_split("val-a_1")
        chunk = store.path / "train" / "quant_scale" / "c" / "1" / "0"
        data = bytearray(chunk.read_bytes())
        data[1] ^= 0x01  # a low mantissa bit: the scale stays finite
        chunk.write_bytes(bytes(data))
        problems = open_store(store.path).verify()
        assert len(problems) == 1 and "'train' unit 1" in problems[0] and "quant_scale" in problems[0]

    def test_info_reports_bytes_and_cosine(self, tmp_path: Path) -> None:
        n, v, d, unit_rows = 64, 2, 32, 32
        store = create_or_open_store(
            tmp_path / "s.zarr",
            fingerprint=fingerprint({}),
            identity={},
            provenance={},
            splits={"train": _init(n)},
            num_views=v,
            feature_dim=d,
            dtype="int8",
            unit_rows=unit_rows,
            compressor="none",
        )
        assert store.info()["bytes_per_view"] is None and store.info()["cosine_to_float32"] is None
        rng = np.random.default_rng(3)
        written = []
        for unit in range(2):
            x = np.abs(rng.normal(size=(unit_rows, v, d))).astype(np.float32)
            written.append(x)
            store.write_unit(
                "train", unit, features=x, boxes=np.zeros((unit_rows, v, 4)), flips=np.zeros((unit_rows, v))
            )
        info = json.loads(json.dumps(store.info()))
        assert info["dtype"] == "int8"
        # uncompressed: one byte per code plus two float32 parameters per unit and dimension
        assert info["bytes_per_view"] == pytest.approx(d + 2 * 4 * d * 2 / (n * v))
        x = np.concatenate(written).reshape(-1, d).astype(np.float64)
        y = store.read_split("train").reshape(-1, d).astype(np.float64)
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert info["cosine_to_float32"]["mean"] == pytest.approx(cos.mean(), abs=1e-12)
        assert info["cosine_to_float32"]["min"] == pytest.approx(cos.min(), abs=1e-12)
        assert 0.99 < info["cosine_to_float32"]["min"] <= info["cosine_to_float32"]["mean"] <= 1.0


def _init(n: int) -> Any:
    from customkd_cache.store import SplitInit

    return SplitInit(ids=[str(i) for i in range(n)], labels=np.zeros(n, np.int64))


# --- both stages, through the CLI ----------------------------------------------------------------


@pytest.fixture(scope="module")
def oh_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fakedata.write_officehome(tmp_path_factory.mktemp("oh8") / "OfficeHome")


@pytest.fixture(scope="module")
def int8_cache(oh_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke cache (64-row units) as int8, one uninterrupted run."""
    root = tmp_path_factory.mktemp("int8")
    cli(
        "cache",
        "--spec",
        str(SMOKE),
        "--set",
        f"dataset.root={oh_root}",
        "--set",
        "store.dtype=int8",
        "-q",
        env=env_for(root),
    )
    return only_store(root)


def test_int8_smoke_cache_is_complete_verified_and_compact(int8_cache: Path) -> None:
    env = env_for(int8_cache.parent)
    info = json.loads(cli("info", "--json", str(int8_cache), env=env).stdout)
    assert info["complete"] is True and info["dtype"] == "int8"
    assert info["bytes_per_view"] <= 0.55 * 2 * info["feature_dim"]
    assert 0.99 < info["cosine_to_float32"]["min"] <= info["cosine_to_float32"]["mean"] <= 1.0
    assert cli("verify", str(int8_cache), env=env).returncode == 0
    assert zarr.open_group(int8_cache, mode="r")["Art"]["features"].dtype == np.int8


def test_fingerprint_includes_the_dtype(oh_root: Path) -> None:
    from customkd_cache.catalog import cache_identity, fingerprint
    from customkd_cache.specs import load_cache_spec

    def fp(dtype: str) -> str:
        spec = load_cache_spec(SMOKE, [f"dataset.root={oh_root}", f"store.dtype={dtype}"])
        return fingerprint(cache_identity(spec=spec, dataset={"kind": "x"}, teacher={"name": "t"}))

    assert len({fp("float16"), fp("int8"), fp("float32")}) == 3


@pytest.mark.parametrize(
    "method", ["student_only", "kd", "fitnet", "dkd", "customkd", "customkd+kd", "customkd+dkd"]
)
def test_train_runs_every_method_from_int8(
    int8_cache: Path, oh_root: Path, method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from customkd_cache.specs import load_train_spec
    from customkd_cache.stage_two.train import run_train

    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(int8_cache.parent))
    sets = [f"dataset.root={oh_root}", f"cache.store={int8_cache}", f"method={method}", "optim.epochs=1"]
    res = run_train(load_train_spec(TRAIN_SPEC, sets), spec_path=TRAIN_SPEC, out=tmp_path / "run")
    assert res["method"] == method and res["student_accuracy"] is not None
    assert res["cache_fingerprint"] == open_store(int8_cache).fingerprint


def test_train_finds_the_int8_store_from_the_cache_spec(
    int8_cache: Path, oh_root: Path, tmp_path: Path
) -> None:
    """The train spec names the cache spec (float16) and no cache.store: the int8 store made from it with
    ``--set store.dtype=int8`` holds the same features, so ``train`` finds and reads it."""
    out = tmp_path / "run"
    sets = ["--set", f"dataset.root={oh_root}", "--set", "optim.epochs=1"]
    proc = cli("train", "--spec", str(TRAIN_SPEC), *sets, "--out", str(out), env=env_for(int8_cache.parent))
    assert proc.returncode == 0
    assert list(json.loads((out / "caches.json").read_text())) == [str(int8_cache)]
    results = json.loads((out / "results.json").read_text())
    assert results["cache_fingerprint"] == open_store(int8_cache).fingerprint


def test_sigkill_then_rerun_gives_the_clean_bytes(oh_root: Path, tmp_path: Path) -> None:
    args = [*smoke_args(oh_root), "--set", "store.dtype=int8"]
    clean_root, killed_root = tmp_path / "clean", tmp_path / "killed"
    cli(*args, env=env_for(clean_root))
    rng, kills = random.Random(8), 0
    for _ in range(2):  # each run finishes a few more of the 20 units before it is killed
        proc = popen(*args, env=env_for(killed_root))
        kills += kill_after_units(proc, killed_root, done_units(killed_root) + rng.randint(1, 6))
    cli(*args, env=env_for(killed_root))
    clean, killed = only_store(clean_root), only_store(killed_root)
    assert kills >= 1
    assert chunk_bytes(clean) == chunk_bytes(killed)
    a, b = zarr.open_group(clean, mode="r"), zarr.open_group(killed, mode="r")
    for split in a.attrs["splits"]:
        for name in STORED:
            assert np.asarray(a[split][name][...]).tobytes() == np.asarray(b[split][name][...]).tobytes()
