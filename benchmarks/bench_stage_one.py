"""Stage-one benchmark: finished units written inline against by the writer thread.

The teacher is a stand-in for a GPU: its forward pass sleeps ``--sleep-ms`` per batch (the time a
GPU would take, during which the CPU is free) and returns seeded random features of ``--dim``
dimensions (a ViT-L's 1024 by default, so the writer has real-sized units to cast, compress, hash and
write). Decoding is taken out of the timing too (by default): each row's rendered views are kept
from an untimed warm-up run and replayed, as if enough decoding workers kept a GPU fed
(``--decode`` renders them in every run, with ``--workers`` processes). Everything else is the real
stage one: loader, claims, ``FeatureStore.write_unit``, stats. Runs alternate (inline, threaded,
inline, ...) so machine noise hits both; prints the median work seconds of each, their ratio, the
teacher's and the writer's own time, and whether every run wrote the same bytes. Torch runs one
intra-op thread (the stand-in does no math to spread).

    python -m benchmarks.bench_stage_one                     # 20 ms per batch, D = 1024
    python -m benchmarks.bench_stage_one --sleep-ms 5 --repeats 5
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from customkd_cache.specs import CacheSpec
from customkd_cache.stage_one import extract
from customkd_cache.store import FeatureStore
from customkd_cache.testing import fakedata


def make_spec(root: Path, args: argparse.Namespace) -> CacheSpec:
    return CacheSpec.model_validate(
        {
            "dataset": {"kind": "image_folder", "root": str(root)},
            "teacher": {"name": "test_vit", "weights": "random", "input_size": 32, "feature": "cls"},
            "views": {"num_views": args.views},
            "store": {"unit_rows": args.unit_rows},
            "run": {"batch_size": args.batch, "num_workers": args.workers},
        }
    )


class Timers:
    """Seconds the stand-in teacher slept and the writer spent in ``write_unit``."""

    def __init__(self) -> None:
        self.teacher = 0.0
        self.writer = 0.0
        self.batches = 0


def install_stand_ins(args: argparse.Namespace, timers: Timers) -> None:
    """A teacher that sleeps per batch and returns D-dim features seeded by its input, and a timed
    ``write_unit``."""
    build = extract.create_teacher

    def forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        time.sleep(args.sleep_ms / 1000)
        seed = int.from_bytes(hashlib.sha256(x.numpy().tobytes()).digest()[:4], "little")
        out = torch.randn(len(x), args.dim, generator=torch.Generator().manual_seed(seed))
        timers.teacher += time.perf_counter() - t0
        timers.batches += 1
        return out

    def create_teacher(*a: Any, **kw: Any) -> Any:
        teacher = build(*a, **kw)
        teacher.forward_fn = forward
        teacher.feature_dim = args.dim
        return teacher

    extract.create_teacher = create_teacher  # type: ignore[assignment]
    write = FeatureStore.write_unit

    def timed_write(self: FeatureStore, *a: Any, **kw: Any) -> None:
        t0 = time.perf_counter()
        write(self, *a, **kw)
        timers.writer += time.perf_counter() - t0

    FeatureStore.write_unit = timed_write  # type: ignore[method-assign]
    if not args.decode:
        render = extract.RowViews.__getitem__
        kept: dict[tuple[str, int], Any] = {}

        def replay(self: extract.RowViews, key: tuple[str, int]) -> Any:
            if key not in kept:
                kept[key] = render(self, key)
            return kept[key]

        extract.RowViews.__getitem__ = replay  # type: ignore[method-assign]


def one_run(spec: CacheSpec, *, threaded: bool, timers: Timers) -> tuple[float, float, float, str]:
    """(work seconds, teacher seconds, writer seconds, digest of the feature chunks) of one fresh run."""
    timers.teacher = timers.writer = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CUSTOMKD_CACHE_ROOT"] = tmp
        res = extract.run_cache(
            spec, spec_path=None, shard=extract.Shard(), progress=False, writer_thread=threaded
        )
        h = hashlib.sha256()
        for f in sorted(res.path.rglob("*")):
            if f.is_file() and "/features/c/" in str(f):
                h.update(f.read_bytes())
        return res.work_seconds, timers.teacher, timers.writer, h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sleep-ms", type=float, default=20.0, help="the stand-in teacher's time per batch")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64, help="views per teacher batch")
    ap.add_argument("--unit-rows", type=int, default=64)
    ap.add_argument("--decode", action="store_true", help="decode and render in every run")
    ap.add_argument("--workers", type=int, default=0, help="decoding processes (run.num_workers)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the stand-in does no math; idle intra-op threads only add noise
    timers = Timers()
    install_stand_ins(args, timers)
    with tempfile.TemporaryDirectory() as tmp:
        root = fakedata.write_image_folder(
            Path(tmp) / "images", classes=("a", "b", "c", "d"), per_class=args.images // 4, size=(48, 36)
        )
        spec = make_spec(root, args)
        runs: dict[str, list[tuple[float, float, float, str]]] = {"inline": [], "threaded": []}
        one_run(spec, threaded=False, timers=timers)  # warm-up (and the views replayed without --decode)
        for _ in range(args.repeats):
            for name in runs:
                runs[name].append(one_run(spec, threaded=name == "threaded", timers=timers))
    med = {name: [statistics.median(r[i] for r in rs) for i in range(3)] for name, rs in runs.items()}
    digests = {r[3] for rs in runs.values() for r in rs}
    n = args.images
    units = -(-n // args.unit_rows)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"{n} images x {args.views} views, D={args.dim} float16 zstd, "
        f"{units} units of {args.unit_rows} rows, "
        + (f"decoded by {args.workers} worker(s); " if args.decode else "views replayed from memory; ")
        + f"teacher batches of {args.batch} views sleeping {args.sleep_ms:g} ms; medians of {args.repeats}"
    )
    for name in runs:
        work, teacher, writer = med[name]
        print(
            f"{name:9s} work {work:6.2f} s  ({n / work:7.1f} img/s)  teacher {teacher:6.2f} s  "
            f"writer {writer:6.2f} s  runs {[round(r[0], 2) for r in runs[name]]}"
        )
    print(f"speed-up threaded / inline: {med['inline'][0] / med['threaded'][0]:.3f}")
    print(f"same feature bytes in every run: {len(digests) == 1}")


if __name__ == "__main__":
    main()
