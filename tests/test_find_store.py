"""Stage two finds the store made from ``cache.spec``, whatever its ``[store]`` settings.

The storage encoding (dtype, unit_rows, compressor) is how features are stored, not what they are: a
store made with ``--set store.dtype=int8`` is the same request as the spec. Preferred, in order: the
exact request key, then the spec's dtype, else a tie is refused naming each store's storage. The
stores here are empty placeholders with the attributes stage one writes (``find_store`` reads only
those); tests/test_int8.py trains from a real int8 store through the CLI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from customkd_cache.catalog import (
    _check_rows,
    cache_identity,
    dataset_identity,
    find_store,
    fingerprint,
    request_key,
    split_digests,
    teacher_key,
)
from customkd_cache.data import Manifest, Sample, SplitManifest
from customkd_cache.errors import StoreError
from customkd_cache.specs import CacheSpec, load_cache_spec, load_train_spec, to_dict
from customkd_cache.store import SplitInit, create_or_open_store, store_name

REPO = Path(__file__).resolve().parents[1]
TRAIN_SPEC = REPO / "pipelines" / "smoke" / "officehome.toml"
CACHE_SPEC = REPO / "cache_specs" / "smoke" / "officehome.toml"  # the one TRAIN_SPEC names
CLASSES = ("Alarm_Clock", "Backpack")


def manifest(*splits: str, size: int = 10) -> Manifest:
    """An OfficeHome manifest of two images per listed split."""
    return Manifest(
        "officehome",
        CLASSES,
        tuple(
            SplitManifest(s, tuple(Sample(f"{s}/{c}/0.jpg", i, size) for i, c in enumerate(CLASSES)))
            for s in splits
        ),
    )


ALL = manifest("Art", "Clipart", "Product", "Real_World")  # what `make cache` lists
THIS = manifest("Art", "Clipart", "Product", "Real_World")  # the train spec's dataset (no splits listed)
DIGEST = THIS.digest()  # the manifest digest of "this dataset"


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path))
    return tmp_path


def make_store(
    root: Path, *sets: str, made_over: Manifest = ALL, legacy: bool = False, precision: str | None = None
) -> Path:
    """An empty store with the identity, keys and provenance that ``cache`` with ``sets`` writes over
    the dataset ``made_over``; ``legacy``: as stores made before split digests (no teacher_key);
    ``precision``: what the teacher's precision resolved to (the identity's ``teacher.precision``)."""
    spec = load_cache_spec(CACHE_SPEC, list(sets))
    digests = None if legacy else split_digests(made_over)
    identity = cache_identity(
        spec=spec,
        dataset=dataset_identity(
            kind="officehome",
            manifest_digest=made_over.digest(),
            splits={s.name: len(s) for s in made_over.splits},
            digests=digests,
        ),
        teacher={"source": "timm", "name": spec.teacher.name, "feature": spec.teacher.feature}
        | ({"precision": precision} if precision else {}),
    )
    fp = fingerprint(identity)
    path = root / store_name(dataset="officehome", teacher=spec.teacher.name, fingerprint=fp)
    extra = {"request_key": request_key(spec=spec, manifest_digest=made_over.digest())}
    if not legacy:
        extra["teacher_key"] = teacher_key(spec=spec)
    create_or_open_store(
        path,
        fingerprint=fp,
        identity=identity,
        provenance={"spec": to_dict(spec)},
        splits={s.name: SplitInit(ids=list(s.ids()), labels=s.labels()) for s in made_over.splits},
        num_views=spec.views.num_views,
        feature_dim=4,
        dtype=spec.store.dtype,
        unit_rows=spec.store.unit_rows,
        compressor=spec.store.compressor,
        extra_attrs=extra,
    )
    return path


def find(*sets: str, dataset: Manifest = THIS) -> Path:
    spec = load_train_spec(TRAIN_SPEC, ["dataset.root=OfficeHome", *sets])
    return find_store(spec, spec_path=TRAIN_SPEC, manifest=dataset)


class TestStorageIsNotIdentity:
    def test_the_exact_store_is_found(self, root: Path) -> None:
        made = make_store(root)
        assert find() == made

    @pytest.mark.parametrize(
        "sets",
        [
            ("store.dtype=int8",),
            ("store.dtype=float32",),
            ("store.unit_rows=16",),
            ("store.compressor=none",),
        ],
    )
    def test_a_store_with_other_storage_is_found(self, root: Path, sets: tuple[str, ...]) -> None:
        made = make_store(root, *sets)
        assert find() == made

    def test_the_exact_store_is_preferred(self, root: Path) -> None:
        make_store(root, "store.dtype=int8")
        exact = make_store(root)
        make_store(root, "store.unit_rows=16")
        assert find() == exact

    def test_the_spec_dtype_is_preferred(self, root: Path) -> None:
        make_store(root, "store.dtype=int8")
        same_dtype = make_store(root, "store.unit_rows=16")  # the spec's float16, other chunks
        assert find() == same_dtype

    def test_a_tie_in_other_dtypes_names_each_store_and_its_dtype(self, root: Path) -> None:
        int8 = make_store(root, "store.dtype=int8")
        f32 = make_store(root, "store.dtype=float32", "store.compressor=none")
        with pytest.raises(StoreError, match="several stores match") as err:
            find()
        msg = str(err.value)
        assert f"{int8} (int8)" in msg and f"{f32} (float32, compressor=none)" in msg
        assert "set cache.store = PATH" in msg and "\n" not in msg

    def test_cache_store_still_wins(self, root: Path) -> None:
        make_store(root)
        int8 = make_store(root, "store.dtype=int8")
        assert find(f"cache.store={int8}") == int8


def cache_spec_with(tmp_path: Path, precision: str) -> Path:
    """A copy of CACHE_SPEC asking for ``teacher.precision = precision``."""
    path = tmp_path / f"cache_{precision}.toml"
    text = CACHE_SPEC.read_text(encoding="utf-8")
    path.write_text(
        text.replace('feature = "cls"', f'feature = "cls"\nprecision = "{precision}"'), encoding="utf-8"
    )
    return path


class TestPrecision:
    """``auto`` and ``fp32`` share a key (stores made before ``auto`` are found); the identity's
    precision decides which specs a store serves."""

    def find_with(self, cspec: Path) -> Path:
        spec = load_train_spec(TRAIN_SPEC, ["dataset.root=OfficeHome", f"cache.spec={cspec}"])
        return find_store(spec, spec_path=TRAIN_SPEC, manifest=THIS)

    def test_an_fp32_store_serves_auto_and_fp32(self, tmp_path: Path, root: Path) -> None:
        made = make_store(root, "teacher.precision=fp32", precision="fp32")
        assert find() == made  # CACHE_SPEC leaves precision at "auto"
        assert self.find_with(cache_spec_with(tmp_path, "fp32")) == made

    def test_a_bf16_store_serves_auto_and_bf16_but_never_fp32(self, tmp_path: Path, root: Path) -> None:
        made = make_store(root, precision="bf16-autocast")  # "auto" on a GPU
        assert find() == made
        with pytest.raises(StoreError, match="no store under"):
            self.find_with(cache_spec_with(tmp_path, "fp32"))
        bf16 = make_store(root, "teacher.precision=bf16", precision="bf16-autocast")
        assert self.find_with(cache_spec_with(tmp_path, "bf16")) == bf16

    def test_an_fp32_and_a_bf16_store_of_one_auto_spec_are_a_tie_naming_each(self, root: Path) -> None:
        cpu = make_store(root, precision="fp32")
        gpu = make_store(root, precision="bf16-autocast")
        with pytest.raises(StoreError, match="several stores match") as err:
            find()
        assert f"{cpu} (float16, fp32)" in str(err.value) and f"{gpu} (float16, bf16-autocast)" in str(
            err.value
        )

    def test_a_precision_that_auto_cannot_give_is_a_forged_store(self, root: Path) -> None:
        with pytest.raises(StoreError, match="precision"):
            make_store(root, precision="tf32")  # provenance says auto: auto never resolves to tf32


class TestWhatIsStillRefused:
    def test_other_views_teacher_or_samples_are_not_found(self, root: Path) -> None:
        make_store(root, "views.num_views=5")
        make_store(root, "teacher.input_size=48")
        make_store(root, made_over=manifest("Art", "Clipart", "Product", "Real_World", size=11))
        with pytest.raises(StoreError, match="no store under"):
            find()

    def test_the_miss_names_stores_of_the_same_samples_and_teacher(self, root: Path) -> None:
        near = make_store(root, "views.num_views=5", "store.dtype=int8")
        other = make_store(root, made_over=manifest("Art", "Clipart", "Product", "Real_World", size=11))
        with pytest.raises(StoreError, match="no store under") as err:
            find()
        msg = str(err.value)
        assert f"{near} (int8; differs in views.num_views)" in msg
        assert f"{other} (float16; other samples in split Art, Clipart, Product, Real_World" in msg
        assert "\n" not in msg

    def test_an_empty_root_gives_the_plain_miss(self, root: Path) -> None:
        with pytest.raises(StoreError, match="no store under") as err:
            find()
        assert "same teacher" not in str(err.value)
        assert f"run `customkd-cache cache --spec {CACHE_SPEC} --set dataset.root=OfficeHome` first" in str(
            err.value
        )


class TestPerSplitIdentity:
    """One store over every split serves each train spec that lists some of them."""

    def test_a_store_over_every_split_serves_a_pair(self, root: Path) -> None:
        made = make_store(root)
        assert find("dataset.splits=['Art', 'Clipart']", dataset=manifest("Art", "Clipart")) == made
        assert (
            find("dataset.splits=['Product', 'Real_World']", dataset=manifest("Product", "Real_World"))
            == made
        )

    def test_a_split_the_store_lacks_is_named_with_the_command(self, root: Path) -> None:
        made = make_store(root, made_over=manifest("Art", "Clipart"))
        with pytest.raises(StoreError, match="no store under") as err:
            find("dataset.splits=['Art', 'Product']", dataset=manifest("Art", "Product"))
        msg = str(err.value)
        assert f"{made} (float16; lacks split Product)" in msg and "\n" not in msg
        assert f"--spec {CACHE_SPEC} --set dataset.root=OfficeHome`" in msg

    def test_a_cache_spec_listing_too_few_splits_gets_them_added(self, tmp_path: Path, root: Path) -> None:
        cspec = tmp_path / "cache.toml"
        cspec.write_text(
            CACHE_SPEC.read_text(encoding="utf-8").replace(
                'root = "officehome"', 'root = "officehome"\nsplits = ["Art"]'
            ),
            encoding="utf-8",
        )
        spec = load_train_spec(TRAIN_SPEC, [f"cache.spec={cspec}", "dataset.max_per_split=5"])
        with pytest.raises(StoreError) as err:
            find_store(spec, spec_path=TRAIN_SPEC, manifest=THIS)
        assert (
            f'`customkd-cache cache --spec {cspec} --set \'dataset.splits=["Art", "Clipart", "Product", '
            '"Real_World"]\' --set dataset.max_per_split=5`'
        ) in str(err.value)

    def test_a_store_made_before_split_digests_is_found_on_its_manifest(self, root: Path) -> None:
        old = make_store(root, legacy=True)
        assert find() == old
        with pytest.raises(StoreError, match="made before per-split digests"):
            find("dataset.splits=['Art', 'Clipart']", dataset=manifest("Art", "Clipart"))

    def test_a_store_with_unreadable_identity_is_skipped(self, root: Path) -> None:
        made = make_store(root)
        zarr_json = made / "zarr.json"
        zarr_json.write_text(
            zarr_json.read_text(encoding="utf-8").replace('"identity"', '"identity_x"'), "utf-8"
        )
        with pytest.raises(StoreError, match="no store under"):
            find()


class _Rows:
    """What ``_check_rows`` reads of a store."""

    def __init__(self, ids: list[str], labels: list[int]) -> None:
        self.path = Path("s.zarr")
        self._ids, self._labels = tuple(ids), np.array(labels, np.int64)

    def ids(self, split: str) -> tuple[str, ...]:
        return self._ids

    def labels(self, split: str) -> np.ndarray:
        return self._labels

    def require_intact(self, split: str, rows: list[int]) -> None:
        """Every unit's checksums hold (the labels were changed and their checksum recomputed)."""


