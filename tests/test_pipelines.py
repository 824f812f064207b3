"""Every shipped pipeline trains from the caches ``make cache DATASET=<its dataset>`` makes.

For each folder of ``pipelines/`` (smoke aside) the test writes a tiny dataset in the real layout
under ``CUSTOMKD_DATA_ROOT`` (the roots the specs name), runs ``cache`` for every spec in
``cache_specs/<dataset>/`` (what ``make cache`` runs) with a tiny random ViT swapped in (copies of
the specs: ``testing.specs.TINY_CACHE``), and trains each pipeline, pointed at its cache spec's
copy, for one epoch with a tiny student (``TINY_TRAIN``) through the normal store lookup: one cache
over every split serves each pipeline. ``officehome`` and ``domainnet`` run in ``make test``: every
pipeline of theirs finds and checks its store (12 OfficeHome tasks, 12 DomainNet pairs, one cache
each) and the first trains; every pipeline of every folder trains in ``make test-slow``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from customkd_cache.catalog import check_store, find_store
from customkd_cache.data.datasets import open_dataset
from customkd_cache.data.labels import write_labeled_list
from customkd_cache.specs import load_cache_spec, load_train_spec
from customkd_cache.stage_one.extract import Shard, run_cache
from customkd_cache.stage_two.train import run_train
from customkd_cache.store import open_store
from customkd_cache.testing import fakedata
from customkd_cache.testing.specs import TINY_TRAIN, tiny_cache_spec

REPO = Path(__file__).resolve().parents[1]
PIPELINES = sorted(p for p in (REPO / "pipelines").glob("*/*.toml") if p.parent.name != "smoke")
FOLDERS = sorted({p.parent.name for p in PIPELINES})

FAST = {"officehome", "domainnet"}


def _officehome(data: Path, datasets: list[dict[str, Any]]) -> None:
    fakedata.write_officehome(data / "officehome")


def _domainnet(data: Path, datasets: list[dict[str, Any]]) -> None:
    # every domain the DomainNet pipelines read, few classes
    domains = ("real", "clipart", "painting", "sketch")
    fakedata.write_domainnet(data / "domainnet", domains=domains, num_classes=4, per_class_train=2)


def _cifar100(data: Path, datasets: list[dict[str, Any]]) -> None:
    root = fakedata.write_cifar100(data / "cifar100", n_train=200, n_test=100)
    _labeled(root, "cifar100", "train", data / "cifar100" / "labels_4per_class_seed0.txt")


def _imagenet(data: Path, datasets: list[dict[str, Any]]) -> None:
    root = fakedata.write_imagenet(data / "imagenet")
    _labeled(root, "imagenet", "train", data / "imagenet" / "1percent.txt")


def _fashion_mnist(data: Path, datasets: list[dict[str, Any]]) -> None:
    root = fakedata.write_fashion_mnist(data / "fashion_mnist")
    _labeled(root, "fashion_mnist", "train", data / "fashion_mnist" / "labels_4per_class_seed0.txt")


def _list_file(data: Path, datasets: list[dict[str, Any]]) -> None:
    """Every list file the specs name (``DIR/NAME.txt`` under the data root), 10 classes x 2 images."""
    lists = sorted({Path(x) for d in datasets for x in d.get("lists", [])})
    for i, path in enumerate(lists):
        fakedata.write_list_file(data / path.parent, name=path.stem, num_classes=10, per_class=2, seed=i)


def _labeled(root: Path, kind: str, split: str, out: Path) -> None:
    from customkd_cache.specs import DatasetSpec

    manifest = open_dataset(DatasetSpec(kind=kind, root=str(root), splits=(split,))).manifest  # type: ignore[arg-type]
    write_labeled_list(manifest, split, per_class=1, seed=0, out=out)


# Tiny data of each dataset kind, written under CUSTOMKD_DATA_ROOT at the roots the specs name (the
# list_file writer writes what the specs list).
WRITERS: dict[str, Callable[[Path, list[dict[str, Any]]], None]] = {
    "officehome": _officehome,
    "domainnet": _domainnet,
    "cifar100": _cifar100,
    "imagenet": _imagenet,
    "fashion_mnist": _fashion_mnist,
    "list_file": _list_file,
}
# Datasets whose specs name an absolute default root: the copies and pipelines get this one instead.
ROOTS = {"fashion_mnist": "fashion_mnist"}


def _toml(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def cache_folder(pipeline: Path) -> str:
    """``DATASET`` of the ``make cache DATASET=...`` that serves ``pipeline``: its cache spec's folder."""
    return (pipeline.parent / _toml(pipeline)["cache"]["spec"]).resolve().parent.name


