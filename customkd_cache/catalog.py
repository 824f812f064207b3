"""Cache identity: the fingerprint of everything that changes the stored values.

A store is named by ``sha256(canonical_json(identity))`` where ``identity`` holds the dataset
manifest digest, the teacher's identity (source, name, weights digest, preprocessing resolved from
the model, feature kind, precision), the view policy and seed, the stored dtype and layout, and the
format version. Run settings (batch size, workers, device) are not identity. If any part cannot be
computed the caller fails: there is no random fallback key.

A second, cheaper digest, the *request key*, identifies a cache spec as written (manifest digest plus
the teacher, views and store sections of the spec). Stage two uses it to find the store made from a
cache spec without building the teacher; the store's fingerprint stays the authority. The ``[store]``
section (dtype, unit_rows, compressor) is how features are stored, not what they are: it stays in
both digests (the bytes differ), and stage two also accepts a store whose key is the spec's with the
store's own recorded ``[store]`` section (``request_key_with_storage``), so a store made with
``--set store.dtype=int8`` is still found from the spec.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from customkd_cache import FORMAT_VERSION
from customkd_cache.errors import StoreError
from customkd_cache.specs import (
    CacheSpec,
    StoreSpec,
    TrainSpec,
    cache_root,
    differing_keys,
    load_cache_spec,
    spec_relative_path,
    to_dict,
)
from customkd_cache.store import FeatureStore, open_store, store_dirs

if TYPE_CHECKING:
    from customkd_cache.data.datasets import Manifest


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def split_digests(manifest: Manifest) -> dict[str, str]:
    """Per split, the sha256 of what the store's rows of that split are: the dataset kind, the class
    names (labels index them), and the split's ids, labels and sizes in order.

    A split's digest does not depend on the other splits listed, so a store made over every split of
    a dataset serves a train spec that lists a few of them.
    """
    data = manifest.to_json()
    return {
        s["name"]: sha256_json(
            {
                "kind": data["kind"],
                "classes": data["classes"],
                "ids": s["ids"],
                "labels": s["labels"],
                "sizes": s["sizes"],
            }
        )
        for s in data["splits"]
    }


def dataset_identity(
    *, kind: str, manifest_digest: str, splits: dict[str, int], digests: dict[str, str] | None = None
) -> dict[str, Any]:
    """The dataset part of the identity: the manifest digest covers ids, labels, sizes and skips of
    every split together; ``split_digests`` (``split_digests``) each split alone."""
    identity: dict[str, Any] = {"kind": kind, "manifest_digest": manifest_digest, "num_samples": dict(splits)}
    if digests is not None:
        identity["split_digests"] = dict(digests)
    return identity


def recorded_split_digests(identity: dict[str, Any]) -> dict[str, str] | None:
    """The per-split digests a store's identity records, or None for a store made before they were
    recorded (or with a malformed entry): such a store matches on the whole manifest digest only."""
    dataset = identity.get("dataset")
    digests = dataset.get("split_digests") if isinstance(dataset, dict) else None
    if not isinstance(digests, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in digests.items()
    ):
        return None
    return dict(digests)


def cache_identity(*, spec: CacheSpec, dataset: dict[str, Any], teacher: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes the stored values, as one JSON-able dict."""
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "teacher": teacher,
        "views": to_dict(spec.views),
        "store": to_dict(spec.store),
    }


def fingerprint(identity: dict[str, Any]) -> str:
    return sha256_json(identity)


def _written_teacher(spec: CacheSpec) -> dict[str, Any]:
    teacher = to_dict(spec.teacher)
    # Added after the first stores were written: its default stays out of the key, so those stores
    # are still found.
    if teacher.get("pos_embed_antialias") is True:
        del teacher["pos_embed_antialias"]
    return teacher


def request_key(*, spec: CacheSpec, manifest_digest: str) -> str:
    """Digest of a cache spec as written (not its resolved teacher) for one manifest: how stores made
    before per-split digests are found (``teacher_key`` and the split digests find newer ones)."""
    return sha256_json(
        {
            "format_version": FORMAT_VERSION,
            "manifest_digest": manifest_digest,
            "teacher": _written_teacher(spec),
            "views": to_dict(spec.views),
            "store": to_dict(spec.store),
        }
    )


