"""``make evidence``: CustomKD against its baselines on real images, with the paper's ablations.

Everything runs offline with the ImageNet-pretrained EfficientNet-Lite0 teacher, through the
project's own ``sweep`` and ``report`` (``customkd_cache.lab.sweep``, ``customkd_cache.lab.report``) on the
shipped pipelines:

1. **SSL** (``pipelines/fashion_mnist/labels4_mobilenetv3.toml``): Fashion-MNIST, 4 labels per
   class, a fixed unlabeled pool, a held-out labeled validation split, evaluation on the test images;
   methods student_only, kd, fitnet, dkd, customkd, customkd+kd, customkd+dkd.
2. **Ablations** (customkd at its chosen hyper-parameters): loss terms (L_task only; L_gen alone is
   the fitnet row; the paper's Table 7a) and which head customizes (the student's vs a separate
   random teacher head, with linear CKA between f_s and P_t(f_t); Table 6); the alternation of the
   two stages (Table 7b); and the view policy of stage B (customkd and kd replaying the random views
   only, or view 0 only: the fixed teacher).
3. **UDA on a real shift** (``pipelines/digits/``): UCI digits <-> MNIST, source only
   (student_only), kd, customkd, customkd+kd.

Protocol: every method gets the same search budget (optimizer x learning rate x schedule length for
SSL, the grid below; loss weights at their defaults), chosen per method on the validation split with
seed 0 (``report --select-on val_accuracy``), never on test; then 3 seeds (each seed its own
labeled set, pool and validation split for SSL); mean ± std of the last epoch. Results:
evidence/results/study.{md,json,png}.

    python -m evidence.study --shard 0/3 & python -m evidence.study --shard 1/3 & ...   # 3 processes
    python -m evidence.study --quick    # minutes, tiny sizes: checks the pipeline only
    python -m evidence.study --no-uda   # parts 1-2 only
    python -m evidence.study --no-uda --methods-only   # part 1's methods table only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from customkd_cache.lab.report import Group, build_report, read_run
from customkd_cache.lab.sweep import SweepPoint, plan_points, run_sweep
from customkd_cache.specs import data_root, load_cache_spec, load_train_spec
from customkd_cache.stage_one import extract
from evidence.digits import write_digit_domains
from evidence.fmnist import ensure_fashion_mnist, log, read_idx, ssl_lists

REPO = Path(__file__).resolve().parents[1]
SSL_PIPELINE = REPO / "pipelines" / "fashion_mnist" / "labels4_mobilenetv3.toml"
SSL_CACHE = REPO / "cache_specs" / "fashion_mnist" / "efficientnet_lite0.toml"
UDA_CACHE = REPO / "cache_specs" / "digits" / "efficientnet_lite0.toml"
UDA_DIRECTIONS = ("digits_to_mnist", "mnist_to_digits")
SSL_METHODS = ("student_only", "kd", "fitnet", "dkd", "customkd", "customkd+kd", "customkd+dkd")
UDA_METHODS = ("student_only", "kd", "customkd", "customkd+kd")
VIEW_METHODS = ("customkd", "kd")  # rerun with the other view policies:
VIEW_POLICIES = ("eval",)  # view 0 only (the fixed teacher); "random" (views 1..V-1) is the other choice
GRID_KEYS = ("method", "optim.optimizer", "optim.lr", "optim.epochs", "seed")
SEARCHED = ("optim.optimizer", "optim.lr", "optim.epochs")  # chosen per method on validation
# One torch thread and one loader worker per run: with --shard 0/2 and 1/2 two runs share 2 cores
# (two threads per run over-subscribe them and run several times slower).
RUN = ("run.threads=1", "run.num_workers=1")
# customkd at its chosen hyper-parameters with one switch changed: (table, label, overrides)
ABLATIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("loss terms (Table 7a)", "L_task only", ("customkd.lambda_gen=0.0",)),
    ("head in stage A (Table 6)", "separate random teacher head", ('customkd.stage_a_head="separate"',)),
    ("alternation (Table 7b)", "stage A every 2nd epoch", ("customkd.stage_a_every=2",)),
    ("alternation (Table 7b)", "2 stage-A cycles per epoch", ("customkd.stage_a_per_epoch=2",)),
    ("alternation (Table 7b)", "stage A once, before the first epoch", ("customkd.stage_a_every=0",)),
)
# L_gen only is the fitnet row (MSE(P_s(f_s), f_t) with the labeled CE), at its own chosen setting.


@dataclass(frozen=True)
class Plan:
    n_pool: int
    n_val: int
    n_test: int
    views: int
    epochs: tuple[int, ...]  # SSL schedule lengths searched (a hyper-parameter like the lr)
    seeds: tuple[int, ...]
    ssl_grid: tuple[tuple[str, tuple[float, ...]], ...]  # optimizer -> learning rates
    uda_grid: tuple[tuple[str, tuple[float, ...]], ...]
    uda_max: int  # images per UDA split (0 = all)
    uda_seeds: tuple[int, ...] = ()  # default: seeds
    uda_epochs: int | None = None  # default: each direction's pipeline (one epoch = one target pass)


DEFAULT_SETTING = {"optim.optimizer": "adamw", "optim.lr": 3e-3, "optim.epochs": 10}
# The grid: each optimizer at the learning rate that won a 4-point pilot (AdamW 1e-3/3e-3, SGD
# 0.03/0.1) on seed 0's validation split for every baseline; 1e-3 and 0.1 were never best.
FULL = Plan(
    3000,
    1000,
    10000,
    3,
    (10, 20),
    (0, 1, 2),
    (("adamw", (3e-3,)), ("sgd", (0.03,))),
    (("adamw", (3e-3,)),),
    0,
)
QUICK = Plan(
    200,
    100,
    300,
    2,
    (1, 2),
    (0, 1),
    (("adamw", (3e-3,)), ("sgd", (0.05,))),
    (("adamw", (3e-3,)),),
    120,
    uda_epochs=2,
)


# --- sweeps ------------------------------------------------------------------------------------


Grid = tuple[tuple[str, tuple[float, ...]], ...]  # optimizer -> learning rates


class Jobs:
    """Sweep calls shared between ``--shard I/N`` processes: each process makes every call's plan,
    runs the calls whose number is I mod N, and waits for the others' points before it reads results
    (every process walks the same calls in the same order)."""

    def __init__(self, index: int = 0, count: int = 1, report_only: bool = False) -> None:
        self.index, self.count, self.calls, self.report_only = index, count, 0, report_only

    def sweep(
        self, spec: Path, out: Path, grid: list[tuple[str, list[Any]]], overrides: list[str]
    ) -> list[SweepPoint]:
        planned = [p.point for p in plan_points(spec_path=spec, out=out, grid=grid, overrides=overrides)]
        mine = self.calls % self.count == self.index
        self.calls += 1
        if not mine or self.report_only:
            return planned
        points = run_sweep(spec_path=spec, out=out, grid=grid, overrides=overrides)
        for p in points:
            log(f"[study] {p.name}: {p.status}{' ' + p.error if p.error else ''}")
        return points

    def wait(self, points: Sequence[SweepPoint]) -> None:
        """Until every point has finished or failed (points of the other processes)."""
        if self.report_only:  # report what has finished; the rest shows as incomplete
            return
        while not all(
            (p.run_dir / "results.json").exists() or (p.run_dir / "failed.json").exists() for p in points
        ):
            time.sleep(5)


JOBS = Jobs()


def sweep(
    spec: Path,
    out: Path,
    *,
    methods: Sequence[str],
    grid: Grid,
    epochs: Sequence[int],
    seed: int,
    common: list[str],
) -> list[SweepPoint]:
    """One ``run_sweep`` per schedule length and optimizer (its learning rates), grid keys always in
    ``GRID_KEYS`` order, so a point of a later phase with the same values is the same run directory."""
    points: list[SweepPoint] = []
    for e in epochs:
        for optimizer, lrs in grid:
            axes = (list(methods), [optimizer], list(lrs), [e], [seed])
            points += JOBS.sweep(
                spec, out, list(zip(GRID_KEYS, axes, strict=True)), [*common, f"run.eval_every={e}"]
            )
    return points


def schedule(epochs: int) -> list[str]:
    """Overrides of a run of ``epochs`` epochs, evaluated after the last one."""
    return [f"optim.epochs={epochs}", f"run.eval_every={epochs}"]


def setting_overrides(setting: dict[str, Any]) -> list[str]:
    """A chosen setting (optimizer, lr, epochs) as overrides."""
    return [
        f"optim.optimizer={setting['optim.optimizer']}",
        f"optim.lr={setting['optim.lr']}",
        *schedule(setting["optim.epochs"]),
    ]


def chosen_settings(points: Sequence[SweepPoint]) -> dict[str, dict[str, Any]]:
    """Per method, the optimizer and lr with the best validation accuracy (seed-0 points)."""
    JOBS.wait(points)
    runs = [read_run(p.run_dir, overrides=p.overrides, name=p.name) for p in points]
    report = build_report(runs, by=["method"], select_on="val_accuracy")
    # Only the searched keys: the report also names fields that follow from them (optim.weight_decay
    # defaults per optimizer, run.eval_every), which the grid does not set.
    return {
        g.key["method"]: {k: v for k, v in (g.chosen or {}).items() if k in SEARCHED} for g in report.groups
    }


def summary(points: Sequence[SweepPoint]) -> dict[str, Any]:
    """Mean ± std over the points (one group), as ``report`` computes it."""
    JOBS.wait(points)
    runs = [read_run(p.run_dir, overrides=p.overrides, name=p.name) for p in points]
    g: Group = build_report(runs, by=[]).groups[0]
    val = build_report(runs, by=[], metric="val_accuracy").groups[0]
    cka = build_report(runs, by=[], metric="cka_student_customized").groups[0]
    customized = build_report(runs, by=[], metric="customized_teacher_accuracy").groups[0]
    return {
        "test": asdict(g.last),
        "best_epoch": asdict(g.best),
        "val": asdict(val.last),
        "teacher": asdict(g.teacher),
        "cka_student_customized": asdict(cka.last),
        "customized_teacher": asdict(customized.last),
        "failed": g.failed,
        "runs": [str(p.run_dir) for p in points],
        "fingerprints": g.fingerprints,
    }


def protocol(
    spec: Path,
    out: Path,
    plan: Plan,
    *,
    methods: Sequence[str],
    grid: Grid,
    epochs: Sequence[int],
    common_for: Callable[[int], list[str]],
) -> tuple[dict[str, Any], dict[str, list[SweepPoint]]]:
    """Choose each method's setting on validation (seed 0), run it over every seed, summarize."""
    seed0 = plan.seeds[0]
    first = sweep(spec, out, methods=methods, grid=grid, epochs=epochs, seed=seed0, common=common_for(seed0))
    chosen = chosen_settings(first)
    one_point = len(epochs) == 1 and len(grid) == 1 and len(grid[0][1]) == 1
    points: dict[str, list[SweepPoint]] = {m: [] for m in methods}
    for m in methods:
        found = chosen.get(m) or {}
        if not found and not one_point:  # nothing finished yet (--report-only)
            continue
        # keys with one value in the grid are not named by the report (nothing varies)
        setting = {
            "optim.optimizer": grid[0][0],
            "optim.lr": grid[0][1][0],
            "optim.epochs": epochs[0],
            **found,
        }
        chosen[m] = setting
        one = ((setting["optim.optimizer"], (setting["optim.lr"],)),)
        for seed in plan.seeds[1:]:
            points[m] += sweep(
                spec,
                out,
                methods=[m],
                grid=one,
                epochs=[setting["optim.epochs"]],
                seed=seed,
                common=common_for(seed),
            )
        points[m] += [p for p in first if p.overrides == {**p.overrides, "method": m, **setting}]
    table = {m: {"chosen": chosen.get(m) or {}, **summary(points[m])} for m in methods}
    return table, points


