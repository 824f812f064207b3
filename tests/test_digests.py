"""Content digests in the manifest: a same-size image swap changes the fingerprint, and the per-user
stat-keyed cache of digests saves rereading unchanged files without ever being trusted blindly."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path

import pytest

from customkd_cache.data import digests, open_dataset
from customkd_cache.specs import DatasetSpec
from customkd_cache.testing import fakedata

FILES = {"a/x.jpg": b"x" * 50, "a/y.jpg": b"y" * 70, "b/z.jpg": b"z" * 30}


@pytest.fixture
def dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DatasetSpec:
    root = tmp_path / "data"
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (tmp_path / "caches").mkdir()
    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path / "caches"))
    monkeypatch.setattr(digests, "RACY_NS", 0)  # the files were written just now
    return DatasetSpec(kind="image_folder", root=str(root))


def cache_files(spec: DatasetSpec) -> list[Path]:
    folder = Path(os.environ["CUSTOMKD_CACHE_ROOT"]) / digests.CACHE_DIR
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    read: list[str] = []
    real = digests._hash_file

    def counted(path: str) -> tuple[tuple[int, int, int, int], str, bool]:
        read.append(path)
        return real(path)

    monkeypatch.setattr(digests, "_hash_file", counted)
    return read


def swap_same_size(path: Path, data: bytes) -> None:
    """Rewrite in place and put the old mtime back, as a careless copy tool or a hostile user would."""
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_digests_are_sha256_of_the_bytes(dataset: DatasetSpec) -> None:
    m = open_dataset(dataset).manifest
    for s in m.split("all").samples:
        assert s.digest == hashlib.sha256(FILES[s.id]).hexdigest()


def test_a_warm_cache_reads_no_file(dataset: DatasetSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    first = open_dataset(dataset).manifest
    assert len(cache_files(dataset)) == 1
    assert cache_files(dataset)[0].stat().st_mode & 0o777 == 0o600
    read = count_reads(monkeypatch)
    assert open_dataset(dataset).manifest.digest() == first.digest()
    assert read == []


def test_a_same_size_swap_changes_the_digest_and_names_the_file(
    dataset: DatasetSpec, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = open_dataset(dataset).manifest.digest()
    swap_same_size(Path(dataset.root) / "a/y.jpg", b"Y" * 70)
    read = count_reads(monkeypatch)
    m = open_dataset(dataset).manifest
    assert m.digest() != before and m.changed == ("a/y.jpg",)
    assert [Path(p).name for p in read] == ["y.jpg"]  # the others are served by the cache
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 image(s) hold other bytes" in err[0] and "a/y.jpg" in err[0], err


def test_a_swap_is_seen_without_any_cache(dataset: DatasetSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(Path(dataset.root).parent / "absent"))
    before = open_dataset(dataset).manifest.digest()
    swap_same_size(Path(dataset.root) / "a/y.jpg", b"Y" * 70)
    assert open_dataset(dataset).manifest.digest() != before
    assert not (Path(dataset.root).parent / "absent").exists()  # no cache root is made for it


def test_the_digest_does_not_depend_on_file_times_or_the_cache(
    dataset: DatasetSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store made on one machine serves the same bytes copied to another: times, inodes and the
    cache play no part in the digest."""
    warm = open_dataset(dataset).manifest.digest()
    for path in Path(dataset.root).rglob("*.jpg"):
        os.utime(path, ns=(1, 1))
    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path / "elsewhere"))
    assert open_dataset(dataset).manifest.digest() == warm


