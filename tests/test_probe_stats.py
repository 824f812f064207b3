"""evidence/probe_stats.py: the standalone-vs-in-run probe forms on a tiny generated store."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from customkd_cache.catalog import fingerprint
from customkd_cache.store import SplitInit, create_or_open_store
from evidence.probe_stats import FORMS, probe_table
from evidence.teacher_probe import probe_store

VIEWS, DIM, ROWS = 2, 6, 40


def _features(labels: np.ndarray, offset: float, seed: int) -> np.ndarray:
    """(N, V, D): the class in the first two dims, noise, and a per-domain ``offset`` on every dim."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(len(labels), VIEWS, DIM))
    f[:, :, 0] += 3.0 * labels[:, None]
    f[:, :, 1] -= 3.0 * labels[:, None]
    return (f + offset).astype(np.float32)


def _store(path: Path) -> Path:
    labels = {s: np.arange(ROWS, dtype=np.int64) % 2 for s in ("src", "tgt", "ev")}
    store = create_or_open_store(
        path,
        fingerprint=fingerprint({"probe_stats": True}),
        identity={"probe_stats": True},
        provenance={},
        splits={s: SplitInit(ids=[f"{s}/{i}" for i in range(ROWS)], labels=y) for s, y in labels.items()},
        num_views=VIEWS,
        feature_dim=DIM,
        dtype="float32",
        unit_rows=ROWS,
        compressor="zstd",
    )
    for seed, (split, offset) in enumerate((("src", 0.0), ("tgt", 4.0), ("ev", 4.0))):
        feats = _features(labels[split], offset, seed)
        boxes = np.tile(np.array([0.0, 0.0, 1.0, 1.0], np.float32), (ROWS, VIEWS, 1))
        store.write_unit(split, 0, features=feats, boxes=boxes, flips=np.zeros((ROWS, VIEWS), bool))
        assert store.finalize_split(split)
    return path


def test_first_form_is_the_standalone_probe_and_every_form_is_scored(tmp_path: Path) -> None:
    path = _store(tmp_path / "s.zarr")
    table = probe_table(path, source="src", target="tgt", eval_split="ev")
    assert [r["form"] for r in table["rows"]] == [f[0] for f in FORMS]
    standalone = probe_store(path, train_split="src", test_split="ev")["linear_probe_accuracy"]
    assert table["rows"][0]["target_accuracy"] == standalone
    assert all(0.0 <= r["target_accuracy"] <= 1.0 for r in table["rows"])
