"""Contracts of stage two's data path (customkd_cache.stage_two.replay).

A tiny dataset in the real ``list_file`` layout (PNG files of different sizes, two splits) is cached
into a real store: each image's views are drawn and rendered by the functions stage one uses, and the
"teacher feature" of a view is a fixed function of the teacher's pixels, so the tests can tell which
pixels a stored feature came from. ``TestStageOne`` checks the same contract against the real stage
one (``extract.run_cache`` with a tiny random ``test_vit``).
"""

from __future__ import annotations

import os
import pickle
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from customkd_cache.catalog import fingerprint
from customkd_cache.data import Dataset, open_dataset
from customkd_cache.data.views import render_view, sample_views, to_tensor
from customkd_cache.specs import CacheSpec, DatasetSpec, ViewsSpec
from customkd_cache.stage_two.replay import (
    FeatureSource,
    ReplayDataset,
    Row,
    combined_stats,
    draw_views,
    epoch_items,
    eval_items,
    make_loader,
    stage_b_batches,
)
from customkd_cache.store import SplitInit, create_or_open_store, open_store
from customkd_cache.testing import fakedata

SPLITS = {"src": 10, "tgt": 7}
VIEWS = ViewsSpec.model_validate({"num_views": 4, "seed": 3})
UNIT_ROWS = 4


class Pre(NamedTuple):
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


