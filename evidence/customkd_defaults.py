"""Choose CustomKD's defaults on validation across label counts and seeds, and compare with KD.

Fashion-MNIST, EfficientNet-Lite0 teacher (112 px, ``--views`` cached views), the shipped pipeline
``pipelines/fashion_mnist/labels4_mobilenetv3.toml`` with only the labeled count, the lists and the
candidate's own options changed. For every setting (labels per class x seed; each seed draws its own
labeled, unlabeled and validation lists from the first ``--train`` training images) it trains
``student_only`` once and every candidate of ``kd`` and ``customkd`` (the same number of candidates
each: the search budget is equal). A candidate is chosen per method by its mean validation accuracy
over all settings (the validation rows are held out from training); test accuracy is reported
beside it and never used to choose. Results: ``evidence/results/customkd_defaults.{json,md}``.

    python -m evidence.customkd_defaults                       # the study (2 processes)
    python -m evidence.customkd_defaults --per-class 4 10 --seeds 3 4 --candidates kd:T=4 customkd:pre
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from customkd_cache.specs import load_cache_spec, load_train_spec
from customkd_cache.stage_one import extract
from customkd_cache.stage_two.train import run_train
from evidence.fmnist import ensure_fashion_mnist, log, read_idx, ssl_lists

REPO = Path(__file__).resolve().parents[1]
CACHE_SPECS = REPO / "cache_specs" / "fashion_mnist"
TRAIN_SPEC = REPO / "pipelines" / "fashion_mnist" / "labels4_mobilenetv3.toml"
OUT = REPO / "evidence" / "results"

# The paper's L_task and an unregularized stage A: the defaults before 2026-12-06. Candidates from before
# then name them, so each keeps meaning what it was run with.
PAPER = ["customkd.task_loss=mse", "customkd.stage_a_weight_decay=0"]
# The defaults of 2026-12-06 (151f422), spelled out, so candidates that vary them keep their meaning.
LOGIT_KL = ["customkd.task_loss=logit_kl", "customkd.stage_a_weight_decay=0.5"]
# name -> (method, overrides). Each method has the same number of candidates (equal search budget).
CANDIDATES: dict[str, tuple[str, list[str]]] = {
    "student_only": ("student_only", []),
    "kd:T=1": ("kd", ["kd.temperature=1"]),
    "kd:T=2": ("kd", ["kd.temperature=2"]),
    "kd:T=4": ("kd", ["kd.temperature=4"]),
    "kd:T=8": ("kd", ["kd.temperature=8"]),
    "customkd:feat,rms10": (
        "customkd",
        [*PAPER, "customkd.target_space=features", "customkd.target_bound=fixed_rms"],
    ),
    "customkd:pre,rms10": (
        "customkd",
        [*PAPER, "customkd.target_space=pre_activation", "customkd.target_bound=fixed_rms"],
    ),
    "customkd:feat,student1": (
        "customkd",
        [
            *PAPER,
            "customkd.target_space=features",
            "customkd.target_bound=student_rms",
            "customkd.target_bound_scale=1",
        ],
    ),
    "customkd:pre,student1": (
        "customkd",
        [
            *PAPER,
            "customkd.target_space=pre_activation",
            "customkd.target_bound=student_rms",
            "customkd.target_bound_scale=1",
        ],
    ),
    # the ViT-S/14 study (evidence/results/customkd_vit.md): L_task's form and stage A's regularization
    "customkd:pre": ("customkd", PAPER),
    "customkd:norm,lt10,wd0.5": (
        "customkd",
        ["customkd.task_loss=normalized", "customkd.lambda_task=10", "customkd.stage_a_weight_decay=0.5"],
    ),
    "customkd:norm,wd0.5": (
        "customkd",
        ["customkd.task_loss=normalized", "customkd.stage_a_weight_decay=0.5"],
    ),
    "customkd:logitkl,wd0.5": ("customkd", LOGIT_KL),
    "customkd:logitkl": ("customkd", ["customkd.task_loss=logit_kl", "customkd.stage_a_weight_decay=0"]),
    # the open questions about the ViT case (2026-12-06): a relational L_gen, and the student
    # at 64 px instead of 32 (the teacher sees 112 px); the defaults otherwise
    "customkd:logitkl,wd0.5,sp": ("customkd", [*LOGIT_KL, "customkd.gen_loss=relational"]),
    "student_only:64px": ("student_only", ["student.input_size=64"]),
    "kd:T=4,64px": ("kd", ["kd.temperature=4", "student.input_size=64"]),
    "customkd:logitkl,wd0.5,64px": ("customkd", [*LOGIT_KL, "student.input_size=64"]),
    "customkd+kd:lt0.3": ("customkd+kd", [*PAPER, "customkd.lambda_task=0.3"]),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--teachers",
        nargs="+",
        default=["efficientnet_lite0"],
        help="cache specs under cache_specs/fashion_mnist/ (without .toml), one store each",
    )
    ap.add_argument("--cache-only", action="store_true", help="build the stores and stop")
    ap.add_argument("--per-class", type=int, nargs="+", default=[4, 10, 25], help="labels per class")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--train", type=int, default=4000, help="training images cached (lists come from them)")
    ap.add_argument("--unlabeled", type=int, default=2000)
    ap.add_argument("--val", type=int, default=1000, help="held-out labeled validation images")
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=0, help="0: the pipeline's")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "customkd_defaults")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--name", default="customkd_defaults", help="results file name (without .json/.md)")
    return ap.parse_args(argv)


def data_overrides(folder: Path, args: argparse.Namespace) -> list[str]:
    return [f"dataset.root={folder}", f"dataset.max_per_split={{train = {args.train}, test = {args.test}}}"]


def train_one(job: dict[str, Any]) -> dict[str, Any]:
    """One run (in a worker process); its results.json is reused when the run finished before."""
    out = Path(job["out"])
    done = out / "results.json"
    if not done.is_file():
        spec = load_train_spec(TRAIN_SPEC, job["overrides"])
        t0 = time.perf_counter()
        run_train(spec, spec_path=TRAIN_SPEC, out=out)
        log(f"[defaults] {out.name}: {time.perf_counter() - t0:.0f} s")
    res = json.loads(done.read_text())
    keep = ("student_accuracy", "val_accuracy", "best_val_accuracy", "teacher_accuracy", "wall_seconds")
    return {
        **{k: res.get(k) for k in keep},
        **{k: job[k] for k in ("candidate", "teacher", "per_class", "seed")},
    }


def jobs(args: argparse.Namespace, folder: Path, stores: dict[str, Path]) -> list[dict[str, Any]]:
    _, labels = read_idx(folder, "train")
    out = []
    settings = [(s, t, pc) for s in args.seeds for t in stores for pc in args.per_class]
    # seed by seed: an interrupted study has whole seeds of every teacher and label count
    for seed, teacher, per_class in settings:
        store = stores[teacher]
        if True:
            lists = ssl_lists(
                args.work / "lists",
                labels=labels[: args.train],
                n_pool=args.unlabeled,
                n_val=args.val,
                per_class=per_class,
                seed=seed,
            )
            for name in args.candidates:
                method, extra = CANDIDATES[name]
                overrides = [
                    *data_overrides(folder, args),
                    f"cache.spec={CACHE_SPECS / (teacher + '.toml')}",
                    f"cache.store={store}",
                    f"method={method}",
                    f"seed={seed}",
                    f"ssl.labeled_list={lists['labeled'].resolve()}",
                    f"ssl.unlabeled_list={lists['pool'].resolve()}",
                    f"ssl.val_list={lists['val'].resolve()}",
                    "run.threads=1",
                    "run.num_workers=0",
                    "run.eval_every=5",
                    *([f"optim.epochs={args.epochs}"] if args.epochs else []),
                    *extra,
                ]
                tag = name.replace(":", "_").replace(",", "_").replace("=", "")
                prefix = "" if teacher == "efficientnet_lite0" else f"{teacher}_"
                run_dir = args.work / f"{prefix}pc{per_class}_s{seed}_{tag}"
                out.append(
                    {
                        "candidate": name,
                        "teacher": teacher,
                        "per_class": per_class,
                        "seed": seed,
                        "overrides": overrides,
                        "out": str(run_dir),
                    }
                )
    return out


def _stats(vals: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per candidate: validation and test accuracy over all settings and per label count; the
    candidate chosen per method (best mean validation accuracy)."""
    by_cand: dict[str, Any] = {}
    for name in dict.fromkeys(r["candidate"] for r in runs):
        mine = [r for r in runs if r["candidate"] == name]
        per = {}
        keys = sorted({(r["teacher"], r["per_class"]) for r in mine})
        multi = len({t for t, _ in keys}) > 1
        for teacher, pc in keys:
            rows = [r for r in mine if r["per_class"] == pc and r["teacher"] == teacher]
            per[f"{teacher} {pc}" if multi else str(pc)] = {
                "val": _stats([100 * r["val_accuracy"] for r in rows]),
                "test": _stats([100 * r["student_accuracy"] for r in rows]),
            }
        by_cand[name] = {
            "method": CANDIDATES[name][0],
            "val": _stats([100 * r["val_accuracy"] for r in mine]),
            "test": _stats([100 * r["student_accuracy"] for r in mine]),
            "per_class": per,
        }
    chosen = {}
    for method in dict.fromkeys(c["method"] for c in by_cand.values()):
        names = [n for n, c in by_cand.items() if c["method"] == method]
        chosen[method] = max(names, key=lambda n: by_cand[n]["val"]["mean"])
    return {"candidates": by_cand, "chosen": chosen}