# --- SSL ---------------------------------------------------------------------------------------


def run_ssl(folder: Path, plan: Plan, work: Path, extras: bool = True) -> dict[str, Any]:
    """The methods table; with ``extras`` also the ablations and view policies at customkd's (and
    kd's) chosen settings."""
    n_train = 40 + plan.n_pool + plan.n_val
    sizes = f"dataset.max_per_split={{train = {n_train}, test = {plan.n_test}}}"
    store = cache(SSL_CACHE, [f"dataset.root={folder}", sizes, f"views.num_views={plan.views}"])
    _, labels = read_idx(folder, "train")
    lists = {
        s: ssl_lists(
            work / "lists", labels=labels[:n_train], n_pool=plan.n_pool, n_val=plan.n_val, per_class=4, seed=s
        )
        for s in plan.seeds
    }

    def common(seed: int) -> list[str]:
        return [
            f"dataset.root={folder}",
            sizes,
            f"cache.store={store}",
            f"ssl.labeled_list={lists[seed]['labeled']}",
            f"ssl.unlabeled_list={lists[seed]['pool']}",
            f"ssl.val_list={lists[seed]['val']}",
            *RUN,
        ]

    out = work / "ssl"
    table, points = protocol(
        SSL_PIPELINE,
        out,
        plan,
        methods=SSL_METHODS,
        grid=plan.ssl_grid,
        epochs=plan.epochs,
        common_for=common,
    )
    if not extras:
        return {"methods": table, "ablations": {}, "views": {}, "store": str(store)}
    ck_set = setting_overrides(table["customkd"]["chosen"] or DEFAULT_SETTING)
    ablations: dict[str, dict[str, Any]] = {}
    for group, label, switch in ABLATIONS:
        key, value = switch[0].split("=", 1)
        pts: list[SweepPoint] = []
        for seed in plan.seeds:
            grid = [("method", ["customkd"]), (key, [_toml(value)]), ("seed", [seed])]
            pts += JOBS.sweep(SSL_PIPELINE, work / "ablations", grid, [*common(seed), *ck_set])
        ablations[label] = {"table": group, "overrides": list(switch), **summary(pts)}
    views: dict[str, dict[str, Any]] = {}
    for m in VIEW_METHODS:  # the other view policies, at the method's chosen setting
        chosen = table[m]["chosen"] or DEFAULT_SETTING
        hp = setting_overrides(chosen)
        views[f"{m}, all (default)"] = {"chosen": chosen, "train_views": "all", **summary(points[m])}
        for policy in VIEW_POLICIES:
            pts = []
            for seed in plan.seeds:
                grid = [("method", [m]), ("train_views", [policy]), ("seed", [seed])]
                pts += JOBS.sweep(SSL_PIPELINE, work / "views", grid, [*common(seed), *hp])
            views[f"{m}, {policy}"] = {"chosen": chosen, "train_views": policy, **summary(pts)}
    ablations["L_gen only (= the fitnet row, at its own setting)"] = {
        "table": "loss terms (Table 7a)",
        "overrides": ["method=fitnet"],
        **summary(points["fitnet"]),
    }
    ablations["customkd (both terms, student head, 1:1, bounded)"] = {
        "table": "reference",
        "overrides": [],
        **summary(points["customkd"]),
    }
    return {"methods": table, "ablations": ablations, "views": views, "store": str(store)}


