"""The paper's comparison from one cache: every task of a dataset x methods x seeds, then its table.

``plan_paper`` lists the pipelines of ``pipelines/<dataset>/`` (one per task: the 12 OfficeHome
tasks; for DomainNet the 12 pairs among clipart, painting, real and sketch, the usual four-domain
protocol: the pairs behind the paper's DomainNet average could not be read, so this is an
assumption), ``run_paper`` trains each as a sweep over ``method`` x ``seed`` into
``OUT/<task>/`` (a normal sweep directory: finished points are skipped, ``--shard`` splits the work,
killed points resume), and ``paper_report`` writes the table shaped like the paper's: one row per
method, one column per task and the average, mean ± std over seeds (see ``report.paper_table``).

Every method runs with the pipeline's own settings (no per-method search), so each gets the same
budget; choose hyper-parameters on a validation split with ``sweep``/``report --select-on`` first.

``estimate`` gives the number of runs and the GPU hours they would take, from the number of images
each run's stage B and evaluation read (``epochs x (one pass over the unlabeled rows, with the
labeled share added) + epochs x the evaluation rows``) at an assumed ``images_per_s`` per GPU
(default ``IMAGES_PER_S``: decoding and rendering the replayed views, not the student, bounds stage
two; replace it with ``benchmarks/gpu_check.sh``'s measurement on your machine).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from customkd_cache import specs
from customkd_cache.errors import SpecError, closest
from customkd_cache.files import ensure_dir, write_atomic
from customkd_cache.lab.sweep import SweepPoint, run_sweep

if TYPE_CHECKING:
    from customkd_cache.lab.report import PaperTable

PAPER_METHODS: tuple[str, ...] = ("student_only", "kd", "dkd", "fitnet", "logits", "customkd", "customkd+dkd")
PAPER_SEEDS: tuple[int, ...] = (0, 1, 2)
PAPER_FILE = "paper.json"
# Assumed stage-two images per second on one GPU (MobileNetV3-L at 224 px, decode-bound): an
# assumption until measured, see the module docstring.
IMAGES_PER_S = 1000.0
# Published split sizes, used by ``estimate`` when the dataset is not on this machine.
KNOWN_SIZES: dict[str, dict[str, int]] = {
    "officehome": {"Art": 2427, "Clipart": 4365, "Product": 4439, "Real_World": 4357},
    "domainnet": {
        "clipart_train": 33525,
        "clipart_test": 14604,
        "infograph_train": 36023,
        "infograph_test": 15582,
        "painting_train": 50416,
        "painting_test": 21850,
        "quickdraw_train": 120750,
        "quickdraw_test": 51750,
        "real_train": 120906,
        "real_test": 52041,
        "sketch_train": 48212,
        "sketch_test": 20916,
    },
}


@dataclass(frozen=True)
class PaperPlan:
    """What ``run_paper`` trains: each task's pipeline x ``methods`` x ``seeds``."""

    dataset: str
    tasks: dict[str, Path]  # task name (pipeline stem) -> pipeline spec
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()

    @property
    def runs(self) -> int:
        return len(self.tasks) * len(self.methods) * len(self.seeds)


def plan_paper(
    dataset: str,
    *,
    pipelines: Path | None = None,
    tasks: Sequence[str] = (),
    methods: Sequence[str] = PAPER_METHODS,
    seeds: Sequence[int] = PAPER_SEEDS,
    overrides: Sequence[str] = (),
) -> PaperPlan:
    """The tasks of ``dataset``: every ``*.toml`` in ``pipelines`` (default ``pipelines/<dataset>``),
    or those named in ``tasks``; each spec is validated with every method and ``overrides``.

    Raises SpecError (one line) for a missing folder, an unknown task or method, or no seeds.
    """
    folder = Path(pipelines) if pipelines is not None else Path("pipelines") / dataset
    found = {p.stem: p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}
    if not found:
        raise SpecError(
            f"{folder}: no pipelines (*.toml) here; give --pipelines DIR or a dataset with pipelines/"
        )
    for name in tasks:
        if name not in found:
            raise SpecError(f"--task {name}: no {folder / name}.toml{closest(name, list(found))}")
    for m in methods:
        if m not in specs.METHODS:
            raise SpecError(
                f"--method {m}: unknown{closest(m, list(specs.METHODS))}; valid: {', '.join(specs.METHODS)}"
            )
    if not methods or not seeds:
        raise SpecError("paper: give at least one method and one seed")
    chosen = {name: found[name] for name in tasks} if tasks else found
    for path in chosen.values():
        specs.load_train_spec(path, [*overrides, f"method={methods[0]}"])
    return PaperPlan(dataset, chosen, tuple(methods), tuple(int(s) for s in seeds), tuple(overrides))


def run_paper(
    plan: PaperPlan, out: Path, *, shard: tuple[int, int] | None = None, retry_failed: bool = False
) -> list[SweepPoint]:
    """Train every task as a sweep over method x seed into ``out/<task>/``; ``out/paper.json`` records
    the plan (tasks in order, methods, seeds) for ``paper_report``."""
    out = Path(out)
    ensure_dir(out)
    record = {
        "dataset": plan.dataset,
        "tasks": {name: str(path) for name, path in plan.tasks.items()},
        "methods": list(plan.methods),
        "seeds": list(plan.seeds),
        "overrides": list(plan.overrides),
    }
    write_atomic(out / PAPER_FILE, json.dumps(record, indent=2) + "\n")
    points: list[SweepPoint] = []
    for name, path in plan.tasks.items():
        points += run_sweep(
            spec_path=path,
            out=out / name,
            grid=[("method", list(plan.methods)), ("seed", list(plan.seeds))],
            overrides=plan.overrides,
            shard=shard,
            retry_failed=retry_failed,
        )
    return points


