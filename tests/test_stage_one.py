"""Stage one (`customkd-cache cache`) contracts, through the real CLI in subprocesses.

Nothing is lost: a SIGKILL at any moment followed by a rerun gives the arrays of an uninterrupted
run; two runs of one spec started together both finish with one complete, identical store; shards
(``--shard I/N`` and ``torchrun`` ranks) split whole units between processes.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from customkd_cache.store import CLAIMS_DIR, FIDELITY_ATTR, FIDELITY_MIN_ATTR, open_store
from customkd_cache.testing import fakedata

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "cache_specs" / "smoke" / "officehome.toml"
ARRAYS = (
    "features",
    "boxes",
    "flips",
    "ids",
    "labels",
    "unit_sum",
    "unit_sumsq",
    "unit_sha256",
    "mean",
    "std",
)


def cli(
    *args: str, env: dict[str, str], check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "customkd_cache", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def popen(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "customkd_cache", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def done_units(cache_root: Path) -> int:
    """Finished units (their done markers) in every store under ``cache_root``."""
    return sum(1 for _ in cache_root.glob("*.zarr/*/done/c/*"))


def kill_after_units(proc: subprocess.Popen[str], cache_root: Path, units: int) -> bool:
    """SIGKILL ``proc`` as soon as ``units`` units are finished (it is then inside the next one).

    Progress, not a clock, picks the moment, so the kill lands in the work on a fast or a slow
    machine alike. False when the process ended before that many units were done.
    """
    while proc.poll() is None:
        if done_units(cache_root) >= units:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            return True
        time.sleep(0.005)
    proc.communicate()
    return False


@pytest.fixture(scope="module")
def oh_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OfficeHome layout, 65 classes x 1 image x 4 domains (260 images)."""
    return fakedata.write_officehome(tmp_path_factory.mktemp("oh") / "OfficeHome")