# --- UDA ---------------------------------------------------------------------------------------


def run_uda(plan: Plan, work: Path) -> dict[str, Any]:
    root = data_root().resolve() / "digits"  # absolute: a relative dataset.root is read under data_root
    if JOBS.index == 0:
        write_digit_domains(root)
    while not all((root / f"{s}.txt").is_file() for s in _digit_splits()):
        time.sleep(5)  # shard 0 writes them
    lists = [str(root / f"{s}.txt") for s in _digit_splits()]
    data = [f"dataset.root={root}", f"dataset.lists={json.dumps(lists)}"]
    if plan.uda_max:
        data.append(f"dataset.max_per_split={plan.uda_max}")
    store = cache(UDA_CACHE, [*data, f"views.num_views={plan.views}"])
    out: dict[str, Any] = {"store": str(store)}
    for direction in UDA_DIRECTIONS:
        spec = REPO / "pipelines" / "digits" / f"{direction}.toml"

        epochs = load_train_spec(spec, []).optim.epochs if plan.uda_epochs is None else plan.uda_epochs

        def common(seed: int) -> list[str]:
            return [*data, f"cache.store={store}", *RUN]

        uda_plan = replace(plan, seeds=plan.uda_seeds or plan.seeds)
        table, _ = protocol(
            spec,
            work / f"uda_{direction}",
            uda_plan,
            methods=UDA_METHODS,
            grid=plan.uda_grid,
            epochs=(epochs,),
            common_for=common,
        )
        out[direction] = table
    return out


