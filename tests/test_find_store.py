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

from customkd_cache.catalog import cache_identity, find_store, fingerprint, request_key
from customkd_cache.errors import StoreError
from customkd_cache.specs import CacheSpec, load_cache_spec, load_train_spec, to_dict
from customkd_cache.store import SplitInit, create_or_open_store, store_name

REPO = Path(__file__).resolve().parents[1]
TRAIN_SPEC = REPO / "pipelines" / "smoke" / "officehome.toml"
CACHE_SPEC = REPO / "cache_specs" / "smoke" / "officehome.toml"  # the one TRAIN_SPEC names
DIGEST = "0" * 64  # the manifest digest of "this dataset"


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path))
    return tmp_path


def make_store(root: Path, *sets: str, digest: str = DIGEST) -> Path:
    """An empty store with the identity, request key and provenance that ``cache`` with ``sets`` writes."""
    spec = load_cache_spec(CACHE_SPEC, list(sets))
    identity = cache_identity(
        spec=spec,
        dataset={"kind": "officehome", "manifest_digest": digest, "num_samples": {"Art": 2}},
        teacher={"source": "timm", "name": spec.teacher.name, "feature": spec.teacher.feature},
    )
    fp = fingerprint(identity)
    path = root / store_name(dataset="officehome", teacher=spec.teacher.name, fingerprint=fp)
    create_or_open_store(
        path,
        fingerprint=fp,
        identity=identity,
        provenance={"spec": to_dict(spec)},
        splits={"Art": SplitInit(ids=["a", "b"], labels=np.zeros(2, np.int64))},
        num_views=spec.views.num_views,
        feature_dim=4,
        dtype=spec.store.dtype,
        unit_rows=spec.store.unit_rows,
        compressor=spec.store.compressor,
        extra_attrs={"request_key": request_key(spec=spec, manifest_digest=digest)},
    )
    return path


def find(*sets: str) -> Path:
    spec = load_train_spec(TRAIN_SPEC, ["dataset.root=OfficeHome", *sets])
    return find_store(spec, spec_path=TRAIN_SPEC, manifest_digest=DIGEST)


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


class TestWhatIsStillRefused:
    def test_other_views_teacher_or_samples_are_not_found(self, root: Path) -> None:
        make_store(root, "views.num_views=5")
        make_store(root, "teacher.input_size=48")
        make_store(root, digest="1" * 64)
        with pytest.raises(StoreError, match="no store under"):
            find()

    def test_the_miss_names_stores_of_the_same_samples_and_teacher(self, root: Path) -> None:
        near = make_store(root, "views.num_views=5", "store.dtype=int8")
        other_samples = make_store(root, digest="1" * 64)
        with pytest.raises(StoreError, match="no store under") as err:
            find()
        msg = str(err.value)
        assert f"{near} (int8; differs in views.num_views)" in msg
        assert str(other_samples) not in msg and "\n" not in msg

    def test_an_empty_root_gives_the_plain_miss(self, root: Path) -> None:
        with pytest.raises(StoreError, match="no store under") as err:
            find()
        assert "same samples" not in str(err.value)


def test_store_names_and_request_keys_are_unchanged() -> None:
    """Golden values: the lookup changed, not the identity of any existing store."""
    spec = load_cache_spec(CACHE_SPEC, [])
    int8: CacheSpec = load_cache_spec(CACHE_SPEC, ["store.dtype=int8"])
    dataset = {"kind": "officehome", "manifest_digest": DIGEST, "num_samples": {"Art": 1}}
    identity = cache_identity(spec=spec, dataset=dataset, teacher={"name": "test_vit"})
    assert fingerprint(identity) == "c4f5bc60911aa302b1b78c76bb83463fa2b2aad01665adfc3bcef14bdebe2ed6"
    assert request_key(spec=spec, manifest_digest=DIGEST) == (
        "bd622335a404eea942ab7204d2c878084ebba2acac8ee5b96decfd8fa479af8b"
    )
    assert request_key(spec=int8, manifest_digest=DIGEST) == (
        "b78ecc9fc0a76bc47b6ac60643fd7d4e9b907a0708b0418db18cf3391292d970"
    )
