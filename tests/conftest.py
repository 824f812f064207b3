"""Shared fixtures: tiny generated datasets in the real on-disk layouts.

Session-scoped datasets are written once per test run and must be treated as read-only; a test that
changes files writes its own copy (the ``fakedata`` writers take well under a second).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from customkd_cache.specs import DatasetSpec
from customkd_cache.testing import fakedata

# Split sizes and class counts of the ``fake_specs`` datasets (see the ``fake_sizes`` fixture).
_SIZES = {
    "officehome": {"Art": 65, "Clipart": 65, "Product": 65, "Real_World": 65},
    "domainnet": {"clipart_train": 10, "clipart_test": 5, "sketch_train": 10, "sketch_test": 5},
    "cifar100": {"train": 500, "test": 100},
    "cifar10": {"train": 50, "test": 20},
    "imagenet": {"train": 15, "val": 5},
    "fashion_mnist": {"train": 60, "test": 20},
    "image_folder": {"all": 6},
    "list_file": {"train": 6},
}
_NUM_CLASSES = {
    "officehome": 65,
    "domainnet": 5,
    "cifar100": 100,
    "cifar10": 10,
    "imagenet": 5,
    "fashion_mnist": 10,
    "image_folder": 3,
    "list_file": 3,
}


@pytest.fixture
def tmp_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty directory set as ``CUSTOMKD_DATA_ROOT`` for the duration of the test."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("CUSTOMKD_DATA_ROOT", str(root))
    return root


@pytest.fixture(scope="session")
def officehome_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OfficeHome layout: 4 domains x 65 classes x 1 image (read-only)."""
    return fakedata.write_officehome(tmp_path_factory.mktemp("officehome") / "OfficeHome")


@pytest.fixture(scope="session")
def fake_specs(tmp_path_factory: pytest.TempPathFactory, officehome_root: Path) -> dict[str, DatasetSpec]:
    """A ``DatasetSpec`` (absolute root) for a tiny dataset of every kind, sized as ``fake_sizes`` says."""
    base = tmp_path_factory.mktemp("datasets")
    lists = fakedata.write_list_file(base / "listed", name="train", num_classes=3, per_class=2)
    specs = {
        "officehome": DatasetSpec(kind="officehome", root=str(officehome_root)),
        "domainnet": DatasetSpec(
            kind="domainnet",
            root=str(fakedata.write_domainnet(base / "domainnet", num_classes=5, per_class_train=2)),
        ),
        "cifar100": DatasetSpec(
            kind="cifar100", root=str(fakedata.write_cifar100(base / "cifar100", n_train=500, n_test=100))
        ),
        "cifar10": DatasetSpec(kind="cifar10", root=str(fakedata.write_cifar10(base / "cifar10"))),
        "imagenet": DatasetSpec(kind="imagenet", root=str(fakedata.write_imagenet(base / "imagenet"))),
        "fashion_mnist": DatasetSpec(
            kind="fashion_mnist", root=str(fakedata.write_fashion_mnist(base / "fmnist"))
        ),
        "image_folder": DatasetSpec(
            kind="image_folder", root=str(fakedata.write_image_folder(base / "folder"))
        ),
        "list_file": DatasetSpec(kind="list_file", root=str(lists.parent), lists=(str(lists),)),
    }
    assert set(specs) == set(_SIZES)
    return specs


@pytest.fixture(scope="session")
def fake_sizes() -> dict[str, tuple[int, dict[str, int]]]:
    """For each kind in ``fake_specs``: (number of classes, {split name: samples}) in manifest order."""
    return {kind: (_NUM_CLASSES[kind], dict(splits)) for kind, splits in _SIZES.items()}


@pytest.fixture(scope="session")
def awkward_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder with every awkward file: odd modes and names, upper-case suffixes, a truncated JPEG."""
    root = tmp_path_factory.mktemp("awkward") / "images"
    return fakedata.write_image_folder(
        root,
        classes=("a", "b"),
        per_class=2,
        unicode_names=True,
        upper_ext=True,
        odd_modes=True,
        truncated=True,
    )


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch intra-op thread for a module of tiny tensors: fastest for them, keeps results
    independent of the core count, and avoids two OpenMP threads fighting other processes on a
    shared 2-core machine (seen here to make each forward pass ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