def env_for(cache_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CUSTOMKD_CACHE_ROOT=str(cache_root), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def smoke_args(root: Path, *extra: str) -> list[str]:
    # 16-row units: many units, so kills land between and inside them
    return [
        "cache",
        "--spec",
        str(SMOKE),
        "--set",
        f"dataset.root={root}",
        "--set",
        "store.unit_rows=16",
        "-q",
        *extra,
    ]


def only_store(cache_root: Path) -> Path:
    stores = [p for p in cache_root.iterdir() if p.suffix == ".zarr" and not p.name.startswith(".")]
    assert len(stores) == 1, stores
    return stores[0]


def arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(store, mode="r")
    out = {}
    for split in group.attrs["splits"]:
        for name in ARRAYS:
            out[f"{split}/{name}"] = np.asarray(group[split][name][...])
    return out


def assert_same_arrays(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].dtype == y[key].dtype, key
        assert np.array_equal(x[key], y[key]), key


def chunk_bytes(store: Path) -> dict[str, bytes]:
    """Every chunk file of the feature arrays, by relative path."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and "/c/" in str(p) and "/features/" in str(p)
    }


@pytest.fixture(scope="module")
def reference(oh_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run."""
    root = tmp_path_factory.mktemp("ref")
    cli(*smoke_args(oh_root), env=env_for(root))
    return only_store(root)


class TestStore:
    def test_complete_v3_group_with_info_and_ls(self, reference: Path) -> None:
        group = zarr.open_group(reference, mode="r")
        assert group.metadata.zarr_format == 3
        env = env_for(reference.parent)
        info = json.loads(cli("info", "--json", str(reference), env=env).stdout)
        assert info["complete"] is True
        assert info["num_samples"]["total"] == 260 and info["num_samples"]["Art"] == 65
        assert info["num_views"] == 3
        assert info["teacher"]["name"] == "test_vit" and info["teacher"]["source"] == "timm"
        assert info["teacher"]["feature_dim"] == 64 and len(info["teacher"]["weights_digest"]) == 64
        assert (
            info["fingerprint"] in reference.name
            or reference.name.split("__")[-1][:-5] in info["fingerprint"]
        )
        listed = json.loads(cli("ls", "--json", str(reference.parent), env=env).stdout)
        assert [e["path"] for e in listed] == [str(reference)] and listed[0]["complete"] is True
        assert cli("verify", str(reference), env=env).returncode == 0
        features = group["Art"]["features"]
        assert features.shape == (65, 3, 64) and features.dtype == np.float16

    def test_rerun_is_a_no_op(self, reference: Path, oh_root: Path) -> None:
        before = chunk_bytes(reference)
        out = cli(*smoke_args(oh_root), env=env_for(reference.parent)).stdout
        assert "computed 0 units" in out
        assert chunk_bytes(reference) == before

    def test_verify_names_damage(self, reference: Path, tmp_path: Path) -> None:
        copy = tmp_path / reference.name
        shutil.copytree(reference, copy)
        chunk = next(
            p for p in sorted((copy / "Art" / "features").rglob("*")) if p.is_file() and p.name != "zarr.json"
        )
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
        proc = cli("verify", str(copy), env=env_for(tmp_path), check=False)
        assert proc.returncode == 1
        assert "Art" in proc.stderr

    def test_the_repair_that_verify_prints_restores_the_store(self, reference: Path, tmp_path: Path) -> None:
        copy = tmp_path / reference.name
        shutil.copytree(reference, copy)
        (copy / "Art" / "features" / "c" / "1" / "0" / "0").unlink()  # a lost chunk
        labels = zarr.open_array(str(copy / "Clipart" / "labels"), mode="r+")
        labels[0:16] = np.roll(np.asarray(labels[0:16]), 1)  # shifted labels
        proc = cli("verify", str(copy), env=env_for(tmp_path), check=False)
        assert proc.returncode == 1
        assert "'Art' unit 1" in proc.stderr and "'Clipart' unit 0" in proc.stderr
        repair = proc.stderr.strip().splitlines()[-1].split("repair with: ", 1)[1]
        root, program, *args = shlex.split(repair)
        assert root == f"CUSTOMKD_CACHE_ROOT={copy.parent}"  # it acts on this store, wherever it is
        assert program == "customkd-cache" and args[-1] == "--repair"
        cli(*args, env=env_for(tmp_path) | {"CUSTOMKD_CACHE_ROOT": str(copy.parent)})
        assert cli("verify", str(copy), env=env_for(tmp_path)).stdout.strip().endswith("ok")
        assert_same_arrays(copy, reference)
        assert chunk_bytes(copy) == chunk_bytes(reference)


class TestNothingLost:
    def test_sigkill_then_rerun_gives_identical_bytes(
        self, oh_root: Path, reference: Path, tmp_path: Path
    ) -> None:
        env = env_for(tmp_path)
        rng = random.Random(1234)
        kills = 0
        for _ in range(3):  # each run finishes a few more of the 20 units before it is killed
            proc = popen(*smoke_args(oh_root), env=env)
            kills += kill_after_units(proc, tmp_path, done_units(tmp_path) + rng.randint(1, 4))
        cli(*smoke_args(oh_root), env=env)
        store = only_store(tmp_path)
        assert kills >= 1
        assert_same_arrays(store, reference)
        assert chunk_bytes(store) == chunk_bytes(reference)

    def test_two_runs_started_together_share_the_work(
        self, oh_root: Path, reference: Path, tmp_path: Path
    ) -> None:
        env = env_for(tmp_path)
        procs = [popen(*smoke_args(oh_root), env=env) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        computed = [int(o[0].split("computed ")[1].split(" units")[0]) for o in outs]
        total_units = 4 * 5  # 65 rows per split in 16-row units
        assert sum(computed) <= total_units + 2, computed  # at most one unit in flight per process twice
        assert sum(computed) >= total_units
        assert_same_arrays(only_store(tmp_path), reference)


class TestWriterThread:
    """Finished units are written by a background thread: the same bytes as writing them inline, and
    its errors are the main thread's one-line errors."""

    def test_inline_writes_give_the_threaded_bytes(
        self, oh_root: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from customkd_cache.specs import load_cache_spec
        from customkd_cache.stage_one.extract import Shard, run_cache

        monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path))
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        spec = load_cache_spec(SMOKE, [f"dataset.root={oh_root}", "store.unit_rows=16"])
        res = run_cache(spec, spec_path=SMOKE, shard=Shard(), progress=False, writer_thread=False)
        assert res.units_computed == 4 * 5 and res.complete
        assert_same_arrays(res.path, reference)
        assert chunk_bytes(res.path) == chunk_bytes(reference)

    def test_a_full_disk_in_the_writer_is_one_line_and_the_rerun_finishes(
        self,
        oh_root: Path,
        reference: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        import threading

        from customkd_cache.cli import main
        from customkd_cache.store import writer

        calls: list[str] = []
        real = writer.unit_digest

        def full_disk(data: dict[str, np.ndarray]) -> np.ndarray:
            calls.append(threading.current_thread().name)
            if len(calls) == 3:  # the third unit: two are written and done
                raise OSError(28, "No space left on device")
            return real(data)

        monkeypatch.setattr(writer, "unit_digest", full_disk)
        monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path))
        monkeypatch.setattr(sys, "argv", ["customkd-cache", *smoke_args(oh_root)])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2
        assert len(err) == 1 and "No space left on device" in err[0] and "is not marked done" in err[0], err
        assert set(calls) == {"customkd-unit-writer"}  # written off the main thread
        store = open_store(only_store(tmp_path))
        assert sum(int(store.done_units(s).sum()) for s in store.split_names) == 2
        assert not list((store.path / CLAIMS_DIR).rglob("unit-*"))  # every claim released
        monkeypatch.setattr(writer, "unit_digest", real)
        cli(*smoke_args(oh_root), env=env_for(tmp_path))
        assert chunk_bytes(only_store(tmp_path)) == chunk_bytes(reference)