def test_every_pipeline_has_a_data_writer() -> None:
    kinds = {p.name: _toml(p)["dataset"]["kind"] for p in PIPELINES}
    missing = sorted(f"{name} ({kind})" for name, kind in kinds.items() if kind not in WRITERS)
    assert not missing, f"{missing}: add a writer of tiny data in the real layout to WRITERS"


def tiny_cache_specs(folder: str, out: Path) -> dict[str, Path]:
    """Copies of every spec in cache_specs/<folder>/ with the tiny teacher: original name -> copy."""
    out.mkdir(parents=True, exist_ok=True)
    copies = {}
    for spec in sorted((REPO / "cache_specs" / folder).glob("*.toml")):
        kind = _toml(spec)["dataset"]["kind"]
        extra = [f"dataset.root={ROOTS[kind]}"] if kind in ROOTS else []
        copies[spec.name] = tiny_cache_spec(spec, out / spec.name, extra)
    return copies


def make_cache(folder: str, base: Path) -> dict[str, Path]:
    """What ``make cache DATASET=<folder>`` runs, on the tiny copies; the copies by original name."""
    copies = tiny_cache_specs(folder, base / "cache_specs" / folder)
    for copy in copies.values():
        result = run_cache(load_cache_spec(copy), spec_path=copy, shard=Shard(0, 1), progress=False)
        assert result.complete, copy
    return copies


def train_overrides(pipeline: Path, copies: dict[str, Path]) -> list[str]:
    cache_spec = Path(_toml(pipeline)["cache"]["spec"]).name
    assert cache_spec in copies, (
        f"{pipeline}: cache.spec {cache_spec} is not in cache_specs/{pipeline.parent.name}/"
    )
    kind = _toml(pipeline)["dataset"]["kind"]
    extra = [f"dataset.root={ROOTS[kind]}"] if kind in ROOTS else []
    return [f"cache.spec={copies[cache_spec]}", *TINY_TRAIN, *extra]


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CUSTOMKD_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path / "caches"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "caches").mkdir()
    return tmp_path


def resolve(pipeline: Path, overrides: list[str]) -> Path:
    """The store ``train`` would read for ``pipeline``, checked as ``train`` checks it."""
    spec = load_train_spec(pipeline, overrides)
    manifest = open_dataset(spec.dataset).manifest
    path = find_store(spec, spec_path=pipeline, manifest=manifest)
    check_store(open_store(path), spec=spec, spec_path=pipeline, manifest=manifest)
    return path


def run_folder(folder: str, base: Path, *, train_all: bool) -> None:
    pipelines = [p for p in PIPELINES if p.parent.name == folder]
    datasets = {cache_folder(p) for p in pipelines}
    assert len(datasets) == 1, f"pipelines/{folder}: cache specs from several folders {sorted(datasets)}"
    dataset = datasets.pop()
    specs = [_toml(p) for p in [*pipelines, *(REPO / "cache_specs" / dataset).glob("*.toml")]]
    kind = specs[0]["dataset"]["kind"]
    WRITERS[kind](base / "data", [s["dataset"] for s in specs])
    copies = make_cache(dataset, base)
    stores = {p.name: resolve(p, train_overrides(p, copies)) for p in pipelines}
    by_cache = {Path(_toml(p)["cache"]["spec"]).name for p in pipelines}
    assert len(set(stores.values())) == len(by_cache), "one store per cache spec serves every pipeline"
    for p in pipelines if train_all else pipelines[:1]:
        spec = load_train_spec(p, train_overrides(p, copies))
        results = run_train(spec, spec_path=p, out=base / "runs" / p.stem)
        assert 0.0 <= results["student_accuracy"] <= 1.0, p


@pytest.mark.parametrize("folder", sorted(FAST))
def test_pipelines_of_the_design_card_train_from_one_cache(folder: str, lab: Path) -> None:
    run_folder(folder, lab, train_all=False)


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS)
def test_every_pipeline_trains_from_its_dataset_cache(folder: str, lab: Path) -> None:
    run_folder(folder, lab, train_all=True)