def _digit_splits() -> tuple[str, ...]:
    from evidence.digits import SPLITS

    return SPLITS


def cache(spec_path: Path, overrides: list[str]) -> Path:
    """The store of the spec, computed here or by another process (waited for)."""
    spec = load_cache_spec(spec_path, overrides)
    while not (
        res := extract.run_cache(spec, spec_path=spec_path, shard=extract.Shard(), progress=True)
    ).complete:
        time.sleep(10)  # units claimed by another process: wait for them
    return res.path


def _toml(raw: str) -> Any:
    import tomllib

    return tomllib.loads(f"v = {raw}")["v"]


# --- writing -----------------------------------------------------------------------------------


def _cell(s: dict[str, Any], pct: bool = True) -> str:
    if not s["n"]:
        return "-"
    f = 100.0 if pct else 1.0
    return f"{f * s['mean']:.2f} ± {f * s['std']:.2f} (n={s['n']})"


def methods_table(table: dict[str, Any]) -> list[str]:
    lines = [
        "| method | chosen on validation (seed 0) | val | test, last epoch | test, best epoch | "
        "customized teacher | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, row in table.items():
        chosen = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in row["chosen"].items())
        notes = f"{len(row['failed'])} diverged" if row["failed"] else ""
        lines.append(
            f"| {m} | {chosen} | {_cell(row['val'])} | {_cell(row['test'])} | "
            f"{_cell(row['best_epoch'])} | {_cell(row['customized_teacher'])} | {notes} |"
        )
    return lines