def test_writer_errors_never_block_a_submit() -> None:
    """A writer that failed keeps taking units (dropping them), so a full queue cannot hang the
    caller; the error is raised once, in the caller's thread."""
    from customkd_cache.errors import StoreError
    from customkd_cache.stage_one.extract import WRITE_QUEUE, _Job, _UnitWriter

    class Failing:
        def __init__(self) -> None:
            self.calls = 0

        def write_unit(self, split: str, unit: int, **arrays: np.ndarray) -> None:
            self.calls += 1
            time.sleep(0.05)
            raise StoreError("store: cannot write split 'a' unit 0 (No space left on device)")

    store, released = Failing(), []
    w = _UnitWriter(store, released.append)  # type: ignore[arg-type]
    job = _Job("a", 0, np.zeros((1, 1, 1)), np.zeros((1, 1, 4)), np.zeros((1, 1)))
    t0 = time.perf_counter()
    with pytest.raises(StoreError, match="No space left"):
        for _ in range(4 * WRITE_QUEUE + 4):
            w.submit(job)
    w.abort()
    w.close()  # raised once: nothing more
    assert store.calls == 1 and released == [] and w.written == 0
    assert time.perf_counter() - t0 < 10


class TestShards:
    def test_shard_jobs_fill_one_store(self, oh_root: Path, reference: Path, tmp_path: Path) -> None:
        env = env_for(tmp_path)
        first = cli(*smoke_args(oh_root, "--shard", "0/2"), env=env).stdout
        assert "partial" in first
        second = cli(*smoke_args(oh_root, "--shard", "1/2"), env=env).stdout
        assert "complete" in second
        assert_same_arrays(only_store(tmp_path), reference)

    def test_torchrun_ranks_split_units(self, oh_root: Path, reference: Path, tmp_path: Path) -> None:
        torchrun = Path(sys.executable).parent / "torchrun"
        if not torchrun.exists():
            pytest.skip("torchrun not installed beside this python")
        env = env_for(tmp_path)
        proc = subprocess.run(
            [
                str(torchrun),
                "--standalone",
                "--nproc-per-node=2",
                "-m",
                "customkd_cache",
                *smoke_args(oh_root),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert_same_arrays(only_store(tmp_path), reference)

    def test_bad_shard_is_a_usage_error(self, oh_root: Path, tmp_path: Path) -> None:
        proc = cli(*smoke_args(oh_root, "--shard", "2/2"), env=env_for(tmp_path), check=False)
        assert proc.returncode == 2
        assert "--shard" in proc.stderr and "Traceback" not in proc.stderr


class TestBadInput:
    def test_missing_root(self, tmp_path: Path) -> None:
        proc = cli(*smoke_args(tmp_path / "nope"), env=env_for(tmp_path), check=False)
        assert proc.returncode == 2
        assert str(tmp_path / "nope") in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1

    def test_corrupt_image_names_the_file(self, tmp_path: Path) -> None:
        root = fakedata.write_officehome(tmp_path / "oh", truncated=True)
        proc = cli(*smoke_args(root), env=env_for(tmp_path / "c"), check=False)
        assert proc.returncode == 2, proc.stderr
        assert "skip_list" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

    def test_unknown_teacher(self, oh_root: Path, tmp_path: Path) -> None:
        proc = cli(
            *smoke_args(oh_root, "--set", "teacher.name=vit_smal_patch14_dinov2"),
            env=env_for(tmp_path),
            check=False,
        )
        assert proc.returncode == 2
        assert "vit_small_patch14_dinov2" in proc.stderr

    def test_missing_weights_offline_fails_fast(self, oh_root: Path, tmp_path: Path) -> None:
        t0 = time.perf_counter()
        proc = cli(
            *smoke_args(
                oh_root,
                "--set",
                "teacher.weights=hub",
                "--set",
                "teacher.name=vit_small_patch14_dinov2.lvd142m",
            ),
            env=env_for(tmp_path) | {"HF_HOME": str(tmp_path / "hf")},
            check=False,
        )
        assert proc.returncode == 2
        assert "vit_small_patch14_dinov2" in proc.stderr
        assert time.perf_counter() - t0 < 30


def test_bf16_teacher_records_its_cosine_to_fp32(
    oh_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from customkd_cache.specs import load_cache_spec
    from customkd_cache.stage_one.extract import Shard, plan_cache, run_cache

    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path))
    spec = load_cache_spec(
        SMOKE, [f"dataset.root={oh_root}", "teacher.precision=bf16", "dataset.splits=['Art']"]
    )
    res = run_cache(spec, spec_path=SMOKE, shard=Shard(), progress=False)
    attrs = zarr.open_group(res.path, mode="r").attrs
    assert 0.9 <= attrs[FIDELITY_MIN_ATTR] <= attrs[FIDELITY_ATTR] <= 1.0
    assert attrs["identity"]["teacher"]["precision"] == "bf16-autocast"
    info = open_store(res.path).info()  # info --json
    assert (info[FIDELITY_ATTR], info[FIDELITY_MIN_ATTR]) == (attrs[FIDELITY_ATTR], attrs[FIDELITY_MIN_ATTR])
    shown = cli("info", str(res.path), env=env_for(tmp_path)).stdout
    assert f"cosine mean {attrs[FIDELITY_ATTR]:.6f}, min {attrs[FIDELITY_MIN_ATTR]:.6f}" in shown
    assert "bf16-autocast" in shown
    # the same spec in fp32 (and "auto", which is fp32 on the CPU) is another store, with no cosine
    fp32 = run_cache(
        spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"precision": "fp32"})}),
        spec_path=SMOKE,
        shard=Shard(),
        progress=False,
    )
    assert fp32.fingerprint != res.fingerprint
    assert FIDELITY_ATTR not in zarr.open_group(fp32.path, mode="r").attrs
    auto = plan_cache(
        spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"precision": "auto"})}),
        spec_path=SMOKE,
        shard=Shard(),
    )
    assert auto.fingerprint == fp32.fingerprint


