"""Stage two's loader benchmark: items/s of one worker at 224 px, before and after reduced JPEG decoding.

Writes photo-like JPEGs (``fakedata.photo_like``, quality 90) in a size mix like OfficeHome's and
DomainNet's (a few hundred pixels to several thousand on the long side, landscape and portrait), a
store holding each image's stored views (``ViewsSpec`` defaults: random resized crops of 8-100 % of
the area, view 0 the centre crop), and renders one stored view per item, four ways side by side in
one process with one torch thread (a DataLoader worker's work):

- **before**: the worker as it was before reduced decoding: the whole JPEG decoded, the view cropped
  and resized by Pillow, then converted to a normalized float32 tensor in the worker;
- **full, uint8**: ``ReplayDataset`` with ``reduced=False``: the whole JPEG decoded, uint8 out;
- **reduced**: ``ReplayDataset`` as stage two uses it: the JPEG decoded at the DCT scale the stored
  crop allows (``decode_region``), uint8 out;
- **bare decode**: the whole JPEG decoded and nothing else: the floor of any loader that decodes in full.

The arms alternate within each repetition (``--repeats``), so a drift of the machine's speed hits all
alike; medians of items/s are printed with the ratio to **before**. The largest and mean absolute
pixel difference (0..255) between the reduced and the full rendering of every item is printed too;
``--edges`` draws hard black and white edges on the photos, the worst case for a reduced decode.

    python -m benchmarks.bench_loader                       # 60 images x 8 views, 3 repetitions
    python -m benchmarks.bench_loader --images 20 --repeats 1 --edges
    python -m benchmarks.bench_loader --edges --margin 1     # the reduced decode's fidelity trade-off
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from customkd_cache.data import Dataset, decode
from customkd_cache.data.decode import decode_image, draft_scale
from customkd_cache.data.views import render_view, to_tensor
from customkd_cache.specs import ViewsSpec
from customkd_cache.stage_two.replay import ReplayDataset, Row
from customkd_cache.testing.fakedata import photo_views_store

# Long sides (px) and their weights: OfficeHome's images range from about 120 px to over 6,000 (many
# product and real-world photos of 1,000-4,000), DomainNet's mostly from 300 to 1,200 with a tail of
# camera-sized ones.
LONG_SIDES = (300, 480, 640, 800, 1200, 2000, 3000, 4000)
WEIGHTS = (0.10, 0.15, 0.20, 0.15, 0.15, 0.10, 0.10, 0.05)
ASPECTS = (4 / 3, 3 / 4, 1.0, 3 / 2)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    """``count`` (width, height) pairs drawn from the size mix."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        long_side = int(rng.choice(LONG_SIDES, p=WEIGHTS))
        aspect = float(rng.choice(ASPECTS))
        w, h = (
            (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
        )
        out.append((w, h))
    return out


def replay(
    dataset: Dataset, store: Path, size: int, interpolation: str, *, reduced: bool, decode: str = "cpu"
) -> ReplayDataset:
    """A ``ReplayDataset`` over every stored view of every image (item ``k``: row ``k // V``, view
    ``k % V``)."""
    ds = ReplayDataset(
        decode=decode,
        dataset=dataset,
        store_path=store,
        features=None,
        student_size=size,
        student_mean=MEAN,
        student_std=STD,
        interpolation=interpolation,
        reduced=reduced,
    )
    split = dataset.manifest.splits[0]
    rows = len(split.samples)
    views = int(ds._split_views(split.name).boxes.shape[1])
    ds.set_items([(Row(split.name, r, True), v) for r in range(rows) for v in range(views)], 0)
    return ds


def before_item(ds: ReplayDataset, size: int, interpolation: str) -> Callable[[int], torch.Tensor]:
    """The worker before reduced decoding, for ``ds``'s item ``k``: full decode, Pillow crop and resize,
    normalized float32."""
    sv = ds._split_views(ds.split_names[0])

    def item(k: int) -> torch.Tensor:
        row, view = ds._rows[k], ds._view_of[k]
        img = decode_image(image_path(ds, k), name=str(row))
        out = render_view(
            img, sv.boxes[row, view], bool(sv.flips[row, view]), size=size, interpolation=interpolation
        )
        return to_tensor(out, mean=MEAN, std=STD)

    return item


def bare_decode(ds: ReplayDataset) -> Callable[[int], Image.Image]:
    """The full decode of ``ds``'s item ``k``'s image and nothing else."""

    def item(k: int) -> Image.Image:
        return decode_image(image_path(ds, k), name=str(k))

    return item


def image_path(ds: ReplayDataset, k: int) -> Path:
    """The file of item ``k``'s image (the items as ``set_items`` listed them)."""
    return ds.dataset.root / ds.dataset.manifest.splits[0].samples[ds._rows[k]].id


def item_seconds(fn: Callable[[int], object], n: int) -> np.ndarray:
    """Seconds per item ``0..n-1``, in order."""
    out = np.empty(n)
    for k in range(n):
        start = time.perf_counter()
        fn(k)
        out[k] = time.perf_counter() - start
    return out


def print_rates(runs: dict[str, list[np.ndarray]], items: np.ndarray, what: str, header: bool = True) -> None:
    """Median over repetitions of items/s on ``items`` per arm, with the ratio to **before**."""
    rates = {
        name: statistics.median(float(items.sum() / t[items].sum()) for t in ts) for name, ts in runs.items()
    }
    if header:
        print(f"{'items':<24}" + "".join(f"{name:>14}" for name in rates) + "   (items/s, median; x before)")
    cells = "".join(f"{r:>8.1f} {r / rates['before']:>4.2f}x" for r in rates.values())
    print(f"{what + f' ({int(items.sum())})':<24}{cells}")


def pixel_difference(
    reduced: ReplayDataset, full: ReplayDataset, sizes: list[tuple[int, int]]
) -> tuple[int, float, dict[int, int]]:
    """Largest and mean absolute difference of the reduced and full renderings, and items per decode
    scale (``sizes``: each image's (width, height))."""
    sv = reduced._split_views(reduced.split_names[0])
    largest, total, count = 0, 0.0, 0
    scales: dict[int, int] = {}
    for k in range(len(reduced)):
        diff = (reduced[k]["pixels"].int() - full[k]["pixels"].int()).abs()
        largest = max(largest, int(diff.max()))
        total, count = total + float(diff.float().sum()), count + diff.numel()
        row, view = reduced._rows[k], reduced._view_of[k]
        s = draft_scale(*sizes[row], sv.boxes[row, view], reduced.student_size)
        scales[s] = scales.get(s, 0) + 1
    return largest, total / count, dict(sorted(scales.items()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--views", type=int, default=8, help="stored views per image (items = images x views)")
    ap.add_argument("--size", type=int, default=224, help="the student's input size")
    ap.add_argument("--interpolation", default="bilinear", choices=["bilinear", "bicubic"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--edges", action="store_true", help="draw hard edges on the photos")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--margin",
        type=float,
        default=decode.DRAFT_MARGIN,
        help="decode.DRAFT_MARGIN for this run (a trade-off study)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    decode.DRAFT_MARGIN = args.margin
    sizes = image_sizes(args.images, args.seed)
    views = ViewsSpec.model_validate({"num_views": args.views, "seed": args.seed})
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        dataset, store = photo_views_store(Path(tmp), sizes, views, edges=args.edges)
        megabytes = sum(p.stat().st_size for p in Path(tmp).glob("*.jpg")) / 2**20
        reduced = replay(dataset, store, args.size, args.interpolation, reduced=True)
        full = replay(dataset, store, args.size, args.interpolation, reduced=False)
        arms: dict[str, Callable[[int], object]] = {
            "before": before_item(full, args.size, args.interpolation),
            "full, uint8": full.__getitem__,
            "reduced": reduced.__getitem__,
            "bare decode": bare_decode(full),
        }
        n = len(reduced)
        print(
            f"{args.images} JPEGs ({megabytes:.1f} MiB, long sides {min(max(s) for s in sizes)}-"
            f"{max(max(s) for s in sizes)} px{', hard edges' if args.edges else ''}) x {args.views} views = "
            f"{n} items at {args.size} px, {args.interpolation}, draft margin {args.margin:g}; "
            "one process, one torch thread"
        )
        runs: dict[str, list[np.ndarray]] = {name: [] for name in arms}
        for _ in range(args.repeats):
            for name, fn in arms.items():
                runs[name].append(item_seconds(fn, n))
        long_side = np.repeat([max(s) for s in sizes], args.views)
        print_rates(runs, np.ones(n, bool), "all items")
        for side in sorted(set(long_side.tolist())):
            print_rates(runs, long_side == side, f"long side {side} px", header=False)
        largest, mean, scales = pixel_difference(reduced, full, sizes)
        print(
            f"reduced vs full rendering: largest |difference| {largest}/255, mean {mean:.3f}; "
            f"items per decode scale {scales}"
        )


if __name__ == "__main__":
    main()
