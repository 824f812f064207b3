"""The studies' SSL id lists (evidence/fmnist.py ssl_lists): disjoint splits, one set of files per
label count, so two label counts drawn into one folder never share a pool or validation file."""

from pathlib import Path

import numpy as np

from evidence.fmnist import ssl_lists


def _ids(path: Path) -> set[str]:
    return set(path.read_text().split())


def test_two_label_counts_in_one_folder_keep_their_own_disjoint_splits(tmp_path: Path) -> None:
    labels = np.arange(400) % 10
    four = ssl_lists(tmp_path, labels=labels, n_pool=100, n_val=50, per_class=4, seed=1)
    ten = ssl_lists(tmp_path, labels=labels, n_pool=100, n_val=50, per_class=10, seed=1)
    # drawn after the 4-per-class lists, the 10-per-class ones must not replace their files
    assert len({*four.values(), *ten.values()}) == 6
    for lists, n_labeled in ((four, 40), (ten, 100)):
        labeled, pool, val = (_ids(lists[k]) for k in ("labeled", "pool", "val"))
        assert (len(labeled), len(pool), len(val)) == (n_labeled, 100, 50)
        assert not labeled & pool and not labeled & val and not pool & val
    # the 10-per-class labels include rows the 4-per-class pool and validation split may hold
    assert _ids(ten["labeled"]) & (_ids(four["pool"]) | _ids(four["val"]))