def read_plan(out: Path) -> dict[str, Any]:
    """``out/paper.json``; SpecError when it is missing or not what ``run_paper`` writes."""
    path = Path(out) / PAPER_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: not found; run `customkd-cache paper --out {out}` first") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SpecError(f"{path}: unreadable ({e}); rerun `customkd-cache paper` to rewrite it") from None
    ok = (
        isinstance(data, dict)
        and isinstance(data.get("tasks"), dict)
        and isinstance(data.get("methods"), list)
        and all(isinstance(m, str) for m in data["methods"])
    )
    if not ok:
        raise SpecError(
            f"{path}: not a paper plan (tasks, methods); rerun `customkd-cache paper` to rewrite it"
        )
    return dict(data)


@dataclass(frozen=True)
class Estimate:
    runs: int
    seconds_per_run: dict[str, float]  # per task, one run
    images_per_s: float

    @property
    def gpu_hours(self) -> float:
        per_task_runs = self.runs / max(len(self.seconds_per_run), 1)
        return sum(self.seconds_per_run.values()) * per_task_runs / 3600.0

    def lines(self) -> list[str]:
        tasks = len(self.seconds_per_run)
        out = [
            f"{self.runs} runs ({tasks} tasks x {self.runs // max(tasks, 1)} method-seed points); "
            f"about {self.gpu_hours:.1f} GPU hours at an assumed "
            f"{self.images_per_s:g} images/s per GPU (stage B + evaluation images, see `paper --help`)"
        ]
        out += [f"  {task}: {s / 3600.0:.2f} h per run" for task, s in self.seconds_per_run.items()]
        return out


def estimate(plan: PaperPlan, *, images_per_s: float = IMAGES_PER_S) -> Estimate:
    """Runs and GPU time of ``plan``: per task, the images one run reads (``run_images``) over
    ``images_per_s``; split sizes from the dataset when it is here, else ``KNOWN_SIZES``."""
    if images_per_s <= 0:
        raise SpecError(f"--images-per-s {images_per_s}: must be > 0")
    seconds = {}
    for name, path in plan.tasks.items():
        spec = specs.load_train_spec(path, [*plan.overrides, f"method={plan.methods[0]}"])
        seconds[name] = run_images(spec, split_sizes(spec)) / images_per_s
    return Estimate(plan.runs, seconds, images_per_s)


def split_sizes(spec: specs.TrainSpec) -> dict[str, int]:
    """Samples per split of the spec's dataset: listed when it is on this machine, else published."""
    from customkd_cache.data.datasets import open_dataset
    from customkd_cache.errors import DatasetError

    try:
        return {s.name: len(s) for s in open_dataset(spec.dataset).manifest.splits}
    except DatasetError:
        if spec.dataset.kind in KNOWN_SIZES:
            return KNOWN_SIZES[spec.dataset.kind]
        raise


def run_images(spec: specs.TrainSpec, sizes: dict[str, int]) -> int:
    """Images one run of ``spec`` reads: per epoch, stage B's pass over the unlabeled rows in batches
    that hold ``labeled_per_batch`` labeled rows (``replay.stage_b_batches``), and the evaluation rows."""

    def rows(names: Sequence[str]) -> int:
        missing = [n for n in names if n not in sizes]
        if missing:
            raise SpecError(f"split {', '.join(missing)} not in the dataset (splits: {', '.join(sizes)})")
        return sum(sizes[n] for n in names)

    if spec.uda is not None:
        unlabeled, labeled = rows(spec.uda.target), rows(spec.uda.source)
        evaluated = rows(spec.uda.eval or spec.uda.target)
    else:
        assert spec.ssl is not None
        unlabeled, labeled = rows([spec.ssl.train_split]), 0
        evaluated = rows([spec.ssl.eval_split])
    batch = spec.optim.batch_size
    n_labeled = max(1, round(batch * spec.optim.labeled_per_batch)) if labeled else 0
    per_batch = max(batch - n_labeled, 1)
    steps = math.ceil(unlabeled / per_batch) if unlabeled else math.ceil(labeled / batch)
    return spec.optim.epochs * (steps * batch + evaluated)


def paper_report(out: Path, *, metric: str = "student_accuracy") -> tuple[PaperTable, list[Path]]:
    """The table of the sweeps ``run_paper`` made in ``out``, written to ``out/table.md`` and
    ``out/table.json`` (``out/paper.json`` holds the plan)."""
    from customkd_cache.lab.report import load_runs, paper_table, write_paper_table

    plan = read_plan(out)
    runs = {task: load_runs([out / task]) if (out / task).is_dir() else [] for task in plan["tasks"]}
    table = paper_table(runs, methods=plan["methods"], seeds=plan["seeds"], metric=metric)
    return table, write_paper_table(table, Path(out) / "table")
