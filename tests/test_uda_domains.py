"""The UDA benchmark generators (evidence/mnistm.py, evidence/fmnist_shift.py) on tiny generated arrays."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from evidence.fmnist_shift import SPLITS as SKETCH_SPLITS
from evidence.fmnist_shift import sketch, write_fmnist_shift_domains
from evidence.mnistm import SPLITS as MNISTM_SPLITS
from evidence.mnistm import blend, mnistm_images, write_mnistm_domains

LINE = re.compile(r"^(\S+\.png) (\d+)$")


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.int64) % 10


def _photos() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    return [
        rng.integers(0, 256, (40, 50, 3), dtype=np.uint8),
        rng.integers(0, 256, (30, 30, 3), dtype=np.uint8),
    ]


def _read_lists(root: Path, splits: tuple[str, ...]) -> dict[str, list[tuple[str, int]]]:
    out = {}
    for s in splits:
        rows = []
        for line in (root / f"{s}.txt").read_text().splitlines():
            m = LINE.match(line)
            assert m, line
            assert (root / m.group(1)).is_file()
            assert m.group(1).startswith(f"{s}/{m.group(2)}/")
            rows.append((m.group(1), int(m.group(2))))
        out[s] = rows
    return out


def test_blend_is_the_absolute_difference_per_channel() -> None:
    digit = np.array([[0, 255]], np.uint8)
    patch = np.array([[[10, 200, 255], [10, 200, 255]]], np.uint8)
    assert blend(digit, patch).tolist() == [[[10, 200, 255], [245, 55, 0]]]


def test_mnistm_is_deterministic_and_per_image(tmp_path: Path) -> None:
    digits, labels = _digits(12)
    a = mnistm_images(digits, _photos(), seed=0)
    assert a.shape == (12, 28, 28, 3) and a.dtype == np.uint8
    assert np.array_equal(a, mnistm_images(digits, _photos(), seed=0))
    assert np.array_equal(a[:5], mnistm_images(digits[:5], _photos(), seed=0))  # no dependence on the others
    assert not np.array_equal(a, mnistm_images(digits, _photos(), seed=1))

    kw: dict[str, Any] = {"digits": (digits, labels), "photos": _photos(), "sizes": (6, 2)}
    one = write_mnistm_domains(tmp_path / "a", **kw)
    two = write_mnistm_domains(tmp_path / "b", **kw)
    lists = _read_lists(one, MNISTM_SPLITS)
    assert [len(lists[s]) for s in MNISTM_SPLITS] == [6, 2, 6, 4]
    for s in MNISTM_SPLITS:
        assert (one / f"{s}.txt").read_text() == (two / f"{s}.txt").read_text()
        for rel, _ in lists[s]:
            assert (one / rel).read_bytes() == (two / rel).read_bytes()
    # mnistm_train blends the source digits; mnistm_test digits are in no training split
    ids = {s: {Path(rel).stem for rel, _ in lists[s]} for s in MNISTM_SPLITS}
    assert ids["mnistm_train"] == ids["mnist_train"]
    assert not ids["mnistm_test"] & (ids["mnist_train"] | ids["mnist_val"])
    rel, label = lists["mnistm_test"][0]
    i = int(Path(rel).stem)
    assert label == labels[i]
    assert np.array_equal(np.asarray(Image.open(one / rel)), a[i])


def test_sketch_domains(tmp_path: Path) -> None:
    img = np.zeros((28, 28), np.uint8)
    img[8:20, 8:20] = 200
    s = sketch(img)
    assert s.shape == (28, 28) and s.dtype == np.uint8
    assert s[0, 0] == 255 and s[14, 14] == 255  # flat regions are white paper
    assert s.min() == 0  # the strongest edge is black

    train, test = _digits(20), _digits(9)
    kw: dict[str, Any] = {
        "train": train,
        "test": test,
        "sizes": {"fmnist_train": 8, "fmnist_val": 3, "sketch_train": 6, "sketch_test": 5},
    }
    one = write_fmnist_shift_domains(tmp_path / "a", **kw)
    two = write_fmnist_shift_domains(tmp_path / "b", **kw)
    lists = _read_lists(one, SKETCH_SPLITS)
    assert [len(lists[s]) for s in SKETCH_SPLITS] == [8, 3, 6, 5]
    for sp in SKETCH_SPLITS:
        assert (one / f"{sp}.txt").read_text() == (two / f"{sp}.txt").read_text()
    ids = [{Path(rel).stem for rel, _ in lists[sp]} for sp in SKETCH_SPLITS[:3]]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])  # disjoint training images
    rel, _ = lists["sketch_train"][0]
    assert np.array_equal(np.asarray(Image.open(one / rel)), sketch(train[0][int(Path(rel).stem)]))
