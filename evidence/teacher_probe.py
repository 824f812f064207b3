"""How much a teacher's cached features know: full-label linear probe and 1-NN on view 0.

For each store: the teacher probe (``probe.train_probe``, the project's defaults) trained on the
view-0 features of every image of ``--train-split`` and evaluated on ``--test-split``, and the
cosine 1-nearest-neighbour accuracy between the same splits. Used to compare a trained teacher
with the same architecture at random init (``--set teacher.weights=random`` in stage one).

    python -m evidence.teacher_probe STORE [STORE ...] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from customkd_cache.specs import ProbeSpec
from customkd_cache.stage_two.probe import probe_accuracy, train_probe
from customkd_cache.store import open_store


def view0(store_path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    store = open_store(store_path)
    feats = torch.from_numpy(store.read_split(split)[:, 0].astype("float32"))
    return feats, torch.from_numpy(store.labels(split).astype("int64"))


def nearest_neighbour_accuracy(
    train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y: torch.Tensor
) -> float:
    a = torch.nn.functional.normalize(train, dim=1)
    b = torch.nn.functional.normalize(test, dim=1)
    return float((y_train[(b @ a.T).argmax(dim=1)] == y).float().mean())


def probe_store(path: Path, *, train_split: str, test_split: str, seed: int = 0) -> dict[str, Any]:
    info = open_store(path).info()
    x, y = view0(path, train_split)
    xt, yt = view0(path, test_split)
    num_classes = int(max(int(y.max()), int(yt.max())) + 1)
    probe = train_probe(x, y, num_classes=num_classes, spec=ProbeSpec(), seed=seed)
    return {
        "store": str(path),
        "teacher": info.get("teacher"),
        "train_images": int(x.shape[0]),
        "test_images": int(xt.shape[0]),
        "linear_probe_accuracy": probe_accuracy(probe, xt, yt),
        "nn1_accuracy": nearest_neighbour_accuracy(x, y, xt, yt),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", type=Path, nargs="+")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--test-split", default="test")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [probe_store(p, train_split=args.train_split, test_split=args.test_split) for p in args.stores]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        t = r["teacher"] or {}
        print(
            f"{t.get('name')} ({t.get('weights_source', t.get('weights', '?'))}): "
            f"linear probe {100 * r['linear_probe_accuracy']:.1f} %, 1-NN {100 * r['nn1_accuracy']:.1f} % "
            f"({r['train_images']} train / {r['test_images']} test images, view 0)"
        )


if __name__ == "__main__":
    main()
