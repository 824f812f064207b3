"""int8 stores on real features: fidelity, size and the accuracy of students trained from them.

Caches the same Fashion-MNIST images and views twice with the real ImageNet-pretrained
EfficientNet-Lite0 teacher (``cache_specs/fashion_mnist/efficientnet_lite0.toml``): once as float16,
once as int8. Prints, per store, the stored feature bytes per view against the float16 floor 2 * D
and, for int8, the cosine to the teacher's float32 features recorded at write time (mean, min; goal:
mean >= 0.998), plus the cosine between the two stores' decoded features.

With ``--accuracy`` it then trains students from both stores with the shipped pipeline
(``pipelines/fashion_mnist/labels4_mobilenetv3.toml``, its defaults), each method and seed on the
same labeled set and unlabeled pool, evaluated on the cached test images, and prints mean +- std per
store (goal: the int8 mean within one std of the float16 mean).

    python -m benchmarks.bench_int8                          # fidelity and size only (minutes)
    python -m benchmarks.bench_int8 --vit-weights FILE       # also ViT-S/14 (DINOv2 architecture)
    python -m benchmarks.bench_int8 --accuracy --json out.json

Stores go under CUSTOMKD_CACHE_ROOT; run directories under ``--work``, where finished runs are
reused, so seeds can run in parallel (``--seeds 0``, ``--seeds 1``, ...) before one run with every
seed prints the comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from customkd_cache.specs import load_cache_spec, load_train_spec
from customkd_cache.stage_one import extract
from customkd_cache.stage_two.train import run_train
from customkd_cache.store import open_store
from evidence.fmnist import ensure_fashion_mnist, read_idx, ssl_lists

REPO = Path(__file__).resolve().parents[1]
CACHE_SPEC = REPO / "cache_specs" / "fashion_mnist" / "efficientnet_lite0.toml"
TRAIN_SPEC = REPO / "pipelines" / "fashion_mnist" / "labels4_mobilenetv3.toml"
DTYPES = ("float16", "int8")
PER_CLASS = 4
NUM_CLASSES = 10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def split_sizes(args: argparse.Namespace) -> str:
    n_train = PER_CLASS * NUM_CLASSES + args.unlabeled
    return f"dataset.max_per_split={{train = {n_train}, test = {args.test}}}"


def cache_store(folder: Path, dtype: str, args: argparse.Namespace) -> Path:
    spec = load_cache_spec(
        CACHE_SPEC,
        [
            f"dataset.root={folder}",
            split_sizes(args),
            f"views.num_views={args.views}",
            f"store.dtype={dtype}",
            f"run.num_workers={args.workers}",
            f"run.threads={args.threads}",
        ],
    )
    res = extract.run_cache(spec, spec_path=CACHE_SPEC, shard=extract.Shard(), progress=False)
    log(f"[int8] {dtype} store {res.path.name}: {res.units_computed} units computed in {res.seconds:.0f} s")
    return res.path


def cache_vit(folder: Path, weights: Path, args: argparse.Namespace) -> Path:
    """An int8 store of ViT-S/14 (DINOv2 architecture, CLS token) features of the first test images."""
    spec = load_cache_spec(
        CACHE_SPEC,
        [
            f"dataset.root={folder}",
            "dataset.splits=['test']",
            f"dataset.max_per_split={{test = {args.vit_images}}}",
            "teacher.name=vit_small_patch14_dinov2",
            f"teacher.weights={weights.resolve()}",
            "teacher.weights_keys=by_name",
            f"teacher.input_size={args.vit_size}",
            "teacher.feature=cls",
            f"views.num_views={args.views}",
            "store.dtype=int8",
            "run.batch_size=64",
            f"run.num_workers={args.workers}",
        ],
    )
    res = extract.run_cache(spec, spec_path=CACHE_SPEC, shard=extract.Shard(), progress=False)
    log(f"[int8] ViT-S/14 int8 store {res.path.name}: {res.units_computed} units in {res.seconds:.0f} s")
    return res.path


def cross_cosine(a: Path, b: Path) -> dict[str, float]:
    """Cosine between the decoded features of two stores of the same views, every row and view."""
    sa, sb = open_store(a), open_store(b)
    cos = []
    for split in sa.split_names:
        x = sa.read_split(split).reshape(-1, sa.feature_dim).astype(np.float64)
        y = sb.read_split(split).reshape(-1, sb.feature_dim).astype(np.float64)
        cos.append((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))
    every = np.concatenate(cos)
    return {"mean": float(every.mean()), "min": float(every.min())}


def fidelity(stores: dict[str, Path]) -> dict[str, Any]:
    """Per store (keyed as ``stores``): bytes per view, against 2 * D, and the int8 cosine."""
    out: dict[str, Any] = {}
    for dtype, path in stores.items():
        info = open_store(path).info()
        d = info["feature_dim"]
        out[dtype] = {
            "store": str(path),
            "feature_dim": d,
            "rows_x_views": sum(s["num_samples"] for s in info["splits"].values()) * info["num_views"],
            "bytes_per_view": info["bytes_per_view"],
            "fraction_of_float16_floor": info["bytes_per_view"] / (2 * d),
            "cosine_to_float32": info.get("cosine_to_float32"),
        }
    return out


def accuracy(
    folder: Path, stores: dict[str, Path], args: argparse.Namespace
) -> dict[str, dict[str, list[float]]]:
    _, labels = read_idx(folder, "train")
    n_train = PER_CLASS * NUM_CLASSES + args.unlabeled
    results: dict[str, dict[str, list[float]]] = {m: {d: [] for d in stores} for m in args.methods}
    for seed in args.seeds:
        lists = ssl_lists(
            args.work / "lists",
            labels=labels[:n_train],
            n_pool=args.unlabeled,
            n_val=0,
            per_class=PER_CLASS,
            seed=seed,
        )
        for method in args.methods:
            for dtype, store in stores.items():
                sets = [
                    f"method={method}",
                    f"seed={seed}",
                    f"dataset.root={folder}",
                    split_sizes(args),
                    f"cache.store={store}",
                    f"ssl.labeled_list={lists['labeled']}",
                    f"ssl.unlabeled_list={lists['pool']}",
                    f"run.num_workers={args.workers}",
                    f"run.threads={args.threads}",
                ]
                out = args.work / f"{method}_{dtype}_s{seed}"
                if (out / "results.json").is_file():  # finished earlier (e.g. by a parallel --seeds run)
                    res = json.loads((out / "results.json").read_text())
                else:
                    spec = load_train_spec(TRAIN_SPEC, sets)
                    # evaluate once, after the last epoch: the figure compared is the final accuracy
                    spec = load_train_spec(TRAIN_SPEC, [*sets, f"run.eval_every={spec.optim.epochs}"])
                    shutil.rmtree(out, ignore_errors=True)  # a run killed earlier starts again
                    res = run_train(spec, spec_path=TRAIN_SPEC, out=out)
                acc = 100 * float(res["student_accuracy"])
                results[method][dtype].append(acc)
                log(f"[int8] {method} {dtype} seed {seed}: {acc:.2f} %")
    return results


def _mean_std(xs: list[float]) -> str:
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.2f} +- {std:.2f}"


def report(fid: dict[str, Any], acc: dict[str, dict[str, list[float]]] | None) -> None:
    for name, f in fid.items():
        if name == "cosine_int8_vs_float16":
            continue
        line = (
            f"{name:22s} D={f['feature_dim']}  {f['rows_x_views']} views  "
            f"{f['bytes_per_view']:.1f} bytes/view  "
            f"= {f['fraction_of_float16_floor']:.3f} x the float16 floor 2*D"
        )
        if f["cosine_to_float32"]:
            cos = f["cosine_to_float32"]
            line += f"  cosine to float32: mean {cos['mean']:.6f}, min {cos['min']:.6f}"
        print(line)
    cross = fid["cosine_int8_vs_float16"]
    print(f"cosine int8 vs float16 store: mean {cross['mean']:.6f}, min {cross['min']:.6f}")
    for method, by_dtype in (acc or {}).items():
        f16, i8 = by_dtype["float16"], by_dtype["int8"]
        std = statistics.stdev(f16) if len(f16) > 1 else 0.0
        gap = statistics.mean(i8) - statistics.mean(f16)
        verdict = "within" if abs(gap) <= std else "outside"
        print(
            f"{method:10s} float16 {_mean_std(f16)} %  int8 {_mean_std(i8)} %  "
            f"(int8 - float16 = {gap:+.2f}, {verdict} one float16 std)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unlabeled", type=int, default=2000, help="unlabeled training images")
    p.add_argument("--test", type=int, default=2000, help="test images")
    p.add_argument("--views", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (run.threads); 1 is fastest on a busy machine"
    )
    p.add_argument("--vit-weights", type=Path, help="also measure ViT-S/14 (timm safetensors file)")
    p.add_argument("--vit-images", type=int, default=1024, help="test images for ViT-S/14")
    p.add_argument("--vit-size", type=int, default=112, help="ViT-S/14 input size")
    p.add_argument("--accuracy", action="store_true", help="also train students from both stores")
    p.add_argument("--methods", nargs="+", default=["customkd", "kd"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--work", type=Path, default=Path("runs/bench_int8"))
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    folder = ensure_fashion_mnist()
    stores = {dtype: cache_store(folder, dtype, args) for dtype in DTYPES}
    fid = fidelity({f"Lite0 {dtype}": path for dtype, path in stores.items()})
    fid["cosine_int8_vs_float16"] = cross_cosine(stores["int8"], stores["float16"])
    if args.vit_weights:
        fid |= fidelity({"ViT-S/14 int8": cache_vit(folder, args.vit_weights, args)})
    acc = accuracy(folder, stores, args) if args.accuracy else None
    report(fid, acc)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "fidelity": fid,
                    "accuracy": acc,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