def teacher_key(*, spec: CacheSpec) -> str:
    """Digest of a cache spec's teacher, views and store sections as written (no dataset): a store
    recording it serves a train spec whose splits it holds with equal ``split_digests``."""
    return sha256_json(
        {
            "format_version": FORMAT_VERSION,
            "dataset_kind": spec.dataset.kind,
            "teacher": _written_teacher(spec),
            "views": to_dict(spec.views),
            "store": to_dict(spec.store),
        }
    )


def teacher_key_with_storage(*, spec: CacheSpec, storage: StoreSpec) -> str:
    """``teacher_key`` of ``spec`` with its ``[store]`` section replaced by ``storage``."""
    return teacher_key(spec=spec.model_copy(update={"store": storage}))


def request_key_with_storage(*, spec: CacheSpec, manifest_digest: str, storage: StoreSpec) -> str:
    """The request key of ``spec`` with its ``[store]`` section replaced by ``storage``.

    A store whose request key equals this for its own ``recorded_storage`` was made from ``spec``
    with another storage encoding (say ``--set store.dtype=int8``): the same features.
    """
    return request_key(spec=spec.model_copy(update={"store": storage}), manifest_digest=manifest_digest)


def recorded_storage(identity: dict[str, Any]) -> StoreSpec | None:
    """The ``[store]`` section a store's identity records (``cache_identity``), or None when it is
    missing or not valid for this version (such a store can then only match a request key exactly)."""
    try:
        return StoreSpec.model_validate(identity.get("store"))
    except ValidationError:
        return None


# --- resolving the cache -----------------------------------------------------------------------


def find_store(spec: TrainSpec, *, spec_path: Path | None, manifest_digest: str) -> Path:
    """The store this train spec reads: ``cache.store``, or the one made from ``cache.spec``.

    A store made from the cache spec with other ``[store]`` settings (``--set store.dtype=int8``)
    holds the same features, so it matches too. Preferred, in order: the exact request key, then the
    spec's ``store.dtype``, then any storage.

    Raises StoreError when no store under CUSTOMKD_CACHE_ROOT was made from the cache spec for this
    dataset (naming the stores of the same samples and teacher, and how they differ), or when several
    tie (naming each with its storage).
    """
    if spec.cache.store:
        return spec_relative_path(spec.cache.store, spec_path)
    cspec_path = spec_relative_path(spec.cache.spec, spec_path)
    cspec = load_cache_spec(cspec_path, []).model_copy(update={"dataset": spec.dataset})
    root = cache_root()
    stores = [c for path in store_dirs(root) if (c := _read_listed(path)) is not None]
    exact = request_key(spec=cspec, manifest_digest=manifest_digest)
    found = _made_from(cspec, manifest_digest, exact, stores)
    if not found:
        raise StoreError(
            f"no store under {root} was made from {cspec_path} for this dataset"
            f"{_near_misses(cspec, manifest_digest, stores)}; run "
            f"`customkd-cache cache --spec {cspec_path} --set dataset.root={spec.dataset.root or '...'}` "
            "first, or set cache.store = PATH (CUSTOMKD_CACHE_ROOT must match)"
        )
    best = _preferred(found, cspec, exact)
    if len(best) > 1:
        names = ", ".join(f"{c.path} ({c.storage_label(cspec.store)})" for c in best)
        raise StoreError(f"several stores match {cspec_path} ({names}); set cache.store = PATH to choose one")
    return best[0].path