def _setting_order(key: str) -> tuple[str, int]:
    """'4' or 'teacher 4' (several teachers): by teacher, then labels per class."""
    teacher, _, pc = key.rpartition(" ")
    return teacher, int(pc)


def write_report(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['name']}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    summ = result["summary"]
    pcs = sorted({pc for c in summ["candidates"].values() for pc in c["per_class"]}, key=_setting_order)
    teachers = ", ".join(result["plan"]["teachers"])
    lines = [
        f"# CustomKD defaults chosen on validation (Fashion-MNIST, teachers: {teachers})",
        "",
        f"Command: `{result['command']}` ({result['minutes']:.0f} min, {result['machine']}).",
        f"Plan: {json.dumps(result['plan'])}.",
        "",
        "Accuracy (%) of the student, last epoch, mean ± std over seeds. val: held-out labeled "
        "training images (used to choose); test: the test images (reported, never used to choose). "
        "**bold**: the candidate chosen per method on mean validation accuracy over all settings.",
        "",
        "| candidate | val (all) | "
        + " | ".join(f"val {pc}/class | test {pc}/class" for pc in pcs)
        + " | test (all) |",
        "|---|---|" + "---|---|" * len(pcs) + "---|",
    ]
    chosen = set(summ["chosen"].values())
    for name, c in summ["candidates"].items():
        cells = [f"{c['val']['mean']:.2f} ± {c['val']['std']:.2f}"]
        for pc in pcs:
            p = c["per_class"].get(pc)
            cells += (
                [
                    f"{p['val']['mean']:.2f} ± {p['val']['std']:.2f}",
                    f"{p['test']['mean']:.2f} ± {p['test']['std']:.2f}",
                ]
                if p
                else ["", ""]
            )
        cells.append(f"{c['test']['mean']:.2f} ± {c['test']['std']:.2f}")
        shown = f"**{name}**" if name in chosen else name
        lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    lines += ["", f"Teacher probe (linear on the labels), test: {result['probe']}", ""]
    (out / f"{result['name']}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = " ".join(["python -m evidence.customkd_defaults", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("CUSTOMKD_CACHE_ROOT", str(REPO / "caches"))
    t0 = time.perf_counter()
    folder = ensure_fashion_mnist()
    stores: dict[str, Path] = {}
    for teacher in args.teachers:
        cpath = CACHE_SPECS / f"{teacher}.toml"
        cspec = load_cache_spec(
            cpath, [*data_overrides(folder, args), f"views.num_views={args.views}", "run.num_workers=1"]
        )
        stores[teacher] = extract.run_cache(
            cspec, spec_path=cpath, shard=extract.Shard(), progress=False
        ).path
        log(f"[defaults] {teacher}: {stores[teacher]}")
    if args.cache_only:
        return
    todo = jobs(args, folder, stores)
    log(f"[defaults] {len(todo)} runs, {args.jobs} at a time")
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(train_one, todo))
    probe: dict[str, Any] = {}
    for teacher in args.teachers:
        for pc in args.per_class:
            # one probe per seed: every run of a seed trains the same probe on the same labels
            per_seed = {
                r["seed"]: 100 * r["teacher_accuracy"]
                for r in runs
                if r["teacher"] == teacher and r["per_class"] == pc and r["teacher_accuracy"]
            }
            vals = list(per_seed.values())
            if vals:
                s = _stats(vals)
                probe[f"{teacher} {pc}/class"] = f"{s['mean']:.2f} ± {s['std']:.2f}"
    result = {
        "name": args.name,
        "command": command,
        "machine": f"{os.cpu_count()} CPU cores, {args.jobs} runs at a time, 1 torch thread each",
        "minutes": (time.perf_counter() - t0) / 60,
        "plan": {k: v for k, v in vars(args).items() if k not in ("work", "out", "jobs")},
        "stores": {t: str(p) for t, p in stores.items()},
        "runs": runs,
        "probe": probe,
        "summary": summarize(runs),
    }
    write_report(args.out, result)
    log(f"[defaults] chosen: {result['summary']['chosen']}; wrote {args.out}/{args.name}.{{json,md}}")


if __name__ == "__main__":
    main()