class TestStoreRowsAgainstTheDataset:
    split = THIS.split("Art")

    def test_equal_rows_pass(self) -> None:
        _check_rows(_Rows(list(self.split.ids()), [0, 1]), self.split)  # type: ignore[arg-type]

    def test_shifted_labels_are_refused_naming_the_first_row(self) -> None:
        with pytest.raises(StoreError, match="labels differ from the dataset's in 2 row") as err:
            _check_rows(_Rows(list(self.split.ids()), [1, 0]), self.split)  # type: ignore[arg-type]
        assert "'Art/Alarm_Clock/0.jpg' is 1 in the store, 0 in the dataset" in str(err.value)

    def test_other_ids_are_refused(self) -> None:
        with pytest.raises(StoreError, match="ids differ from the dataset's from row 1"):
            _check_rows(_Rows(["Art/Alarm_Clock/0.jpg", "x"], [0, 1]), self.split)  # type: ignore[arg-type]


def test_store_names_and_request_keys_are_unchanged() -> None:
    """Golden values: the lookup changed, not the identity of any existing store."""
    spec = load_cache_spec(CACHE_SPEC, [])
    ZEROS = "0" * 64  # noqa: N806
    int8: CacheSpec = load_cache_spec(CACHE_SPEC, ["store.dtype=int8"])
    dataset = {"kind": "officehome", "manifest_digest": ZEROS, "num_samples": {"Art": 1}}
    identity = cache_identity(spec=spec, dataset=dataset, teacher={"name": "test_vit"})
    assert fingerprint(identity) == "c4f5bc60911aa302b1b78c76bb83463fa2b2aad01665adfc3bcef14bdebe2ed6"
    assert request_key(spec=spec, manifest_digest=ZEROS) == (
        "bd622335a404eea942ab7204d2c878084ebba2acac8ee5b96decfd8fa479af8b"
    )
    assert request_key(spec=int8, manifest_digest=ZEROS) == (
        "b78ecc9fc0a76bc47b6ac60643fd7d4e9b907a0708b0418db18cf3391292d970"
    )