# --- repair restores every kind of array -------------------------------------------------------

# Every array of a split: the unit data, the done markers, the per-unit hashes and the split's stats.
_FLOAT_ARRAYS = ("features", "boxes", "flips", "ids", "labels", "unit_sum", "unit_sumsq")
_FLOAT_ARRAYS += ("done", "unit_sha256", "mean", "std", "stats_done")
_INT8_ARRAYS = ("quant_scale", "quant_offset", "quant_cosine")  # beside the codes in ``features``
_PER_SPLIT = ("mean", "std", "stats_done")  # one chunk for the split
# (dtype, array): every array of a float16 store; an int8 store's codes and quantization arrays
# (its other arrays are the float layout's).
_REPAIRED = [("float16", name) for name in _FLOAT_ARRAYS]
_REPAIRED += [("int8", name) for name in ("features", *_INT8_ARRAYS)]
_DAMAGES = ("changed", "deleted")
_SPLIT, _UNIT = "Art", 1  # the damaged unit (rows 16-31 of 16-row units)


@pytest.fixture(scope="module")
def clean_stores(oh_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One clean build per dtype of the Art split in 16-row units (5 units), through the CLI."""
    built = {}
    for dtype in ("float16", "int8"):
        root = tmp_path_factory.mktemp(f"clean_{dtype}")
        args = smoke_args(oh_root, "--set", "dataset.splits=['Art']", "--set", f"store.dtype={dtype}")
        cli(*args, env=env_for(root))
        built[dtype] = only_store(root)
        group = zarr.open_group(built[dtype] / _SPLIT, mode="r")
        extra = _INT8_ARRAYS if dtype == "int8" else ()
        assert sorted(group.array_keys()) == sorted((*_FLOAT_ARRAYS, *extra))  # every array is damaged
    return built


def _chunk_file(store: Path, name: str) -> Path:
    """The chunk file of ``_UNIT`` in array ``name`` (chunk 0 of a per-split array such as mean)."""
    where = store / _SPLIT / name / "c" / ("0" if name in _PER_SPLIT else str(_UNIT))
    return where if where.is_file() else next(p for p in sorted(where.rglob("*")) if p.is_file())


def _damage(chunk: Path, how: str) -> None:
    if how == "deleted":
        chunk.unlink()
        return
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # zstd chunks fail their checksum; a done marker 1 reads 0xFE
    chunk.write_bytes(bytes(data))


def _files(store: Path) -> dict[str, bytes]:
    """Every file of the store but the (empty once released) claims, by relative path."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and CLAIMS_DIR not in p.relative_to(store).parts
    }