def write_report(out: Path, results: dict[str, Any], command: str, minutes: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    ssl = results["ssl"]
    teacher = ssl["methods"]["kd"]["teacher"]
    lines = [
        "# CustomKD on real images (Fashion-MNIST SSL; digits <-> MNIST UDA), EfficientNet-Lite0 teacher",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {minutes:.1f} min on {os.cpu_count()} CPU cores.  ",
        f"Plan: `{json.dumps(results['plan'])}`",
        "",
        "Accuracy in %, mean ± std over seeds of the last epoch (best epoch: the best test accuracy over "
        "evaluated epochs, optimistic, shown for reference). Hyper-parameters chosen per method on the "
        "validation split (seed 0) from the same grid. Customized teacher: the accuracy of the student's "
        "final head on P_t(f_t) of the test images (the target CustomKD distils; compare the probe).",
        "",
        "## SSL: Fashion-MNIST, 4 labels per class, MobileNetV3-Small-0.5 at 32 px",
        "",
        f"Teacher probe (linear on the 40 labeled rows' features): {_cell(teacher)}",
        "",
        *methods_table(ssl["methods"]),
        "",
        "## Ablations (customkd at its chosen setting)",
        "",
        "| table | variant | test | CKA(f_s, P_t(f_t)) |",
        "|---|---|---|---|",
    ]
    if not ssl["ablations"]:
        lines.append("| - | not run (--methods-only) | - | - |")
    for label, row in ssl["ablations"].items():
        lines.append(
            f"| {row['table']} | {label} | {_cell(row['test'])} | "
            f"{_cell(row['cka_student_customized'], False)} |"
        )
    lines += [
        "",
        "## Which cached views stage B replays (`train_views`)",
        "",
        "all (the default): one of every cached view per image and epoch, view 0 included; random: the "
        "random crops only (views 1..V-1); eval: view 0 only (the fixed-teacher setting).",
        "",
        "| method, policy | setting (chosen above) | val | test, last epoch | customized teacher |",
        "|---|---|---|---|---|",
    ]
    if not ssl.get("views"):
        lines.append("| - | not run (--methods-only) | - | - | - |")
    for m, row in ssl.get("views", {}).items():
        chosen = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in row["chosen"].items())
        lines.append(
            f"| {m} | {chosen} | {_cell(row['val'])} | {_cell(row['test'])} | "
            f"{_cell(row['customized_teacher'])} |"
        )
    for direction in UDA_DIRECTIONS if "uda" in results else ():
        table = results["uda"][direction]
        lines += [
            "",
            f"## UDA: {direction.replace('_to_', ' → ')} (real domain shift), target test accuracy",
            "",
            f"Teacher probe (trained on source features): {_cell(table['kd']['teacher'])}",
            "",
            *methods_table(table),
        ]
    (out / "study.md").write_text("\n".join(lines) + "\n")
    plot(out / "study.png", results)


