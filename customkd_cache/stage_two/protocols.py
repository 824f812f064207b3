"""The rows of a protocol: labeled and unlabeled training rows, evaluation and validation rows
(``uda`` or ``ssl``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from customkd_cache.data import Dataset, SplitManifest, labeled_indices, read_labeled_list
from customkd_cache.errors import SpecError
from customkd_cache.specs import TrainSpec, data_path
from customkd_cache.stage_two.replay import Row


@dataclass
class Protocol:
    labeled: list[Row]
    unlabeled: list[Row]
    eval_splits: tuple[str, ...]
    train_splits: tuple[str, ...]
    labeled_list_sha256: str = ""
    eval_rows: dict[str, list[int]] | None = None  # evaluation restricted to these rows (ssl.eval_list)
    val_rows: dict[str, list[int]] = field(default_factory=dict)  # held-out labeled rows (validation)

    def eval_indices(self, split: str, num_samples: int) -> list[int]:
        if self.eval_rows is not None and split in self.eval_rows:
            return self.eval_rows[split]
        return list(range(num_samples))


def build_protocol(spec: TrainSpec, dataset: Dataset) -> Protocol:
    """Labeled / unlabeled training rows and evaluation splits for ``uda`` or ``ssl``."""
    manifest = dataset.manifest
    if spec.protocol == "uda":
        assert spec.uda is not None  # guaranteed by TrainSpec validation
        for name in (*spec.uda.source, *spec.uda.target, *spec.uda.eval):
            manifest.split(name)
        for name in spec.uda.val:
            manifest.split(name)
            if name in (*spec.uda.source, *spec.uda.target):
                raise SpecError(f"uda.val: split '{name}' is also trained on; give a held-out source split")
        labeled = [Row(s, i, True) for s in spec.uda.source for i in range(len(manifest.split(s).samples))]
        unlabeled = [Row(s, i, False) for s in spec.uda.target for i in range(len(manifest.split(s).samples))]
        evals = spec.uda.eval or spec.uda.target
        val = {name: list(range(len(manifest.split(name).samples))) for name in spec.uda.val}
        return Protocol(labeled, unlabeled, evals, (*spec.uda.source, *spec.uda.target), val_rows=val)
    assert spec.ssl is not None
    ssl = spec.ssl
    split = manifest.split(ssl.train_split)
    manifest.split(ssl.eval_split)
    list_path = data_path(ssl.labeled_list)
    chosen = set(_listed(split, list_path, ssl.labeled_sha256))
    held_out = set(_listed(split, data_path(ssl.val_list))) if ssl.val_list else set()
    if held_out & chosen:
        raise SpecError(
            f"ssl.val_list: {len(held_out & chosen)} ids are also in ssl.labeled_list; validation ids "
            "must be held out from training"
        )
    labeled = [Row(split.name, i, True) for i in sorted(chosen)]
    if ssl.unlabeled_list:
        pool = sorted(set(_listed(split, data_path(ssl.unlabeled_list))) - chosen - held_out)
    else:
        pool = [i for i in range(len(split.samples)) if i not in chosen and i not in held_out]
    unlabeled = [Row(split.name, i, False) for i in pool]
    eval_rows = None
    if ssl.eval_list:
        eval_rows = {
            ssl.eval_split: sorted(_listed(manifest.split(ssl.eval_split), data_path(ssl.eval_list)))
        }
    digest = hashlib.sha256(list_path.read_bytes()).hexdigest()
    val = {split.name: sorted(held_out)} if held_out else {}
    return Protocol(labeled, unlabeled, (ssl.eval_split,), (split.name,), digest, eval_rows, val)


def _listed(split: SplitManifest, path: Path, sha256: str = "") -> list[int]:
    """Indices into ``split`` of the ids in a list file."""
    return [int(i) for i in labeled_indices(split, read_labeled_list(path, sha256=sha256))]