TEACHER = Pre(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic")
STUDENT = Pre(16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
FEATURE_DIM = 3 * 2 * 2 + 1  # 2x2 average-pooled teacher pixels, and one constant dimension


# --- fixtures ------------------------------------------------------------------------------------


def _image(split_index: int, index: int) -> Image.Image:
    """A smooth image (so a view downsampled from a larger rendering matches a smaller rendering)
    that is not left-right symmetric (so a flip shows), of a size that differs per image."""
    w, h = 40 + 7 * (index % 4), 30 + 5 * (index % 3)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * x / (w - 1)
    g = 255 * y / (h - 1)
    b = 127.5 + 120 * np.sin((x + 2 * y) / 9.0 + index + 3 * split_index)
    return Image.fromarray(np.stack([r, g, b], -1).round().astype(np.uint8), "RGB")


def _teacher_pixels(img: Image.Image, box: np.ndarray, flip: bool) -> torch.Tensor:
    view = render_view(img, box, flip, size=TEACHER.size, interpolation=TEACHER.interpolation)
    return to_tensor(view, mean=TEACHER.mean, std=TEACHER.std)


def _feature_of(pixels: torch.Tensor) -> np.ndarray:
    """(V, 3, S, S) teacher pixels -> (V, FEATURE_DIM) float32 "teacher features"."""
    pooled = F.adaptive_avg_pool2d(pixels, 2).flatten(1)
    return torch.cat([pooled, torch.ones(len(pixels), 1)], 1).numpy()


def _write_dataset(root: Path) -> Dataset:
    lists = []
    for si, (split, n) in enumerate(SPLITS.items()):
        (root / split).mkdir(parents=True)
        lines = []
        for i in range(n):
            _image(si, i).save(root / split / f"{i:03d}.png")
            lines.append(f"{split}/{i:03d}.png {i % 3}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
        lists.append(str(root / f"{split}.txt"))
    return open_dataset(DatasetSpec.model_validate({"kind": "list_file", "root": str(root), "lists": lists}))


def _write_store(path: Path, dataset: Dataset) -> Path:
    """Stage one in miniature: every view drawn by ``sample_views``, rendered for the teacher, its
    feature computed and written with its box and flip, one whole unit at a time."""
    inits = {s.name: SplitInit(ids=s.ids(), labels=s.labels()) for s in dataset.manifest.splits}
    store = create_or_open_store(
        path,
        fingerprint=fingerprint({"test": True}),
        identity={"test": True},
        provenance={},
        splits=inits,
        num_views=VIEWS.num_views,
        feature_dim=FEATURE_DIM,
        dtype="float16",
        unit_rows=UNIT_ROWS,
        compressor="zstd",
    )
    for split in store.split_names:
        for unit, rows in enumerate(store.units(split)):
            feats, boxes, flips = [], [], []
            for row in rows:
                img = dataset.load_image(split, row)
                b, f = sample_views(VIEWS, sample_index=row, width=img.width, height=img.height)
                pixels = torch.stack([_teacher_pixels(img, b[v], bool(f[v])) for v in range(len(b))])
                feats.append(_feature_of(pixels))
                boxes.append(b)
                flips.append(f)
            store.write_unit(
                split, unit, features=np.stack(feats), boxes=np.stack(boxes), flips=np.stack(flips)
            )
        assert store.finalize_split(split)
    return path


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Path]:
    root = tmp_path_factory.mktemp("cached")
    dataset = _write_dataset(root / "data")
    return dataset, _write_store(root / "tiny.zarr", dataset)


def _replay(dataset: Dataset, store_path: Path, features: FeatureSource | None, **kw: Any) -> ReplayDataset:
    return ReplayDataset(
        dataset=dataset,
        store_path=store_path,
        features=features,
        student_size=STUDENT.size,
        student_mean=STUDENT.mean,
        student_std=STUDENT.std,
        interpolation=STUDENT.interpolation,
        **kw,
    )


def _all_items() -> list[tuple[Row, int]]:
    return [
        (Row(s, r, s == "src"), v)
        for s, n in SPLITS.items()
        for r in range(n)
        for v in range(VIEWS.num_views)
    ]


def _normalized(ds: ReplayDataset, item: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One item's tensors as the training loop sees them: uint8 pixels normalized (on the CPU here)."""
    return {k: v[0] for k, v in ds.to_device(ds.collate([item]), "cpu").items()}


def _rows(split: str, n: int, labeled: bool) -> list[Row]:
    return [Row(split, i, labeled) for i in range(n)]


# --- the replayed view is the view the teacher saw -----------------------------------------------


class TestReplay:
    def test_teacher_rendering_of_stored_view_reproduces_stage_one_pixels(
        self, cached: tuple[Dataset, Path]
    ) -> None:
        dataset, path = cached
        ds = _replay(
            dataset,
            path,
            FeatureSource(path, in_ram=True, standardize=None),
            teacher_size=TEACHER.size,
            teacher_mean=TEACHER.mean,
            teacher_std=TEACHER.std,
            teacher_interpolation=TEACHER.interpolation,
        )
        ds.set_items(_all_items(), epoch=0)
        for k, (row, view) in enumerate(_all_items()):
            item = _normalized(ds, ds[k])
            img = dataset.load_image(row.split, row.row)
            boxes, flips = sample_views(VIEWS, sample_index=row.row, width=img.width, height=img.height)
            stage_one = _teacher_pixels(img, boxes[view], bool(flips[view]))
            assert torch.equal(item["teacher_pixels"], stage_one)
            # the cached feature is the one computed from exactly these pixels
            expected = _feature_of(stage_one[None])[0].astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(item["feature"].numpy(), expected)
            assert (item["row"], item["view"], ds.split_names[item["split_index"]]) == (
                row.row,
                view,
                row.split,
            )

    def test_boxes_come_from_the_store(self, cached: tuple[Dataset, Path]) -> None:
        dataset, path = cached
        store = open_store(path)
        for split in SPLITS:
            boxes, flips = store.read_boxes(split)
            for row in range(store.num_samples(split)):
                img = dataset.load_image(split, row)
                b, f = sample_views(VIEWS, sample_index=row, width=img.width, height=img.height)
                np.testing.assert_array_equal(boxes[row], b)
                np.testing.assert_array_equal(flips[row], f)

    def test_student_view_is_the_same_crop_at_its_own_size(self, cached: tuple[Dataset, Path]) -> None:
        dataset, path = cached
        ds = _replay(
            dataset,
            path,
            None,
            teacher_size=TEACHER.size,
            teacher_mean=STUDENT.mean,
            teacher_std=STUDENT.std,
            teacher_interpolation=STUDENT.interpolation,
        )
        ds.set_items(_all_items(), epoch=0)
        store = open_store(path)
        errors_same, errors_other = [], []
        for k, (row, view) in enumerate(_all_items()):
            item = _normalized(ds, ds[k])
            boxes, flips = store.read_boxes(row.split)
            img = dataset.load_image(row.split, row.row)
            exact = to_tensor(
                render_view(
                    img,
                    boxes[row.row, view],
                    bool(flips[row.row, view]),
                    size=STUDENT.size,
                    interpolation=STUDENT.interpolation,
                ),
                mean=STUDENT.mean,
                std=STUDENT.std,
            )
            assert torch.equal(item["pixels"], exact)
            # the teacher-size rendering, downsampled to the student's size, shows the same content
            down = F.avg_pool2d(item["teacher_pixels"][None], TEACHER.size // STUDENT.size)[0]
            errors_same.append(float((down - item["pixels"]).abs().mean()))
            other = _normalized(ds, ds[k - 1 if view else k + 1])["teacher_pixels"]
            errors_other.append(float((F.avg_pool2d(other[None], 2)[0] - item["pixels"]).abs().mean()))
        assert max(errors_same) < 0.05
        assert min(errors_other) > 3 * max(errors_same)

    def test_photometric_jitter_touches_only_student_pixels_and_is_seeded(
        self, cached: tuple[Dataset, Path]
    ) -> None:
        dataset, path = cached
        teacher = {"teacher_size": 24, "teacher_mean": TEACHER.mean, "teacher_std": TEACHER.std}
        plain = _replay(dataset, path, None, **teacher)
        jit = _replay(dataset, path, None, photometric=True, seed=5, **teacher)
        items = _all_items()[:8]
        for ds in (plain, jit):
            ds.set_items(items, epoch=1)
        a, b = plain[3], jit[3]
        assert not torch.equal(a["pixels"], b["pixels"])
        assert torch.equal(a["teacher_pixels"], b["teacher_pixels"])
        assert torch.equal(jit[3]["pixels"], b["pixels"])
        jit.set_items(items, epoch=2)
        assert not torch.equal(jit[3]["pixels"], b["pixels"])

    def test_labels_and_flags(self, cached: tuple[Dataset, Path]) -> None:
        dataset, path = cached
        ds = _replay(dataset, path, None)
        ds.set_items(eval_items("tgt", SPLITS["tgt"]), epoch=0)
        assert len(ds) == SPLITS["tgt"]
        labels = dataset.manifest.split("tgt").labels()
        for k in range(len(ds)):
            item = ds[k]
            assert item["view"] == 0 and item["labeled"] is False and item["label"] == labels[k]
        with pytest.raises(ValueError, match="nope"):
            ds.set_items([(Row("nope", 0, True), 0)], epoch=0)


class TestStageOne:
    """Against the real stage one: ``run_cache`` with a tiny random ``test_vit`` teacher."""

    @pytest.fixture(scope="class")
    def extracted(self, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
        from customkd_cache.stage_one.extract import RowViews, Shard, plan_cache, run_cache

        base = tmp_path_factory.mktemp("stage_one")
        root = fakedata.write_domainnet(base / "domainnet", num_classes=3, per_class_train=2, size=(40, 30))
        spec = CacheSpec.model_validate(
            {
                "dataset": {
                    "kind": "domainnet",
                    "root": str(root),
                    "splits": ["clipart_train", "sketch_train"],
                },
                "teacher": {"name": "test_vit", "weights": "random", "input_size": 32},
                "views": {"num_views": 3, "seed": 1},
                "store": {"unit_rows": 4},
                "run": {"batch_size": 8, "num_workers": 0, "device": "cpu"},
            }
        )
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CUSTOMKD_CACHE_ROOT", str(base / "caches"))
            result = run_cache(spec, spec_path=None, shard=Shard(), progress=False)
            plan = plan_cache(spec, spec_path=None, shard=Shard())
        assert result.complete
        return (plan, RowViews(plan)), result.path

    def test_replay_gives_stage_one_pixels_and_features(self, extracted: tuple[Any, Path]) -> None:
        (plan, row_views), path = extracted
        pre = plan.teacher.preprocess
        features = FeatureSource(path, in_ram=False, standardize=None)
        ds = _replay(
            plan.dataset,
            path,
            features,
            teacher_size=pre.input_size,
            teacher_mean=pre.mean,
            teacher_std=pre.std,
            teacher_interpolation=pre.interpolation,
        )
        store = open_store(path)
        items = [
            (Row(s, r, True), v)
            for s in store.split_names
            for r in range(store.num_samples(s))
            for v in range(store.num_views)
        ]
        ds.set_items(items, epoch=0)
        for k, (row, view) in enumerate(items):
            item = _normalized(ds, ds[k])
            _, _, pixels, boxes, flips = row_views[(row.split, row.row)]
            assert torch.equal(item["teacher_pixels"], pixels[view])
            # the stored feature is the teacher's output on exactly the replayed pixels
            again = plan.teacher.features(item["teacher_pixels"][None])[0].numpy()
            np.testing.assert_allclose(item["feature"].numpy(), again, rtol=2e-3, atol=2e-3)
            np.testing.assert_array_equal(store.read_boxes(row.split)[0][row.row], boxes)


# --- features ------------------------------------------------------------------------------------


class TestFeatureSource:
    def test_ram_and_streaming_give_identical_values(self, cached: tuple[Dataset, Path]) -> None:
        _, path = cached
        store = open_store(path)
        rng = np.random.default_rng(0)
        for standardize in (None, combined_stats(store, list(SPLITS))):
            ram = FeatureSource(path, in_ram=True, standardize=standardize)
            streamed = FeatureSource(path, in_ram=False, standardize=standardize, cache_units=1)
            for split, n in SPLITS.items():
                rows = rng.integers(0, n, 25)
                views = rng.integers(0, VIEWS.num_views, 25)
                np.testing.assert_array_equal(
                    ram.get_many(split, rows, views), streamed.get_many(split, rows, views)
                )
                np.testing.assert_array_equal(ram.all_views(split, rows), streamed.all_views(split, rows))
                got = streamed.get(split, int(rows[0]), int(views[0]))
                assert got.shape == (FEATURE_DIM,) and got.dtype == np.float32
                np.testing.assert_array_equal(got, ram.get_many(split, rows[:1], views[:1])[0])
            raw = store.read_split("src").astype(np.float32)
            if standardize is None:
                np.testing.assert_array_equal(ram.all_views("src", np.arange(SPLITS["src"])), raw)

    def test_streaming_reads_whole_units_through_an_lru(self, cached: tuple[Dataset, Path]) -> None:
        _, path = cached
        source = FeatureSource(path, in_ram=False, standardize=None, cache_units=2)
        reads: list[tuple[str, int]] = []
        store = source.store
        original = store.read_codes

        def counting(split: str, start: int, stop: int) -> np.ndarray:
            assert start % store.unit_rows == 0 and stop - start <= store.unit_rows  # whole units only
            reads.append((split, start // store.unit_rows))
            return original(split, start, stop)

        store.read_codes = counting  # type: ignore[method-assign]
        source.get_many("src", np.array([0, 1, 5, 2, 6, 3]), np.zeros(6, np.int64))
        source.get_many("src", np.array([7, 4, 0]), np.ones(3, np.int64))
        assert reads == [("src", 0), ("src", 1)]
        source.get("src", 9, 0)  # unit 2 evicts the least recently used unit, 0
        source.get("src", 0, 0)
        assert reads[2:] == [("src", 2), ("src", 0)]

    def test_standardization_matches_numpy(self, cached: tuple[Dataset, Path]) -> None:
        _, path = cached
        store = open_store(path)
        every = np.concatenate(
            [store.read_split(s).astype(np.float64).reshape(-1, FEATURE_DIM) for s in SPLITS]
        )
        mean, std = combined_stats(store, list(SPLITS))
        assert mean.dtype == std.dtype == np.float32 and mean.shape == std.shape == (FEATURE_DIM,)
        np.testing.assert_allclose(mean, every.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(std, every.std(0), rtol=1e-5, atol=1e-6)
        assert std[-1] == 0.0  # the constant dimension
        source = FeatureSource(path, in_ram=True, standardize=(mean, std))
        got = source.all_views("tgt", np.arange(SPLITS["tgt"]))
        raw = store.read_split("tgt").astype(np.float32)
        np.testing.assert_allclose(
            got[..., :-1], (raw[..., :-1] - mean[:-1]) / std[:-1], rtol=1e-6, atol=1e-6
        )
        np.testing.assert_array_equal(got[..., -1], 0.0)  # a constant dimension is centred, not divided by 0
        single = combined_stats(store, ["src"])
        np.testing.assert_allclose(single[0], store.stats("src")[0], rtol=1e-6)

    def test_pickles_without_store_handle_or_data(self, cached: tuple[Dataset, Path]) -> None:
        _, path = cached
        source = FeatureSource(path, in_ram=True, standardize=None)
        before = source.all_views("src", np.arange(3))
        state = pickle.dumps(source)
        assert len(state) < 2000  # the path and settings, not the loaded split
        np.testing.assert_array_equal(pickle.loads(state).all_views("src", np.arange(3)), before)

    def test_rows_outside_the_split_are_refused(self, cached: tuple[Dataset, Path]) -> None:
        _, path = cached
        for in_ram in (True, False):
            with pytest.raises(IndexError, match="tgt"):
                FeatureSource(path, in_ram=in_ram, standardize=None).get("tgt", SPLITS["tgt"], 0)


# --- epoch plans ---------------------------------------------------------------------------------


class TestDrawViews:
    def test_deterministic_and_never_the_eval_view(self) -> None:
        rows = _rows("src", 500, True)
        a = draw_views(seed=1, epoch=3, rows=rows, num_views=4)
        assert a.shape == (500,) and a.dtype == np.int64
        np.testing.assert_array_equal(a, draw_views(seed=1, epoch=3, rows=rows, num_views=4))
        assert set(a.tolist()) == {1, 2, 3}
        assert not np.array_equal(a, draw_views(seed=1, epoch=4, rows=rows, num_views=4))
        assert not np.array_equal(a, draw_views(seed=2, epoch=3, rows=rows, num_views=4))
        np.testing.assert_array_equal(draw_views(seed=1, epoch=3, rows=rows, num_views=1), 0)
        np.testing.assert_array_equal(draw_views(seed=1, epoch=3, rows=rows, num_views=2), 1)

    def test_include_eval_draws_every_view(self) -> None:
        rows = _rows("src", 500, True)
        a = draw_views(seed=1, epoch=3, rows=rows, num_views=4, include_eval=True)
        assert set(a.tolist()) == {0, 1, 2, 3}
        np.testing.assert_array_equal(
            a, draw_views(seed=1, epoch=3, rows=rows, num_views=4, include_eval=True)
        )


class TestStageBBatches:
    labeled = _rows("src", 23, True)
    unlabeled = _rows("tgt", 101, False)

    def plan(self, **kw: Any) -> list[list[Row]]:
        args: dict[str, Any] = dict(
            labeled=self.labeled, unlabeled=self.unlabeled, batch_size=8, labeled_share=0.25, seed=0, epoch=0
        )
        return stage_b_batches(**(args | kw))

    @pytest.mark.parametrize("block_rows", [None, 8])
    def test_one_pass_over_unlabeled_with_a_labeled_share(self, block_rows: int | None) -> None:
        batches = self.plan(block_rows=block_rows)
        unl = [r for b in batches for r in b if not r.labeled]
        assert sorted(r.row for r in unl) == list(range(101))
        assert all(sum(r.labeled for r in b) == 2 for b in batches)
        assert all(len(b) == 8 for b in batches[:-1]) and len(batches) == -(-101 // 6)
        assert all(not r.labeled for b in batches for r in b[2:])
        # labeled rows cycle through whole passes: counts differ by at most one
        counts = np.bincount([r.row for b in batches for r in b if r.labeled], minlength=23)
        assert counts.max() - counts.min() <= 1

    def test_at_least_one_labeled_row(self) -> None:
        assert all(sum(r.labeled for r in b) == 1 for b in self.plan(labeled_share=0.01))
        assert all(sum(r.labeled for r in b) == 7 for b in self.plan(labeled_share=1.0))

    def test_deterministic_from_seed_and_epoch(self) -> None:
        assert self.plan() == self.plan()
        assert self.plan() != self.plan(epoch=1)
        assert self.plan() != self.plan(seed=1)

    def test_labeled_only(self) -> None:
        batches = self.plan(unlabeled=[])
        assert sorted(r.row for b in batches for r in b) == list(range(23))
        assert [len(b) for b in batches] == [8, 8, 7]

    def test_block_mode_touches_few_units_per_batch(self) -> None:
        unlabeled = _rows("tgt", 2000, False)
        block, window = 16, 2
        kw: dict[str, Any] = dict(unlabeled=unlabeled, labeled=_rows("src", 300, True), batch_size=32)
        blocked = self.plan(block_rows=block, window_blocks=window, **kw)
        shuffled = self.plan(**kw)

        def units(batch: list[Row], labeled: bool) -> int:
            return len({r.row // block for r in batch if r.labeled == labeled})

        for part in (True, False):
            assert max(units(b, part) for b in blocked) <= 2 * window
            assert np.mean([units(b, part) for b in shuffled]) > 2 * window
        assert sorted(r.row for b in blocked for r in b if not r.labeled) == list(range(2000))
        # block order is shuffled too: the epoch does not walk the store front to back
        first_units = [blocked[i][-1].row // block for i in range(0, len(blocked), 10)]
        assert first_units != sorted(first_units)
        # and rows are shuffled within a window: a block's rows in a batch are rarely in store order
        runs = [
            [r.row for r in b if not r.labeled and r.row // block == u] for b in blocked for u in range(125)
        ]
        ascending = [bool(np.all(np.diff(run) > 0)) for run in runs if len(run) >= 4]
        assert len(ascending) > 50 and np.mean(ascending) < 0.2

    def test_epoch_items_flatten_the_plan(self) -> None:
        batches = self.plan()
        rows = [r for b in batches for r in b]
        views = draw_views(seed=0, epoch=0, rows=rows, num_views=4)
        items, index_batches = epoch_items(batches, views)
        assert [items[i][0] for b in index_batches for i in b] == rows
        assert [len(b) for b in index_batches] == [len(b) for b in batches]
        assert [v for _, v in items] == views.tolist()


# --- loading -------------------------------------------------------------------------------------


def _collect(loader: Any) -> list[dict[str, Any]]:
    return [batch for batch in loader]


def _assert_same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def _plan_items() -> tuple[list[tuple[Row, int]], list[list[int]]]:
    batches = stage_b_batches(
        labeled=_rows("src", SPLITS["src"], True),
        unlabeled=_rows("tgt", SPLITS["tgt"], False),
        batch_size=4,
        labeled_share=0.5,
        seed=0,
        epoch=2,
        block_rows=UNIT_ROWS,
    )
    rows = [r for b in batches for r in b]
    return epoch_items(batches, draw_views(seed=0, epoch=2, rows=rows, num_views=VIEWS.num_views))


class TestLoader:
    def test_two_workers_give_the_same_batches_as_none(self, cached: tuple[Dataset, Path]) -> None:
        dataset, path = cached
        ds = _replay(
            dataset, path, FeatureSource(path, in_ram=False, standardize=None), photometric=True, seed=3
        )
        items, batches = _plan_items()
        ds.set_items(items, epoch=2)
        inline = _collect(make_loader(ds, batch_size=None, batches=batches, num_workers=0, seed=1))
        assert ds._store._store is not None  # noqa: SLF001 - this process read boxes itself
        fresh = _replay(
            dataset, path, FeatureSource(path, in_ram=False, standardize=None), photometric=True, seed=3
        )
        fresh.set_items(items, epoch=2)
        workers = _collect(make_loader(fresh, batch_size=None, batches=batches, num_workers=2, seed=1))
        _assert_same_batches(inline, workers)
        # the workers opened the store themselves: the parent never did
        assert fresh._store._store is None and fresh.features is not None  # noqa: SLF001
        assert fresh.features._store._store is None  # noqa: SLF001
        assert inline[0]["pixels"].shape == (4, 3, STUDENT.size, STUDENT.size)
        assert inline[0]["pixels"].dtype == torch.uint8  # normalized on the training device
        assert inline[0]["feature"].shape == (4, FEATURE_DIM) and inline[0]["feature"].dtype == torch.float32
        assert inline[0]["label"].dtype == torch.int64 and inline[0]["labeled"].dtype == torch.bool
        flat = [
            (ds.split_names[s], r, v)
            for b in inline
            for s, r, v in zip(b["split_index"].tolist(), b["row"].tolist(), b["view"].tolist(), strict=True)
        ]
        assert flat == [(row.split, row.row, v) for row, v in items]

    def test_sequential_batches_for_evaluation(self, cached: tuple[Dataset, Path]) -> None:
        dataset, path = cached
        ds = _replay(dataset, path, FeatureSource(path, in_ram=True, standardize=None))
        ds.set_items(eval_items("src", SPLITS["src"]), epoch=0)
        batches = _collect(make_loader(ds, batch_size=4, batches=None, num_workers=2, seed=0))
        assert [len(b["row"]) for b in batches] == [4, 4, 2]
        assert torch.cat([b["row"] for b in batches]).tolist() == list(range(SPLITS["src"]))
        with pytest.raises(ValueError, match="exactly one"):
            make_loader(ds, batch_size=4, batches=[[0]], num_workers=0, seed=0)

    def test_workers_share_what_the_parent_preloaded(
        self, cached: tuple[Dataset, Path], tmp_path: Path
    ) -> None:
        dataset, path = cached
        items, batches = _plan_items()
        expected = _replay(dataset, path, FeatureSource(path, in_ram=True, standardize=None))
        expected.set_items(items, epoch=2)
        want = _collect(make_loader(expected, batch_size=None, batches=batches, num_workers=0, seed=0))
        copy = tmp_path / "gone.zarr"
        shutil.copytree(path, copy)
        features = FeatureSource(copy, in_ram=True, standardize=None)
        ds = _replay(dataset, copy, features)
        features.preload(list(SPLITS))
        ds.preload(list(SPLITS))
        shutil.rmtree(copy)  # forked workers must not need the store any more
        ds.set_items(items, epoch=2)
        _assert_same_batches(
            want, _collect(make_loader(ds, batch_size=None, batches=batches, num_workers=2, seed=0))
        )

    def test_pickled_dataset_gives_the_same_items(self, cached: tuple[Dataset, Path]) -> None:
        dataset, path = cached
        ds = _replay(dataset, path, FeatureSource(path, in_ram=True, standardize=None), photometric=True)
        ds.set_items(_all_items(), epoch=4)
        first = ds[5]
        copy = pickle.loads(pickle.dumps(ds))  # what a spawn worker receives
        assert not copy._views and not copy.features._splits  # noqa: SLF001 - the loaded data stayed behind
        again = copy[5]
        assert all(torch.equal(torch.as_tensor(first[k]), torch.as_tensor(again[k])) for k in first)


@pytest.fixture
def read_only_store(cached: tuple[Dataset, Path], tmp_path: Path) -> Iterator[Path]:
    _, path = cached
    copy = tmp_path / "ro.zarr"
    shutil.copytree(path, copy)
    modes = {p: p.stat().st_mode for p in [copy, *copy.rglob("*")]}
    for p in modes:
        p.chmod(stat.S_IMODE(modes[p]) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield copy
    finally:
        for p, mode in modes.items():
            p.chmod(stat.S_IMODE(mode))


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in [path, *path.rglob("*")]
    }


def test_works_from_a_read_only_store(cached: tuple[Dataset, Path], read_only_store: Path) -> None:
    dataset, path = cached
    before = _tree(read_only_store)
    items, batches = _plan_items()
    results = []
    for store_path in (path, read_only_store):
        for in_ram in (True, False):
            ds = _replay(dataset, store_path, FeatureSource(store_path, in_ram=in_ram, standardize=None))
            ds.set_items(items, epoch=2)
            results.append(_collect(make_loader(ds, batch_size=None, batches=batches, num_workers=2, seed=0)))
    for other in results[1:]:
        _assert_same_batches(results[0], other)
    # nothing was written (root ignores the mode bits, so check the tree as well)
    assert _tree(read_only_store) == before
    assert os.access(read_only_store, os.W_OK) == (os.geteuid() == 0)