@dataclass(frozen=True)
class _Listed:
    """A readable store under the cache root, with what ``find_store`` compares."""

    path: Path
    request_key: str
    storage: StoreSpec | None  # its [store] section, as hashed into request_key
    manifest_digest: str
    teacher: str
    written: dict[str, Any]  # the cache spec it was made from (provenance: diagnostics only)

    def storage_label(self, want: StoreSpec) -> str:
        """``int8``, plus the other [store] fields that differ from ``want`` (``int8, unit_rows=16``)."""
        if self.storage is None:
            return "storage unknown"
        have, asked = to_dict(self.storage), to_dict(want)
        return ", ".join(
            [self.storage.dtype] + [f"{k}={v}" for k, v in have.items() if k != "dtype" and v != asked[k]]
        )


def _read_listed(path: Path) -> _Listed | None:
    """The store at ``path`` (its attributes only), or None when it cannot be read: a damaged store
    is never a match, as in ``list_stores``, which reports it as damaged."""
    try:
        attrs = open_store(path).attrs
    except Exception:  # StoreError, or zarr's own errors for a damaged hierarchy
        return None
    identity = attrs.get("identity", {})
    return _Listed(
        path=path,
        request_key=str(attrs.get("request_key") or ""),
        storage=recorded_storage(identity),
        manifest_digest=str(identity.get("dataset", {}).get("manifest_digest", "")),
        teacher=str(identity.get("teacher", {}).get("name", "")),
        written=attrs.get("provenance", {}).get("spec", {}),
    )


def _made_from(cspec: CacheSpec, manifest_digest: str, exact: str, stores: list[_Listed]) -> list[_Listed]:
    """The stores made from ``cspec`` for these samples, with its storage (request key ``exact``) or
    their own."""

    def matches(c: _Listed) -> bool:
        if c.request_key == exact:
            return True
        if c.storage is None:
            return False
        key = request_key_with_storage(spec=cspec, manifest_digest=manifest_digest, storage=c.storage)
        return c.request_key == key

    return [c for c in stores if matches(c)]


def _preferred(found: list[_Listed], cspec: CacheSpec, exact: str) -> list[_Listed]:
    """The first non-empty of: exact request-key matches, matches in the spec's dtype, all of them."""
    same = [c for c in found if c.request_key == exact]
    same_dtype = [c for c in found if c.storage is not None and c.storage.dtype == cspec.store.dtype]
    return same or same_dtype or found


def _near_misses(cspec: CacheSpec, manifest_digest: str, stores: list[_Listed]) -> str:
    """``"; stores for the same samples and teacher: PATH (int8; differs in views.num_views)"`` or ``""``."""
    near = [c for c in stores if c.manifest_digest == manifest_digest and c.teacher == cspec.teacher.name]
    if not near:
        return ""
    asked = {k: to_dict(cspec)[k] for k in ("teacher", "views")}

    def describe(c: _Listed) -> str:
        differs = differing_keys({k: c.written.get(k) for k in asked}, asked)
        shown = f"; differs in {', '.join(differs)}" if differs else ""
        return f"{c.path} ({c.storage_label(cspec.store)}{shown})"

    return f"; stores for the same samples and teacher: {', '.join(describe(c) for c in near)}"


def check_store(
    store: FeatureStore, *, spec: TrainSpec, spec_path: Path | None, manifest_digest: str
) -> None:
    """Refuse a store that is incomplete, from another teacher/feature kind, or for other samples."""
    store.require_complete()  # names the missing units and the cache command that finishes them
    identity = store.attrs.get("identity", {})
    got = identity.get("dataset", {}).get("manifest_digest")
    if got != manifest_digest:
        raise StoreError(
            f"{store.path}: cache was made for other samples (manifest {str(got)[:12]}, this dataset "
            f"{manifest_digest[:12]}); check dataset.root/splits or rebuild the cache"
        )
    if spec.cache.spec:
        cspec = load_cache_spec(spec_relative_path(spec.cache.spec, spec_path), [])
        teacher = identity.get("teacher", {})
        want = {"source": cspec.teacher.source, "name": cspec.teacher.name, "feature": cspec.teacher.feature}
        have = {k: teacher.get(k) for k in want}
        if have != want:
            raise StoreError(
                f"{store.path}: cache was made by teacher {have}, but {spec.cache.spec} asks for {want}; "
                "point cache.store at the right store or rebuild"
            )
