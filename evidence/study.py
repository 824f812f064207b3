"""``make evidence``: CustomKD against its baselines on real images, reproducibly.

Everything runs offline on Fashion-MNIST with the ImageNet-pretrained EfficientNet-Lite0 teacher:

1. **SSL**: 4 labels per class, a fixed unlabeled pool, evaluation on the 10k test images; methods
   student_only, kd, fitnet, dkd, customkd, customkd+kd; 3 seeds (each seed draws its own labeled
   set, pool and validation split); mean +- std.
2. **Cache fidelity**: customkd with the online teacher (seed 0), with the cache replaying its V
   views (the SSL runs), and with the cache at view 0 only (the fixed-teacher setting).
3. **UDA**: source = original training images, target = other training images inverted and rotated
   by 90 degrees; evaluation on shifted test images; student_only, kd, customkd; 3 seeds.

Hyper-parameters are chosen on a validation split carved from the training images (seed 0's),
never on the test images: the learning rate for the baselines (picked with student_only), the
learning rate and the loss weights lambda_gen = lambda_spec for the customkd methods (picked with
customkd). UDA uses fixed settings (lr 0.05, lambdas 1). Results go to evidence/results/ as JSON,
a markdown table and a PNG.

    python -m evidence.study            # the full study (about an hour on 2 cores)
    python -m evidence.study --quick    # a few minutes, tiny sizes: checks the pipeline only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from customkd_cache import extract
from customkd_cache.errors import NonFiniteLossError
from customkd_cache.specs import CacheSpec, TrainSpec, load_cache_spec, validate
from customkd_cache.train import run_train
from evidence.fmnist import ensure_fashion_mnist, log, read_idx, ssl_lists, write_shift_domains

REPO = Path(__file__).resolve().parents[1]
CACHE_SPEC = REPO / "cache_specs" / "fashion_mnist" / "efficientnet_lite0.toml"
SSL_METHODS = ("student_only", "kd", "fitnet", "dkd", "customkd", "customkd+kd")
UDA_METHODS = ("student_only", "kd", "customkd")


@dataclass(frozen=True)
class Plan:
    n_pool: int
    n_val: int
    n_test: int
    views: int
    epochs: int
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]
    lambdas: tuple[float, ...]
    uda_source: int
    uda_target: int
    uda_test: int
    online: bool


FULL = Plan(3000, 1000, 10000, 3, 10, (0, 1, 2), (0.03, 0.1), (1.0, 0.25), 2000, 2000, 2000, True)
QUICK = Plan(200, 100, 300, 2, 2, (0, 1), (0.05,), (1.0, 0.25), 150, 150, 100, True)


def cache(spec: CacheSpec) -> Path:
    res = extract.run_cache(spec, spec_path=CACHE_SPEC, shard=extract.Shard(), progress=True)
    return res.path


def ssl_cache_spec(folder: Path, plan: Plan) -> CacheSpec:
    n_train = 40 + plan.n_pool + plan.n_val
    return load_cache_spec(
        CACHE_SPEC,
        [
            f"dataset.root={folder}",
            f"dataset.max_per_split={{train = {n_train}, test = {plan.n_test}}}",
            f"views.num_views={plan.views}",
        ],
    )


def uda_cache_spec(root: Path, plan: Plan) -> CacheSpec:
    data = CacheSpec.model_validate(
        {
            **load_cache_spec(CACHE_SPEC).model_dump(),
            "dataset": {
                "kind": "list_file",
                "root": str(root),
                "lists": [str(root / f"{s}.txt") for s in ("source", "target", "target_test")],
            },
        }
    )
    return data.model_copy(update={"views": data.views.model_copy(update={"num_views": plan.views})})


def train_one(base: dict[str, Any], out: Path, **updates: Any) -> dict[str, Any]:
    spec = validate(TrainSpec, _merge(base, updates), f"study:{out.name}")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        res = run_train(spec, spec_path=CACHE_SPEC, out=out)
    except NonFiniteLossError as e:  # reported as diverged, not hidden
        log(f"[study] {out.name}: diverged: {e}")
        return {"student_accuracy": None, "teacher_accuracy": None, "diverged": str(e), "method": spec.method}
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    log(
        f"[study] {out.name}: student {res['student_accuracy']:.4f}, "
        f"teacher probe {res['teacher_accuracy']:.4f}"
    )
    return res


def _merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in updates.items():
        node = out
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def ssl_base(folder: Path, plan: Plan, store: Path) -> dict[str, Any]:
    n_train = 40 + plan.n_pool + plan.n_val
    return {
        "method": "customkd",
        "protocol": "ssl",
        "dataset": {
            "kind": "fashion_mnist",
            "root": str(folder),
            "max_per_split": {"train": n_train, "test": plan.n_test},
        },
        "cache": {"spec": str(CACHE_SPEC), "store": str(store)},
        "ssl": {"train_split": "train", "eval_split": "test", "labeled_list": ""},
        "student": {"name": "mobilenetv3_small_050", "input_size": 32},
        "optim": {"epochs": plan.epochs, "batch_size": 128, "labeled_per_batch": 0.25},
        "probe": {"epochs": 100},
        "run": {"num_workers": 2, "threads": 2, "eval_every": plan.epochs},
    }


def run_ssl(folder: Path, plan: Plan, work: Path) -> dict[str, Any]:
    store = cache(ssl_cache_spec(folder, plan))
    _, labels = read_idx(folder, "train")
    n_train = 40 + plan.n_pool + plan.n_val
    base = ssl_base(folder, plan, store)
    lists = {
        s: ssl_lists(
            work / "lists", labels=labels[:n_train], n_pool=plan.n_pool, n_val=plan.n_val, per_class=4, seed=s
        )
        for s in plan.seeds
    }

    def with_lists(seed: int, evaluate_on_val: bool = False) -> dict[str, Any]:
        lst = lists[seed]
        upd: dict[str, Any] = {
            "seed": seed,
            "ssl__labeled_list": str(lst["labeled"]),
            "ssl__unlabeled_list": str(lst["pool"]),
        }
        if evaluate_on_val:
            upd.update(ssl__eval_split="train", ssl__eval_list=str(lst["val"]))
        return upd

    # hyper-parameters on validation (seed 0): lr for the baselines, lr and loss weights for customkd
    grids: dict[str, list[dict[str, Any]]] = {
        "student_only": [{"optim__lr": lr} for lr in plan.lrs],
        "customkd": [
            {"optim__lr": lr, "customkd__lambda_gen": lam, "customkd__lambda_spec": lam}
            for lr in plan.lrs
            for lam in plan.lambdas
        ],
    }
    chosen: dict[str, dict[str, Any]] = {}
    val_scores: dict[str, dict[str, float]] = {}
    for family, grid in grids.items():
        scores: dict[str, float] = {}
        for point in grid:
            name = "_".join(f"{k.split('__')[-1]}{v}" for k, v in point.items())
            res = train_one(
                base, work / f"val_{family}_{name}", method=family, **point, **with_lists(0, True)
            )
            scores[json.dumps(point, sort_keys=True)] = res["student_accuracy"]
        val_scores[family] = scores
        chosen[family] = json.loads(max(scores, key=lambda k: scores[k]))
    hp = {m: chosen["customkd" if m.startswith("customkd") else "student_only"] for m in SSL_METHODS}

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in SSL_METHODS}
    for seed in plan.seeds:
        for m in SSL_METHODS:
            runs[m].append(train_one(base, work / f"ssl_{m}_s{seed}", method=m, **hp[m], **with_lists(seed)))
    fidelity: dict[str, list[dict[str, Any]]] = {"cache_V_views": runs["customkd"], "cache_view0_only": []}
    for seed in plan.seeds:
        fidelity["cache_view0_only"].append(
            train_one(
                base,
                work / f"fid_view0_s{seed}",
                method="customkd",
                train_views="eval",
                **hp["customkd"],
                **with_lists(seed),
            )
        )
    if plan.online:
        fidelity["online_teacher"] = [
            train_one(
                base,
                work / "fid_online_s0",
                method="customkd",
                teacher_mode="online",
                **hp["customkd"],
                **with_lists(0),
            )
        ]
    return {
        "chosen_on_val": chosen,
        "val_accuracy": val_scores,
        "hyperparameters": hp,
        "runs": runs,
        "fidelity": fidelity,
        "store": str(store),
    }


def run_uda(folder: Path, plan: Plan, work: Path) -> dict[str, Any]:
    root = write_shift_domains(
        work / "fmnist_shift",
        folder,
        n_source=plan.uda_source,
        n_target=plan.uda_target,
        n_test=plan.uda_test,
        seed=0,
    )
    cspec = uda_cache_spec(root, plan)
    store = cache(cspec)
    base = {
        "method": "customkd",
        "protocol": "uda",
        "dataset": cspec.dataset.model_dump(),
        "cache": {"spec": str(CACHE_SPEC), "store": str(store)},
        "uda": {"source": ["source"], "target": ["target"], "eval": ["target_test"]},
        "student": {"name": "mobilenetv3_small_050", "input_size": 32},
        "optim": {"epochs": plan.epochs, "batch_size": 128, "labeled_per_batch": 0.5, "lr": 0.05},
        "probe": {"epochs": 30},
        "run": {"num_workers": 2, "threads": 2, "eval_every": plan.epochs},
    }
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in UDA_METHODS}
    for seed in plan.seeds:
        for m in UDA_METHODS:
            runs[m].append(train_one(base, work / f"uda_{m}_s{seed}", method=m, seed=seed))
    return {"runs": runs, "store": str(store)}


def summary(runs: list[dict[str, Any]], key: str = "student_accuracy") -> dict[str, float]:
    """Mean/std over the runs that finished; ``diverged`` counts those stopped by a non-finite loss."""
    vals = [100 * r[key] for r in runs if r.get(key) is not None]
    return {
        "mean": statistics.mean(vals) if vals else float("nan"),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
        "diverged": sum(1 for r in runs if "diverged" in r),
    }


def _div(s: dict[str, float]) -> str:
    return f", {int(s['diverged'])} diverged" if s["diverged"] else ""


def write_report(out: Path, results: dict[str, Any], command: str, minutes: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    lines = [
        "# CustomKD on Fashion-MNIST (real images, real ImageNet-pretrained teacher)",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {minutes:.1f} min on {os.cpu_count()} CPU cores.  ",
        f"Plan: `{json.dumps(results['plan'])}`",
        "",
    ]
    ssl = results["ssl"]
    t = summary(ssl["runs"]["customkd"], "teacher_accuracy")
    lines += [
        "## SSL: 4 labels per class, test accuracy (%), mean ± std over seeds",
        "",
        f"Teacher probe (linear, EfficientNet-Lite0 features, 40 labels): {t['mean']:.2f} ± {t['std']:.2f}",
        "",
        "| method | chosen on validation | accuracy |",
        "|---|---|---|",
    ]
    for m, rs in ssl["runs"].items():
        s = summary(rs)
        hp = ", ".join(f"{k.split('__')[-1]}={v}" for k, v in ssl["hyperparameters"][m].items())
        lines.append(f"| {m} | {hp} | {s['mean']:.2f} ± {s['std']:.2f} (n={s['n']}{_div(s)}) |")
    lines += ["", "## Cache fidelity (customkd, SSL)", "", "| teacher features | accuracy |", "|---|---|"]
    for k, rs in ssl["fidelity"].items():
        s = summary(rs)
        lines.append(f"| {k} | {s['mean']:.2f} ± {s['std']:.2f} (n={s['n']}{_div(s)}) |")
    uda = results["uda"]
    t = summary(uda["runs"]["customkd"], "teacher_accuracy")
    lines += [
        "",
        "## UDA: original → inverted + rotated images, target test accuracy (%)",
        "",
        f"Teacher probe (trained on source features): {t['mean']:.2f} ± {t['std']:.2f}",
        "",
        "| method | accuracy |",
        "|---|---|",
    ]
    for m, rs in uda["runs"].items():
        s = summary(rs)
        lines.append(f"| {m} | {s['mean']:.2f} ± {s['std']:.2f} (n={s['n']}{_div(s)}) |")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    plot(out / "study.png", results)


def plot(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [
        ("SSL (4 labels/class)", results["ssl"]["runs"]),
        ("Cache fidelity (customkd)", results["ssl"]["fidelity"]),
        ("UDA (shifted target)", results["uda"]["runs"]),
    ]
    for ax, (title, groups) in zip(axes, panels, strict=True):
        names = list(groups)
        stats = [summary(groups[n]) for n in names]
        ax.bar(range(len(names)), [s["mean"] for s in stats], yerr=[s["std"] for s in stats], capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(title)
        ax.set_ylabel("test accuracy (%)")
        finite = [s for s in stats if s["n"]] or [{"mean": 50.0, "std": 0.0}]
        lo = min(s["mean"] - s["std"] for s in finite)
        ax.set_ylim(max(0.0, lo - 10), min(100.0, max(s["mean"] + s["std"] for s in finite) + 5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the pipeline, numbers mean nothing"
    )
    ap.add_argument("--work", type=Path, default=Path("runs/study"))
    ap.add_argument(
        "--out", type=Path, default=None, help="default: evidence/results (quick: runs/study/results)"
    )
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    out = args.out or (args.work / "results" if args.quick else REPO / "evidence" / "results")
    os.environ.setdefault("CUSTOMKD_CACHE_ROOT", str(REPO / "caches"))
    t0 = time.perf_counter()
    folder = ensure_fashion_mnist()
    results = {
        "plan": asdict(plan),
        "ssl": run_ssl(folder, plan, args.work),
        "uda": run_uda(folder, plan, args.work),
    }
    minutes = (time.perf_counter() - t0) / 60
    command = "python -m evidence.study" + (" --quick" if args.quick else "")
    results["wall_minutes"] = round(minutes, 1)
    write_report(out, results, command, minutes)
    print((out / "study.md").read_text())
    log(f"[study] done in {minutes:.1f} min; results in {out}")


if __name__ == "__main__":
    sys.exit(main())