@pytest.mark.parametrize(
    "damage",
    ["not json", "forged digest", "wrong types", "other root", "a link", "a directory", "not mine"],
)
def test_a_damaged_or_foreign_cache_is_never_trusted(
    damage: str, dataset: DatasetSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth = open_dataset(dataset).manifest.digest()
    (path,) = cache_files(dataset)
    data = json.loads(path.read_text())
    entry = data["entries"]["a/x.jpg"]
    if damage == "not json":
        path.write_text("{")
    elif damage == "forged digest":
        # a stat-matching entry with another digest, in a file the user does not own: ignored
        data["entries"]["a/x.jpg"] = [*entry[:4], "0" * 64]
        path.write_text(json.dumps(data))
        monkeypatch.setattr(os, "getuid", lambda: 12345)
        monkeypatch.setattr(digests, "_cache_path", lambda *a: path)
    elif damage == "wrong types":
        data["entries"]["a/x.jpg"] = [str(entry[0]), *entry[1:]]
        path.write_text(json.dumps(data))
    elif damage == "other root":
        data["root"] = "/elsewhere"
        path.write_text(json.dumps(data))
    elif damage == "a link":
        victim = tmp_path / "victim.json"
        victim.write_text(json.dumps({**data, "entries": {"a/x.jpg": [*entry[:4], "0" * 64]}}))
        path.unlink()
        path.symlink_to(victim)
    elif damage == "a directory":
        path.unlink()
        path.mkdir()
    elif damage == "not mine":
        monkeypatch.setattr(os, "getuid", lambda: 12345)
        monkeypatch.setattr(digests, "_cache_path", lambda *a: path)
    read = count_reads(monkeypatch)
    assert open_dataset(dataset).manifest.digest() == truth
    assert len(read) == len(FILES)  # everything was read again
    if damage == "a link":
        assert "0" * 64 in (tmp_path / "victim.json").read_text()  # never written through


def test_a_file_changed_just_before_hashing_is_not_cached(
    dataset: DatasetSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """git's racily clean entries: a second change within the time granularity would keep the stat."""
    monkeypatch.setattr(digests, "RACY_NS", 3600 * 10**9)
    open_dataset(dataset)
    assert cache_files(dataset) == []
    read = count_reads(monkeypatch)
    open_dataset(dataset)
    assert len(read) == len(FILES)


def test_array_datasets_digest_their_rows(fake_specs: dict[str, DatasetSpec]) -> None:
    m = open_dataset(fake_specs["cifar10"]).manifest
    digests_ = [s.digest for s in m.split("train").samples]
    assert all(len(d) == 64 for d in digests_) and len(set(digests_)) == len(digests_)


# --- end to end: a same-size image swap after a cache was made ---------------------------------

REPO = Path(__file__).resolve().parents[1]
CACHE_SPEC = REPO / "cache_specs" / "smoke" / "officehome.toml"
TRAIN_SPEC = REPO / "pipelines" / "smoke" / "officehome.toml"


def same_size_other_image(path: Path) -> None:
    """Replace a JPEG by another picture (inverted pixels) of exactly the same byte size."""
    from PIL import Image, ImageOps

    size = path.stat().st_size
    with Image.open(path) as im:
        other = ImageOps.invert(im.convert("RGB"))
    for quality in range(95, 5, -5):
        buf = io.BytesIO()
        other.save(buf, format="JPEG", quality=quality)
        if len(buf.getvalue()) <= size:
            break
    data = buf.getvalue()
    path.write_bytes(data + b"\0" * (size - len(data)))  # decoders ignore bytes after the image
    assert path.stat().st_size == size


def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    from customkd_cache.cli import main

    monkeypatch.setattr(sys, "argv", ["customkd-cache", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_same_size_image_swap_is_never_served_stale_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    """The hostile case L01: before, the fingerprint stayed, ``cache`` skipped and ``train`` used the
    features of the earlier picture. Now ``cache`` makes a new store and ``train`` refuses the old
    one, each with one line naming the file."""
    root = fakedata.write_officehome(tmp_path / "OfficeHome", per_class=1)
    (tmp_path / "caches").mkdir()
    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path / "caches"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(digests, "RACY_NS", 0)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    sets = ["--set", f"dataset.root={root}"]
    code, out, err = cli(monkeypatch, capsys, "cache", "--spec", str(CACHE_SPEC), *sets, "-q")
    assert code == 0, err
    code, before, err = cli(monkeypatch, capsys, "cache", "--spec", str(CACHE_SPEC), *sets, "--dry-run")
    assert code == 0 and "exists       True" in before, before + err

    swapped = "Art/Alarm_Clock/00001.jpg"
    same_size_other_image(root / swapped)
    train = [
        "train",
        "--spec",
        str(TRAIN_SPEC),
        *sets,
        "--set",
        "optim.epochs=1",
        "--out",
        str(tmp_path / "r"),
    ]
    code, out, err = cli(monkeypatch, capsys, *train)
    note, error = err.strip().splitlines()  # the first command to read the new bytes names the file
    assert swapped in note and "caches of the earlier bytes no longer match" in note, err
    assert code == 2 and "no store" in error and "other samples in split Art" in error, err
    assert not (tmp_path / "r" / "results.json").exists()

    code, after, err = cli(monkeypatch, capsys, "cache", "--spec", str(CACHE_SPEC), *sets, "--dry-run")
    assert code == 0 and "exists       False" in after, after
    assert before.splitlines()[1] != after.splitlines()[1]  # the fingerprint line
