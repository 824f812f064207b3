"""Cache identity, and the lookup of the store a train spec reads.

A store is named by ``sha256(canonical_json(identity))`` where ``identity`` holds the dataset part
(the manifest digest over every split, and one digest per split: ``split_digests``), the teacher's
identity (source, name, weights digest, preprocessing resolved from the model, feature kind,
precision), the view policy and seed, the stored dtype and layout, and the format version. Run
settings (batch size, workers, device) are not identity. If any part cannot be computed the caller
fails: there is no random fallback key.

A second, cheaper digest, the *teacher key*, identifies a cache spec's teacher, views and store
sections as written, without its dataset. Stage two finds the store made from a cache spec without
building the teacher: a store serves a train spec when its teacher key is the cache spec's and its
split digests include every split the train spec lists, equal, so one store made over every split
of a dataset (``make cache DATASET=domainnet``) serves each pipeline that reads some of them; the
store's fingerprint stays the authority. The ``[store]`` section (dtype, unit_rows, compressor) is
how features are stored, not what they are: it stays in both digests (the bytes differ), and stage
two also accepts a store whose key is the spec's with the store's own recorded ``[store]`` section
(``teacher_key_with_storage``), so a store made with ``--set store.dtype=int8`` is still found.
Stores made before split digests were recorded are found by their *request key* (the teacher key's
sections plus the whole manifest digest), so only for exactly the splits they were made over.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from customkd_cache import FORMAT_VERSION
from customkd_cache.errors import StoreError
from customkd_cache.specs import (
    PRECISIONS_RESOLVED,
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
    from customkd_cache.data import Manifest, SplitManifest


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def split_digests(manifest: Manifest) -> dict[str, str]:
    """Per split, the sha256 of what the store's rows of that split are: the dataset kind, the class
    names (labels index them), and the split's ids, labels, sizes and content digests in order.

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
                "digests": s["digests"],
            }
        )
        for s in data["splits"]
    }


def dataset_identity(
    *, kind: str, manifest_digest: str, splits: dict[str, int], digests: dict[str, str] | None = None
) -> dict[str, Any]:
    """The dataset part of the identity: the manifest digest covers ids, labels, sizes, content
    digests and skips of every split together; ``split_digests`` each split alone."""
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
    return _keyed_teacher(to_dict(spec.teacher))


def _keyed_teacher(written: dict[str, Any]) -> dict[str, Any]:
    """A cache spec's teacher section as the keys hash it.

    Added after the first stores were written: ``pos_embed_antialias``, whose default stays out of the
    key, and ``precision = "auto"``, keyed as ``"fp32"`` (the default before it), so those stores are
    still found. Which precision a store holds is its identity's ``teacher.precision``; ``find_store``
    matches it against what the spec's precision may resolve to (``PRECISIONS_RESOLVED``).
    """
    teacher = dict(written)
    if teacher.get("pos_embed_antialias") is True:
        del teacher["pos_embed_antialias"]
    if teacher.get("precision") == "auto":
        teacher["precision"] = "fp32"
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


def find_store(spec: TrainSpec, *, spec_path: Path | None, manifest: Manifest) -> Path:
    """The store this train spec reads: ``cache.store``, or one made from ``cache.spec`` that holds
    every split of ``manifest`` (the train spec's dataset).

    A store serves the train spec when it was made from the cache spec's teacher, views and store
    sections (``teacher_key``; a store made with other ``[store]`` settings holds the same features, so
    it matches too) and records, for every split the train spec lists, the same ``split_digests``: one
    store over every split of a dataset serves each pipeline that reads some of them. Stores made
    before split digests were recorded match only on the whole manifest (``request_key``). Preferred,
    in order: the spec's own ``[store]``, then its ``store.dtype``, then any storage.

    Raises StoreError when no store under CUSTOMKD_CACHE_ROOT serves the spec (naming the stores of
    the same teacher, what differs, and the cache command that makes a store that serves it), or when
    several tie (naming each with its storage).
    """
    if spec.cache.store:
        return spec_relative_path(spec.cache.store, spec_path)
    cspec_path = Path(os.path.normpath(spec_relative_path(spec.cache.spec, spec_path)))
    cspec = load_cache_spec(cspec_path, [])
    want = split_digests(manifest)
    root = cache_root()
    stores = [c for path in store_dirs(root) if (c := _read_listed(path)) is not None]
    whole = cspec.model_copy(update={"dataset": spec.dataset})  # how older stores were keyed
    found = [c for c in stores if _serves(c, cspec, want, whole, manifest.digest())]
    if not found:
        command = cache_command(spec, cspec, cspec_path, want)
        raise StoreError(
            f"no store under {root} was made from {cspec_path} with the splits {', '.join(want)} of this "
            f"dataset{_near_misses(cspec, want, stores)}; run `{command}` first, or set "
            "cache.store = PATH (CUSTOMKD_CACHE_ROOT must match)"
        )
    best = _preferred(found, cspec)
    if len(best) > 1:
        names = ", ".join(
            f"{c.path} ({c.storage_label(cspec.store)}{', ' + c.precision if c.precision else ''})"
            for c in best
        )
        raise StoreError(f"several stores match {cspec_path} ({names}); set cache.store = PATH to choose one")
    return best[0].path


