"""UDA where the teacher knows the target: MNIST -> MNIST-M and Fashion-MNIST -> sketches.

Two benchmarks from real images (``evidence/mnistm.py``, ``evidence/fmnist_shift.py``), each one
``list_file`` dataset and one cache (``cache_specs/{mnistm,fmnist_sketch}/``, EfficientNet-Lite0 unless
``--teacher`` names another spec of those folders, e.g. ``vit_s14_112`` for the sketches),
trained with the shipped pipelines (``pipelines/mnistm/mnist_to_mnistm.toml``,
``pipelines/fmnist_sketch/fmnist_to_sketch.toml``).

Per benchmark: the teacher probe (linear, trained on the source images' view-0 features, the
project's probe defaults) on the target evaluation split, beside source only (``student_only``);
then every method of :data:`METHODS` with the same search budget: each candidate of :data:`GRID` at
the first seed, the one with the best accuracy on the held-out labeled **source** split (``uda.val``)
chosen per method, then run at the other seeds of :data:`SEEDS`; mean ± std of the last epoch. Target
labels choose nothing.

    python -m evidence.uda_study --shard 0/2 & python -m evidence.uda_study --shard 1/2   # 2 processes
    python -m evidence.uda_study --quick    # tiny sizes: checks the pipeline, numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from customkd_cache.specs import METHODS as KNOWN_METHODS
from customkd_cache.specs import data_root
from evidence import study
from evidence.fmnist import log
from evidence.fmnist_shift import SPLITS as SKETCH_SPLITS
from evidence.fmnist_shift import write_fmnist_shift_domains
from evidence.mnistm import SPLITS as MNISTM_SPLITS
from evidence.mnistm import write_mnistm_domains
from evidence.teacher_probe import probe_store

REPO = Path(__file__).resolve().parents[1]
# (name, data folder, splits, writer, cache spec, pipeline, source split, eval split)
BENCHMARKS = (
    (
        "fmnist_to_sketch",
        "fmnist_sketch",
        SKETCH_SPLITS,
        write_fmnist_shift_domains,
        REPO / "cache_specs" / "fmnist_sketch" / "efficientnet_lite0.toml",
        REPO / "pipelines" / "fmnist_sketch" / "fmnist_to_sketch.toml",
        "fmnist_train",
        "sketch_test",
    ),
    (
        "mnist_to_mnistm",
        "mnistm",
        MNISTM_SPLITS,
        write_mnistm_domains,
        REPO / "cache_specs" / "mnistm" / "efficientnet_lite0.toml",
        REPO / "pipelines" / "mnistm" / "mnist_to_mnistm.toml",
        "mnist_train",
        "mnistm_test",
    ),
)
# the logits-matching baseline joins when the installed package has it
METHODS = tuple(
    m for m in ("student_only", "kd", "dkd", "customkd", "customkd+dkd", "logits") if m in KNOWN_METHODS
)
# Every method gets the same search budget: the SSL study's two candidates (AdamW lr 3e-3, SGD lr
# 0.03) at 5 passes over the target, chosen per method on the held-out labeled SOURCE split
# (``uda.val``) at seed 0, then run at seeds 1 and 2. Target labels choose nothing.
GRID: study.Grid = (("adamw", (3e-3,)), ("sgd", (0.03,)))
SEEDS = (0, 1, 2)
FULL = study.Plan(0, 0, 0, 3, (5,), SEEDS, (), GRID, 0)
QUICK = study.Plan(0, 0, 0, 3, (1,), (0, 1), (), GRID, 200, uda_epochs=1)


def prepare(
    bench: tuple[Any, ...], plan: study.Plan, given: Path | None = None, teacher: str = "efficientnet_lite0"
) -> dict[str, Any]:
    """The benchmark's data (written once), its store (computed once, or ``given``: a store of the
    same cache spec made by an earlier version, checked against the dataset by every run) and the
    teacher probe."""
    name, folder, splits, writer, cache_spec, pipeline, source, target_eval = bench
    cache_spec = cache_spec.with_name(f"{teacher}.toml")
    root = data_root().resolve() / folder  # absolute: a relative dataset.root is read under data_root
    if study.JOBS.index == 0:
        writer(root)
    while not all((root / f"{s}.txt").is_file() for s in splits):
        time.sleep(5)  # shard 0 writes them
    data = [f"dataset.root={root}", f"dataset.lists={json.dumps([str(root / f'{s}.txt') for s in splits])}"]
    if plan.uda_max:
        data.append(f"dataset.max_per_split={plan.uda_max}")
    store = (
        given.resolve() if given else study.cache(cache_spec, [*data, "run.threads=1", "run.num_workers=1"])
    )
    probe = probe_store(store, train_split=source, test_split=target_eval)
    log(f"[uda] {name}: teacher probe {source} -> {target_eval}: {probe['linear_probe_accuracy']:.4f}")
    return {
        "store": str(store),
        "teacher_probe": probe,
        "common": [*data, f"cache.spec={cache_spec}", f"cache.store={store}", *study.RUN],
    }


def run_benchmark(
    plan: study.Plan, work: Path, name: str, prep: dict[str, Any], methods: tuple[str, ...] = METHODS
) -> dict[str, Any]:
    """Every method of ``methods`` on one benchmark: its setting chosen from :data:`GRID` on the
    source validation split at the first seed (:func:`study.protocol`), then run at every seed;
    sweep calls shared round-robin between the ``--shard`` processes."""
    epochs = plan.epochs[0] if plan.uda_epochs is None else plan.uda_epochs
    pipeline = next(b[5] for b in BENCHMARKS if b[0] == name)
    table, _ = study.protocol(
        pipeline,
        work / name,
        plan,
        methods=methods,
        grid=plan.uda_grid,
        epochs=(epochs,),
        common_for=lambda seed: prep["common"],
    )
    return {"grid": [list(g) for g in plan.uda_grid], "epochs": epochs, "methods": table}


def summarize(prep: dict[str, Any], ran: dict[str, Any]) -> dict[str, Any]:
    return {"store": prep["store"], "teacher_probe": prep["teacher_probe"], **ran}


def write_report(out: Path, results: dict[str, Any], command: str, stem: str = "uda") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    lines = [
        "# UDA where the teacher is strong: MNIST → MNIST-M, Fashion-MNIST → sketches",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {results['wall_minutes']:.1f} min on {os.cpu_count()} CPU cores.  ",
        f"Methods: {', '.join(results.get('methods', METHODS))}; {results['epochs']} epochs; "
        f"seeds {results['seeds']}; teacher: each benchmark's "
        f"`{results.get('teacher', 'efficientnet_lite0')}.toml` cache spec.",
        "",
        "Target test accuracy in %, mean ± std over seeds of the last epoch (evaluated after the last "
        "epoch only, so the best-epoch column repeats it). Every method gets the same search budget: "
        "the candidates below at seed 0, the one with the best accuracy on the held-out labeled SOURCE "
        "split (val) chosen per method, then run at the other seeds; target labels choose nothing. "
        "Teacher probe: linear probe on "
        "the source training images' view-0 features (evidence/teacher_probe.py), evaluated on the "
        "target test split; in-run probe: the probe each run trains on the source rows (kd's runs).",
    ]
    for name, row in results["benchmarks"].items():
        p = row["teacher_probe"]
        ms = row["methods"]
        source_only = study._cell(ms["student_only"]["test"]) if "student_only" in ms else "not run"
        in_run = study._cell(ms["kd"]["teacher"]) if "kd" in ms else "not run (kd's runs)"
        lines += [
            "",
            f"## {name.replace('_to_', ' → ')}",
            "",
            f"Teacher probe on the target test split: {100 * p['linear_probe_accuracy']:.2f} % "
            f"(1-NN {100 * p['nn1_accuracy']:.2f} %; {p['train_images']} source / "
            f"{p['test_images']} target images). Source only: "
            f"{source_only}. In-run probe: "
            f"{in_run}. Candidates per method "
            f"(optimizer, learning rates): `{json.dumps(row['grid'])}`.",
            "",
            *[
                x.replace("chosen on validation (seed 0)", "chosen on source val (seed 0)")
                for x in study.methods_table(row["methods"])
            ],
        ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline only")
    ap.add_argument("--work", type=Path, default=Path("runs/uda_study"))
    ap.add_argument("--report-only", action="store_true", help="train nothing: report what has finished")
    ap.add_argument("--shard", default="0/1", help="I/N: this process's share of the sweeps")
    ap.add_argument("--out", type=Path, default=None, help="default: evidence/results (quick: WORK/results)")
    ap.add_argument("--only", default="", help="one benchmark by name (default: both)")
    ap.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="METHOD",
        help=f"run and report only these methods, in this order (default: all of {', '.join(METHODS)})",
    )
    ap.add_argument(
        "--store",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="use this store for benchmark NAME instead of computing its cache spec's",
    )
    ap.add_argument(
        "--teacher",
        default="efficientnet_lite0",
        help="the cache spec of each benchmark's cache_specs folder, by file name (default: %(default)s)",
    )
    ap.add_argument("--name", default="uda", help="results file name, NAME.{json,md} (default: %(default)s)")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    work = args.work.resolve()
    index, count = (int(x) for x in args.shard.split("/"))
    study.JOBS.index, study.JOBS.count, study.JOBS.report_only = index, count, args.report_only
    out = args.out or (work / "results" if args.quick else REPO / "evidence" / "results")
    os.environ.setdefault("CUSTOMKD_CACHE_ROOT", str(REPO / "caches"))
    t0 = time.perf_counter()
    benches = [b for b in BENCHMARKS if not args.only or b[0] == args.only]
    methods = tuple(dict.fromkeys(args.methods))
    results: dict[str, Any] = {
        "plan": asdict(plan),
        "methods": list(methods),
        "epochs": plan.epochs[0] if plan.uda_epochs is None else plan.uda_epochs,
        "seeds": list(plan.seeds),
        "teacher": args.teacher,
    }
    given = {k: Path(v) for k, v in (x.split("=", 1) for x in args.store)}
    for b in benches:
        if not b[4].with_name(f"{args.teacher}.toml").is_file():
            ap.error(
                f"{b[0]} has no cache spec {b[4].with_name(args.teacher + '.toml')}: pick --only or --teacher"
            )
    preps = {b[0]: prepare(b, plan, given.get(b[0]), args.teacher) for b in benches}
    results["benchmarks"] = {
        name: summarize(prep, run_benchmark(plan, work, name, prep, methods)) for name, prep in preps.items()
    }
    results["wall_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    if index != 0:
        return
    command = "python -m evidence.uda_study" + (" --quick" if args.quick else "")
    if args.only:
        command += f" --only {args.only}"
    if args.teacher != "efficientnet_lite0":
        command += f" --teacher {args.teacher}"
    if args.name != "uda":
        command += f" --name {args.name}"
    if methods != METHODS:
        command += f" --methods {' '.join(methods)}"
    if count > 1:
        command += f" (with --shard I/{count}, {count} processes)"
    write_report(out, results, command, args.name)
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
