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
from typing import Any

from pydantic import ValidationError

from customkd_cache import FORMAT_VERSION
from customkd_cache.specs import CacheSpec, StoreSpec, to_dict


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def dataset_identity(*, kind: str, manifest_digest: str, splits: dict[str, int]) -> dict[str, Any]:
    """The dataset part of the identity: the manifest digest covers ids, labels, sizes and skips."""
    return {"kind": kind, "manifest_digest": manifest_digest, "num_samples": dict(splits)}


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


def request_key(*, spec: CacheSpec, manifest_digest: str) -> str:
    """Digest of a cache spec as written (not its resolved teacher): used to find its store."""
    teacher = to_dict(spec.teacher)
    # Added after the first stores were written: its default stays out of the key, so those stores
    # are still found.
    if teacher.get("pos_embed_antialias") is True:
        del teacher["pos_embed_antialias"]
    return sha256_json(
        {
            "format_version": FORMAT_VERSION,
            "manifest_digest": manifest_digest,
            "teacher": teacher,
            "views": to_dict(spec.views),
            "store": to_dict(spec.store),
        }
    )


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
