"""Why a UDA store's standalone teacher probe and the in-run probe disagree.

The standalone probe (``evidence.teacher_probe``) standardizes with the source features' own
statistics and trains on view 0; the probe inside a run (``stage_two.stage_a.fit_probe``)
standardizes with the statistics of every training split, the unlabeled target's included, and
trains on every cached view of the labeled source rows. This trains the same linear probe
(``probe.train_probe``, the project's defaults) in four forms, from the standalone probe to the
in-run one, one change at a time, and scores each on view 0 of the target evaluation split, so the
two causes are measured apart. Target labels are only scored, never trained on.

    python -m evidence.probe_stats STORE --source mnist_train --target mnistm_train --eval mnistm_test
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from customkd_cache.specs import ProbeSpec
from customkd_cache.stage_two.probe import probe_accuracy, train_probe
from customkd_cache.stage_two.replay import combined_stats
from customkd_cache.store import open_store
from customkd_cache.store.codec import std_divisor
from evidence.teacher_probe import view0


def _flat(views: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(N * V, D) float32 features of ``views`` (N, V, D) and their (N * V,) labels."""
    flat = views.reshape(-1, views.shape[-1]).astype("float32")
    return torch.from_numpy(flat), torch.from_numpy(np.repeat(labels.astype("int64"), views.shape[1]))


# (name, statistics from, training views): the standalone probe first, the in-run probe's form last
FORMS = (
    ("standalone", "source, view 0", 1),
    ("source statistics", "source", 1),
    ("source+target statistics", "source+target", 1),
    ("source+target statistics, all views (in-run)", "source+target", None),
)


def probe_table(path: Path, *, source: str, target: str, eval_split: str, seed: int = 0) -> dict[str, Any]:
    """Target accuracy of the probe in each form of :data:`FORMS`; the first equals
    ``evidence.teacher_probe.probe_store``'s linear probe on the same splits."""
    store = open_store(path)
    x_eval, y_eval = view0(path, eval_split)
    source_views, source_labels = store.read_split(source), store.labels(source)  # read once
    num_classes = int(max(int(source_labels.max()), int(y_eval.max())) + 1)
    x0, _ = _flat(source_views[:, :1], source_labels)
    stats = {
        "source, view 0": (x0.mean(dim=0), x0.std(dim=0, correction=0)),
        "source": _torch_stats(combined_stats(store, [source])),
        "source+target": _torch_stats(combined_stats(store, [source, target])),
    }
    out: dict[str, Any] = {"store": str(path), "source": source, "target": target, "eval": eval_split}
    out["rows"] = []
    for name, stats_from, views in FORMS:
        x, y = _flat(source_views[:, :views], source_labels)
        mean, std = stats[stats_from]
        probe = train_probe(x, y, num_classes=num_classes, spec=ProbeSpec(), seed=seed, mean=mean, std=std)
        out["rows"].append({"form": name, "target_accuracy": probe_accuracy(probe, x_eval, y_eval)})
    return out


def _torch_stats(stats: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = stats
    return torch.from_numpy(mean), torch.from_numpy(std_divisor(std))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--source", required=True, help="the labeled source training split")
    ap.add_argument("--target", required=True, help="the unlabeled target training split")
    ap.add_argument("--eval", required=True, help="the labeled target evaluation split (scored only)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = probe_table(args.store, source=args.source, target=args.target, eval_split=args.eval)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{res['store']}: probe trained on {args.source}, scored on {args.eval} (view 0)")
    for r in res["rows"]:
        print(f"  {r['form']:<46} {100 * r['target_accuracy']:.1f} %")


if __name__ == "__main__":
    main()