def plot(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("SSL (4 labels/class)", results["ssl"]["methods"])]
    panels += [("Ablations", results["ssl"]["ablations"])] if results["ssl"]["ablations"] else []
    panels += [(f"UDA {d}", results["uda"][d]) for d in UDA_DIRECTIONS if "uda" in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (title, groups) in zip(axes[0], panels, strict=True):
        names = list(groups)
        stats = [groups[n]["test"] for n in names]
        means = [100 * s["mean"] if s["n"] else 0.0 for s in stats]
        ax.bar(range(len(names)), means, yerr=[100 * (s["std"] or 0.0) for s in stats], capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the pipeline, numbers mean nothing"
    )
    ap.add_argument("--work", type=Path, default=Path("runs/study"))
    ap.add_argument(
        "--report-only", action="store_true", help="train nothing: report the points that have finished"
    )
    ap.add_argument(
        "--shard", default="0/1", help="I/N: this process's share of the sweeps (run N processes at once)"
    )
    ap.add_argument("--out", type=Path, default=None, help="default: evidence/results (quick: WORK/results)")
    ap.add_argument("--no-uda", action="store_true", help="the SSL part only (skip digits <-> MNIST)")
    ap.add_argument(
        "--methods-only",
        action="store_true",
        help="SSL: the methods table only (no ablations, no view policies)",
    )
    ap.add_argument("--pool", type=int, default=None, help="SSL unlabeled images (default: the plan's)")
    ap.add_argument("--test", type=int, default=None, help="SSL test images (default: the plan's)")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    sizes = {"n_pool": args.pool, "n_test": args.test}
    plan = replace(plan, **{k: v for k, v in sizes.items() if v is not None})
    args.work = (
        args.work.resolve()
    )  # list files are passed as absolute paths (relative ones resolve under data_root)
    index, count = (int(x) for x in args.shard.split("/"))
    JOBS.index, JOBS.count, JOBS.report_only = index, count, args.report_only
    out = args.out or (args.work / "results" if args.quick else REPO / "evidence" / "results")
    os.environ.setdefault("CUSTOMKD_CACHE_ROOT", str(REPO / "caches"))
    t0 = time.perf_counter()
    folder = ensure_fashion_mnist()
    results: dict[str, Any] = {
        "plan": asdict(plan),
        "ssl": run_ssl(folder, plan, args.work, not args.methods_only),
    }
    if not args.no_uda:
        results["uda"] = run_uda(plan, args.work)
    minutes = (time.perf_counter() - t0) / 60
    command = "python -m evidence.study" + (" --quick" if args.quick else "")
    command += " --no-uda" * args.no_uda + " --methods-only" * args.methods_only
    command += "".join(f" --{k} {v}" for k, v in (("pool", args.pool), ("test", args.test)) if v is not None)
    results["wall_minutes"] = round(minutes, 1)
    if index != 0:  # shard 0 writes the report
        return
    write_report(
        out,
        results,
        command + (f" (with --shard I/{count}, {count} processes)" if count > 1 else ""),
        minutes,
    )
    print((out / "study.md").read_text())
    log(f"[study] done in {minutes:.1f} min; results in {out}")


if __name__ == "__main__":
    sys.exit(main())
