"""Manifests: what a dataset is, split by split, and the digest that enters every cache fingerprint.

A ``Manifest`` fixes, per split, the order of the samples, their ids, labels, sizes and content
digests (sha256 of each sample's bytes, see ``customkd_cache.data.digests``). Its digest depends only
on what the samples are (ids, labels, byte sizes, bytes), never on the root path, the machine, file
times, the order the file system returns entries in, or the locale: names sort by Unicode code point.

Sample ids are stable: the POSIX path relative to the dataset root for file datasets
(``"Art/Alarm_Clock/00001.jpg"``), ``"<split>/<index:05d>"`` for array-backed datasets (CIFAR,
Fashion-MNIST), where the index is the row in the original split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from customkd_cache.errors import DatasetError, closest


@dataclass(frozen=True)
class Sample:
    """One image: its stable ``id``, class ``label``, ``size`` (file bytes; array rows: row bytes) and
    ``digest``, the sha256 hex of those bytes (``""`` until ``open_dataset`` sets it)."""

    id: str
    label: int
    size: int
    digest: str = ""


@dataclass(frozen=True)
class SplitManifest:
    """The samples of one split, in the dataset's stable order (the row order of a cache)."""

    name: str
    samples: tuple[Sample, ...]

    def __len__(self) -> int:
        return len(self.samples)

    def ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.samples)

    def labels(self) -> np.ndarray:
        """``(N,)`` int64 labels in sample order."""
        return np.fromiter((s.label for s in self.samples), dtype=np.int64, count=len(self.samples))


@dataclass(frozen=True)
class Manifest:
    """What a dataset is: its kind, class names (label = index), splits and the ids left out."""

    kind: str
    classes: tuple[str, ...]
    splits: tuple[SplitManifest, ...]
    skipped: tuple[str, ...] = ()
    # ids whose bytes differ from what this user's digest cache recorded for them (same name, other
    # content): what made a fingerprint change; not part of what the dataset is
    changed: tuple[str, ...] = field(default=(), compare=False)

    def split(self, name: str) -> SplitManifest:
        """The split called ``name``; ``DatasetError`` naming the valid splits if there is none."""
        for s in self.splits:
            if s.name == name:
                return s
        names = self.split_names()
        raise DatasetError(
            f"{self.kind}: no split '{name}'{closest(name, names)}; valid splits: {', '.join(names)}"
        )

    def split_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.splits)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data: kind, classes, per split its ids, labels, sizes and content digests, and
        skipped ids."""
        return {
            "kind": self.kind,
            "classes": list(self.classes),
            "splits": [
                {
                    "name": s.name,
                    "ids": [x.id for x in s.samples],
                    "labels": [x.label for x in s.samples],
                    "sizes": [x.size for x in s.samples],
                    "digests": [x.digest for x in s.samples],
                }
                for s in self.splits
            ],
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """The inverse of ``to_json``."""
        splits = tuple(
            SplitManifest(
                s["name"],
                tuple(
                    Sample(i, int(lab), int(size), str(digest))
                    for i, lab, size, digest in zip(
                        s["ids"], s["labels"], s["sizes"], s.get("digests", [""] * len(s["ids"])), strict=True
                    )
                ),
            )
            for s in data["splits"]
        )
        return cls(data["kind"], tuple(data["classes"]), splits, tuple(data["skipped"]))

    def digest(self) -> str:
        """sha256 hex of the canonical JSON of ``to_json()`` (sorted keys, no spaces, UTF-8)."""
        return self._digest

    @cached_property
    def _digest(self) -> str:
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