@pytest.mark.usefixtures("one_thread")
class TestRepairRestoresEveryArray:
    """Damage one array of one unit (or the split's stats), run the repair that ``verify`` prints
    through the CLI, and get a store that verifies with the bytes of a clean build."""

    @pytest.mark.parametrize("how", _DAMAGES)
    @pytest.mark.parametrize(("dtype", "name"), _REPAIRED, ids=[f"{d}-{n}" for d, n in _REPAIRED])
    def test_cache_repair_then_verify_passes(
        self,
        clean_stores: dict[str, Path],
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        dtype: str,
        name: str,
        how: str,
    ) -> None:
        from typer.testing import CliRunner

        from customkd_cache.cli import app

        clean = clean_stores[dtype]
        store = tmp_path / clean.name
        shutil.copytree(clean, store)
        _damage(_chunk_file(store, name), how)
        monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        runner = CliRunner()
        before = runner.invoke(app, ["verify", str(store)])
        assert before.exit_code == 1, before.output  # the damage is seen
        root, program, *args = shlex.split(
            before.output.strip().splitlines()[-1].split("repair with: ", 1)[1]
        )
        assert (
            root == f"CUSTOMKD_CACHE_ROOT={tmp_path}"
            and program == "customkd-cache"
            and args[-1] == "--repair"
        )
        repaired = runner.invoke(app, args)
        assert repaired.exit_code == 0, (repaired.output, repaired.exception)
        after = runner.invoke(app, ["verify", str(store)])
        assert after.exit_code == 0 and after.output.strip().endswith(": ok"), after.output
        assert _files(store) == _files(clean)
