"""Manifest benchmark: what content digests cost when a dataset is opened.

Writes a generated image folder (default 20,000 JPEG files of 20-200 KB in 20 class folders: a few
real JPEG encodings, each file made unique by a comment segment) and times ``open_dataset`` on it,
the call every ``cache``, ``train`` and ``sweep`` point makes, three ways side by side:

- **size only**: listing ids, labels and byte sizes, no digests (what the manifest held before it
  covered content);
- **content, cold**: every file read and hashed (sha256), with an empty digest cache;
- **content, warm**: the per-user digest cache filled by an earlier run: only ``stat`` per file.

The three alternate within each repetition (``--repeats``), so a drift of the machine's speed hits
all alike; medians are printed with the ratio to size only. The files are read right after they are
written, so they come from the page cache: the cold figure is hashing and system-call cost, and a
disk that must be read adds its own read time (the dataset's bytes over its bandwidth).

    python -m benchmarks.bench_manifest                      # the folder goes to a temporary directory
    python -m benchmarks.bench_manifest --images 2000        # quicker
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from customkd_cache.data import datasets, digests, open_dataset
from customkd_cache.specs import DatasetSpec


def base_jpegs(seed: int) -> list[bytes]:
    """JPEG encodings of noise images from about 20 KB to about 200 KB."""
    rng = np.random.default_rng(seed)
    out = []
    for side in range(140, 540, 4):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return [b for b in out if 20_000 <= len(b) <= 200_000]


def write_folder(root: Path, images: int, classes: int, seed: int) -> int:
    """``images`` unique JPEG files under ``root/class_k/``; returns their total bytes."""
    bases = base_jpegs(seed)
    rnd = random.Random(seed)
    total = 0
    for k in range(classes):
        (root / f"class_{k:03d}").mkdir(parents=True)
    for i in range(images):
        target = rnd.uniform(20_000, 200_000)  # sizes spread evenly over the range
        base = min(bases, key=lambda x: abs(len(x) - target))
        comment = f"image {i}".encode()
        # SOI, then a COM segment (length includes its two bytes), then the rest of the encoding
        data = base[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + base[2:]
        (root / f"class_{i % classes:03d}" / f"{i:06d}.jpg").write_bytes(data)
        total += len(data)
    return total


def time_open(spec: DatasetSpec) -> tuple[float, str]:
    t = time.perf_counter()
    digest = open_dataset(spec).manifest.digest()
    return time.perf_counter() - t, digest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_manifest_", dir=args.dir))
    try:
        t = time.perf_counter()
        total = write_folder(work / "data", args.images, args.classes, args.seed)
        print(
            f"{args.images} JPEG files, {total / 2**20:.0f} MiB (mean {total / args.images / 1000:.0f} KB), "
            f"written in {time.perf_counter() - t:.1f} s"
        )
        time.sleep(digests.RACY_NS / 1e9)  # files changed just before hashing are not cached
        spec = DatasetSpec(kind="image_folder", root=str(work / "data"))
        real = datasets._content_digests
        times: dict[str, list[float]] = {"size only": [], "content, cold": [], "content, warm": []}
        warm_root = work / "warm"
        warm_root.mkdir()
        os.environ["CUSTOMKD_CACHE_ROOT"] = str(warm_root)
        open_dataset(spec)  # fills the warm cache
        for r in range(args.repeats):
            datasets._content_digests = lambda splits, root, reader: (splits, ())  # type: ignore[assignment]
            times["size only"].append(time_open(spec)[0])
            datasets._content_digests = real  # type: ignore[assignment]
            cold_root = work / f"cold{r}"
            cold_root.mkdir()
            os.environ["CUSTOMKD_CACHE_ROOT"] = str(cold_root)
            seconds, cold = time_open(spec)
            times["content, cold"].append(seconds)
            os.environ["CUSTOMKD_CACHE_ROOT"] = str(warm_root)
            seconds, warm = time_open(spec)
            times["content, warm"].append(seconds)
            assert cold == warm, "the cache changed the digest"
        base = statistics.median(times["size only"])
        print(f"open_dataset, median of {args.repeats} (min-max), ratio to size only:")
        for name, values in times.items():
            med = statistics.median(values)
            print(
                f"  {name:14s} {med:7.3f} s ({min(values):.3f}-{max(values):.3f})  "
                f"{1000 * med / args.images * 1000:7.1f} ms per 1000 images  x{med / base:.2f}"
            )
        cold_med = statistics.median(times["content, cold"])
        print(f"  hashing throughput (cold): {total / 2**20 / cold_med:.0f} MiB/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