def cache_command(spec: TrainSpec, cspec: CacheSpec, cspec_path: Path, want: dict[str, str]) -> str:
    """The ``customkd-cache cache`` command that makes a store serving ``spec``: the cache spec, with
    ``--set`` for each dataset field where the train spec's dataset differs, and the train spec's
    splits added when the cache spec lists splits that leave some out."""
    import shlex

    mine, theirs = spec.dataset, cspec.dataset
    sets: list[str] = []
    if mine.resolved_root() != theirs.resolved_root():
        sets.append(f"dataset.root={mine.root}")
    if theirs.splits and not set(want) <= set(theirs.splits):
        merged = [*theirs.splits, *(s for s in want if s not in theirs.splits)]
        sets.append("dataset.splits=" + json.dumps(merged))
    for name in ("max_per_split", "skip_list", "max_pixels"):
        value = getattr(mine, name)
        if value != getattr(theirs, name):
            sets.append(f"dataset.{name}={_toml_value(value)}")
    words = ["customkd-cache", "cache", "--spec", str(cspec_path)]
    for item in sets:
        words += ["--set", item]
    return shlex.join(words)


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {v}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


@dataclass(frozen=True)
class _Listed:
    """A readable store under the cache root, with what ``find_store`` compares."""

    path: Path
    request_key: str  # with the whole manifest digest (stores made before split digests)
    teacher_key: str  # without the dataset ("" for stores made before split digests)
    split_digests: dict[str, str] | None
    storage: StoreSpec | None  # its [store] section, as hashed into both keys
    manifest_digest: str
    dataset_kind: str
    teacher: str
    written: dict[str, Any]  # the cache spec it was made from (provenance: diagnostics only)
    precision: str = ""  # the identity's teacher.precision: what the spec's precision resolved to

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
    (StoreError, or zarr's own errors for a damaged hierarchy) is never a match, as in
    ``list_stores``, which reports it as damaged."""
    try:
        attrs = open_store(path).attrs
        identity = attrs.get("identity", {})
        dataset = identity.get("dataset", {})
        teacher = identity.get("teacher", {})
        provenance = attrs.get("provenance", {})
        written = provenance.get("spec", {}) if isinstance(provenance, dict) else {}
        digests = recorded_split_digests(identity)
        return _Listed(
            path=path,
            request_key=str(attrs.get("request_key") or ""),
            teacher_key=str(attrs.get("teacher_key") or "") if digests is not None else "",
            split_digests=digests,
            storage=recorded_storage(identity),
            manifest_digest=str(dataset.get("manifest_digest", "")),
            dataset_kind=str(dataset.get("kind", "")),
            teacher=str(teacher.get("name", "")),
            written=written if isinstance(written, dict) else {},
            precision=str(teacher.get("precision", "")),
        )
    except Exception:  # noqa: BLE001 - malformed attributes are a damaged store, skipped
        return None


def _serves(
    c: _Listed, cspec: CacheSpec, want: dict[str, str], whole: CacheSpec, manifest_digest: str
) -> bool:
    """``c`` was made from ``cspec`` (any storage) and holds every wanted split with its digest; a store
    made before split digests, from ``whole`` (the cache spec over the train spec's dataset) for
    exactly this manifest.

    Its precision must be one the spec's may resolve to (a bf16 store never serves a spec that asks
    for fp32), and a spec written with another precision that resolves to the same one made the same
    store (``auto`` on a GPU and ``bf16``, ``tf32`` on the CPU and ``fp32``: one identity, one store)."""
    if c.precision and c.precision not in PRECISIONS_RESOLVED[cspec.teacher.precision]:
        return False
    keyed = list(zip(_same_precision(cspec, c.precision), _same_precision(whole, c.precision), strict=True))
    if c.teacher_key:
        keys = {teacher_key(spec=spec) for spec, _ in keyed}
        if c.storage is not None:
            keys |= {teacher_key_with_storage(spec=spec, storage=c.storage) for spec, _ in keyed}
        held = c.split_digests or {}
        return c.teacher_key in keys and all(held.get(s) == d for s, d in want.items())
    keys = {request_key(spec=full, manifest_digest=manifest_digest) for _, full in keyed}
    if c.storage is not None:
        keys |= {
            request_key_with_storage(spec=full, manifest_digest=manifest_digest, storage=c.storage)
            for _, full in keyed
        }
    return c.request_key in keys


def _same_precision(spec: CacheSpec, resolved: str) -> list[CacheSpec]:
    """``spec``, then ``spec`` with each other ``teacher.precision`` that may resolve to ``resolved``
    (only ``spec`` when ``resolved`` is unknown)."""
    others = [p for p, can in PRECISIONS_RESOLVED.items() if resolved in can and p != spec.teacher.precision]
    return [spec] + [
        spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"precision": p})}) for p in others
    ]


def _preferred(found: list[_Listed], cspec: CacheSpec) -> list[_Listed]:
    """The first non-empty of: stores in the spec's own storage, in its dtype, all of them."""
    same = [c for c in found if c.storage is None or c.storage == cspec.store]
    same_dtype = [c for c in found if c.storage is not None and c.storage.dtype == cspec.store.dtype]
    return same or same_dtype or found


_SHOW_NEAR = 3  # stores named in a miss


def _near_misses(cspec: CacheSpec, want: dict[str, str], stores: list[_Listed]) -> str:
    """``"; stores of the same teacher: PATH (int8; differs in views.num_views)"`` or ``""``: each
    store of the dataset kind and teacher name, with the spec fields and the splits that differ."""
    near = [c for c in stores if c.dataset_kind == cspec.dataset.kind and c.teacher == cspec.teacher.name]
    if not near:
        return ""
    asked = {k: to_dict(cspec)[k] for k in ("teacher", "views")}

    def describe(c: _Listed) -> str:
        differs = differing_keys({k: c.written.get(k) for k in asked}, asked)
        if c.split_digests is None:
            splits = [] if not c.manifest_digest else ["made before per-split digests: another manifest"]
        else:
            missing = [s for s in want if s not in c.split_digests]
            other = [s for s in want if s in c.split_digests and c.split_digests[s] != want[s]]
            splits = [f"lacks split {', '.join(missing)}"] if missing else []
            if other:
                splits.append(
                    f"other samples in split {', '.join(other)} (dataset.root, max_per_split, skip_list "
                    "or the files differ)"
                )
        shown = "; ".join(([f"differs in {', '.join(differs)}"] if differs else []) + splits)
        return f"{c.path} ({c.storage_label(cspec.store)}{'; ' + shown if shown else ''})"

    more = f" and {len(near) - _SHOW_NEAR} more" if len(near) > _SHOW_NEAR else ""
    return f"; stores of the same teacher: {', '.join(describe(c) for c in near[:_SHOW_NEAR])}{more}"


def check_store(store: FeatureStore, *, spec: TrainSpec, spec_path: Path | None, manifest: Manifest) -> None:
    """Refuse a store that does not hold what the train spec reads, in one line: a split missing or
    incomplete, other samples in a split (per-split digest, or the whole manifest for stores made
    before split digests), ids or labels in the store that are not the dataset's (a store altered
    after it was written), or another teacher/feature kind."""
    identity = store.attrs.get("identity", {})
    want = split_digests(manifest)
    missing = [s for s in want if s not in store.split_names]
    if missing:
        raise StoreError(
            f"{store.path}: no split {', '.join(missing)} in this store (it holds "
            f"{', '.join(store.split_names)}); point cache.store at a store made over those splits"
        )
    store.require_complete(want)
    digests = recorded_split_digests(identity)
    if digests is not None:
        other = [s for s in want if digests.get(s) != want[s]]
        if other:
            raise StoreError(
                f"{store.path}: cache was made for other samples in split {', '.join(other)}; check "
                "dataset.root, max_per_split and skip_list, or rebuild the cache"
            )
    else:
        got = identity.get("dataset", {}).get("manifest_digest")
        if got != manifest.digest():
            raise StoreError(
                f"{store.path}: cache was made for other samples (manifest {str(got)[:12]}, this dataset "
                f"{manifest.digest()[:12]}); check dataset.root/splits or rebuild the cache"
            )
    for split in want:
        _check_rows(store, manifest.split(split))
    if spec.cache.spec:
        cspec = load_cache_spec(spec_relative_path(spec.cache.spec, spec_path), [])
        teacher = identity.get("teacher", {})
        want_t = {
            "source": cspec.teacher.source,
            "name": cspec.teacher.name,
            "feature": cspec.teacher.feature,
        }
        have = {k: teacher.get(k) for k in want_t}
        if have != want_t:
            raise StoreError(
                f"{store.path}: cache was made by teacher {have}, but {spec.cache.spec} asks for {want_t}; "
                "point cache.store at the right store or rebuild"
            )


def _check_rows(store: FeatureStore, split: SplitManifest) -> None:
    """The store's ids and labels of ``split`` are the dataset manifest's, row for row."""
    ids, labels = store.ids(split.name), store.labels(split.name)
    if ids != split.ids():
        bad = next((i for i, (a, b) in enumerate(zip(ids, split.ids(), strict=False)) if a != b), len(ids))
        raise StoreError(
            f"{store.path}: split '{split.name}' ids differ from the dataset's from row {bad} on "
            f"({len(ids)} in the store, {len(split)} in the dataset); the store was altered or made "
            "from other files: remove it and rebuild the cache"
        )
    want = split.labels()
    if labels.shape != want.shape or not (labels == want).all():
        rows = (labels != want).nonzero()[0] if labels.shape == want.shape else [0]
        store.require_intact(split.name, [int(r) for r in rows])  # damaged (repairable) first
        first = int(rows[0])
        raise StoreError(
            f"{store.path}: split '{split.name}' labels differ from the dataset's in {len(rows)} row(s) "
            f"(first: '{ids[first]}' is {int(labels[first])} in the store, {int(want[first])} in the "
            "dataset); the store was altered after it was written: remove it and rebuild the cache"
        )


# --- authenticating a store's keys ---------------------------------------------------------------

# Teacher fields a store's identity records as the spec wrote them: where both the identity and
# the spec the store records (its provenance) hold one, they must agree (the precision: the identity's
# must be one the written one resolves to, ``PRECISIONS_RESOLVED``).
_SPEC_TEACHER_FIELDS = ("source", "name", "pretrained", "weights_keys", "input_size", "feature", "precision")


def stored_keys(identity: Any, provenance: Any) -> dict[str, str]:
    """A store's ``request_key`` and ``teacher_key``, recomputed from its recorded identity (dataset
    kind and manifest digest, views, ``[store]`` section) and the teacher section of the cache spec
    its provenance records (the only part the identity holds in resolved form only: the weights path
    and ``init_seed``).

    Never read from the store's attributes: a key copied onto a store of another teacher does not
    make it match (``store.attrs`` checks the recorded keys against these on open). Raises
    ValueError, naming the field, when the provenance holds no teacher section or one that
    disagrees with the identity's teacher.
    """
    if not isinstance(identity, dict):
        raise ValueError("identity is not a table")
    spec = provenance.get("spec") if isinstance(provenance, dict) else None
    written = spec.get("teacher") if isinstance(spec, dict) else None
    if not isinstance(written, dict):
        raise ValueError("provenance.spec.teacher is missing: the keys cannot be recomputed")
    teacher = identity.get("teacher")
    if not isinstance(teacher, dict):
        raise ValueError("identity.teacher is not a table")
    for key in _SPEC_TEACHER_FIELDS:
        if key == "precision" and isinstance(written.get(key), str) and written[key] in PRECISIONS_RESOLVED:
            agree = key not in teacher or teacher[key] in PRECISIONS_RESOLVED[written[key]]
        else:
            agree = key not in teacher or key not in written or teacher[key] == written[key]
        if not agree:
            raise ValueError(
                f"provenance.spec.teacher.{key} = {written[key]!r} disagrees with identity.teacher.{key} = "
                f"{teacher[key]!r}"
            )
    if written.get("pos_embed_antialias", True) != teacher.get("pos_embed_antialias", True):
        raise ValueError("provenance.spec.teacher.pos_embed_antialias disagrees with the identity")
    written = _keyed_teacher(written)  # as the keys were computed when the store was made
    dataset = identity.get("dataset")
    dataset = dataset if isinstance(dataset, dict) else {}
    common = {
        "format_version": identity.get("format_version"),
        "teacher": written,
        "views": identity.get("views"),
        "store": identity.get("store"),
    }
    return {
        "request_key": sha256_json({**common, "manifest_digest": dataset.get("manifest_digest")}),
        "teacher_key": sha256_json({**common, "dataset_kind": dataset.get("kind")}),
    }
