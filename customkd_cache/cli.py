"""The ``customkd-cache`` command: a thin typer shell over the library.

Each command parses its options, loads the spec, calls one library function and prints a short
summary. A ``CustomKDError`` becomes one line on stderr and exit status 2; anything else is a bug
and exits 1 with its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from customkd_cache import specs
from customkd_cache.errors import CustomKDError, SpecError

app = typer.Typer(
    name="customkd-cache",
    help="CustomKD distillation from vision foundation models through an offline Zarr v3 feature cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SpecOpt = Annotated[Path, typer.Option("--spec", help="spec file (TOML)", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="override a spec field: --set teacher.name=vit_small_patch14_dinov2"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


@app.callback()
def _root() -> None:
    """CustomKD distillation from vision foundation models through an offline Zarr v3 feature cache."""


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True))


@app.command()
def check(
    file: Annotated[Path, typer.Argument(help="cache or train spec", show_default=False)],
    set_: SetOpt = None,
) -> None:
    """Validate a cache or train spec and print it resolved (defaults filled in)."""
    spec = specs.load_any_spec(file, set_ or [])
    kind = "train" if isinstance(spec, specs.TrainSpec) else "cache"
    if isinstance(spec, specs.CacheSpec):
        from customkd_cache.models.teachers import check_teacher_name

        check_teacher_name(spec.teacher)
    typer.echo(f"# {file}: valid {kind} spec", err=True)
    typer.echo(json.dumps(specs.to_dict(spec), indent=2))


@app.command()
def cache(
    spec: SpecOpt,
    set_: SetOpt = None,
    shard: Annotated[
        Optional[str], typer.Option(help="this job's share of the units, I/N (e.g. a Slurm array task)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan; compute nothing")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    repair: Annotated[
        bool, typer.Option("--repair", help="recompute damaged units first (what `verify` reports)")
    ] = False,
) -> None:
    """Stage one: run the teacher over every view of the dataset and write the feature store."""
    from customkd_cache.stage_one import extract

    cspec = specs.load_cache_spec(spec, set_ or [])
    part = extract.Shard.parse(shard) if shard else extract.Shard.from_env()
    if dry_run:
        plan = extract.plan_cache(cspec, spec_path=spec, shard=part)
        typer.echo(f"store        {plan.path}")
        typer.echo(f"fingerprint  {plan.fingerprint}")
        typer.echo(f"exists       {plan.path.exists()}")
        typer.echo(f"units        {len(plan.units)} for shard {part.index}/{part.count}")
        typer.echo(f"samples      {plan.identity['dataset']['num_samples']}")
        typer.echo(f"views x dim  {cspec.views.num_views} x {plan.teacher.feature_dim} ({cspec.store.dtype})")
        typer.echo(f"est. size    {plan.estimated_bytes() / 2**20:.1f} MiB (uncompressed)")
        return
    command = ["customkd-cache", "cache", "--spec", str(spec.resolve())]
    command += [x for item in set_ or [] for x in ("--set", item)]
    res = extract.run_cache(
        cspec, spec_path=spec, shard=part, progress=not quiet, repair=repair, command=command
    )
    for line in res.repaired:
        typer.echo(f"{res.path}: repaired {line}", err=True)
    state = "complete" if res.complete else "partial (other shards still running)"
    typer.echo(
        f"{res.path}: {state}; computed {res.units_computed} units, skipped {res.units_skipped} done; "
        f"{res.images} images in {res.seconds:.1f} s"
    )


@app.command()
def train(
    spec: SpecOpt,
    out: Annotated[Path, typer.Option(help="run directory (metrics, results, checkpoints)")],
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the run in --out from its last epoch")
    ] = False,
) -> None:
    """Stage two: train the student (CustomKD or a baseline) from the feature cache."""
    from customkd_cache.stage_two.train import run_train

    tspec = specs.load_train_spec(spec, set_ or [])
    res = run_train(tspec, spec_path=spec, out=out, resume=resume)
    if not res:  # a torchrun rank other than 0: rank 0 reports
        return
    typer.echo(
        f"{out}: {res['method']} student {_pct(res['student_accuracy'])} "
        f"(best {_pct(res['best_student_accuracy'])} at epoch {res['best_epoch']}), "
        f"teacher probe {_pct(res['teacher_accuracy'])}"
    )


@app.command()
def sweep(
    spec: SpecOpt,
    out: Annotated[Path, typer.Option(help="sweep directory: one run directory per point, and sweep.json")],
    grid: Annotated[
        Optional[list[str]],
        typer.Option(
            "--grid",
            help="a grid axis KEY=V1,V2,... (values parse as TOML); "
            "KEY_A+KEY_B links two fields to one value",
        ),
    ] = None,
    set_: SetOpt = None,
    shard: Annotated[
        Optional[str], typer.Option(help="this job's share of the points, I/N (e.g. a Slurm array task)")
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="train failed points again (default: keep them failed)")
    ] = False,
) -> None:
    """Train the cartesian product of the grids from one spec; finished points are skipped."""
    from customkd_cache.lab.sweep import parse_grid, run_sweep
    from customkd_cache.stage_one.extract import Shard

    part = Shard.parse(shard) if shard else None
    points = run_sweep(
        spec_path=spec,
        out=out,
        grid=[parse_grid(g) for g in grid or []],
        overrides=set_ or [],
        shard=(part.index, part.count) if part else None,
        retry_failed=retry_failed,
    )
    for p in points:
        typer.echo(f"{p.status:8s} {p.run_dir}" + (f"  ({p.error})" if p.error else ""))
    counts = {s: sum(p.status == s for p in points) for s in ("ran", "done", "failed", "skipped")}
    typer.echo(f"{out}: {len(points)} points: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    failed = [p for p in points if p.status == "failed"]
    if failed:
        raise SpecError(
            f"{out}: {len(failed)} of {len(points)} points failed (each listed above); the first, "
            f"{failed[0].name}: {failed[0].error}; fix the cause, then rerun with --retry-failed"
        )


@app.command()
def report(
    dirs: Annotated[
        list[Path], typer.Argument(help="sweep directories or run directories", show_default=False)
    ],
    by: Annotated[
        Optional[list[str]], typer.Option("--by", help="group by this key (default: every key that varies)")
    ] = None,
    metric: Annotated[str, typer.Option(help="the test metric to summarise")] = "student_accuracy",
    select_on: Annotated[
        Optional[str],
        typer.Option(
            help="per group, choose the hyper-parameters on this validation metric (e.g. val_accuracy)"
        ),
    ] = None,
    as_json: JsonOpt = False,
    out: Annotated[
        Optional[Path], typer.Option(help="also write PREFIX.md, PREFIX.json and PREFIX.png")
    ] = None,
) -> None:
    """Mean ± std over seeds of the runs' metrics, grouped; failed and incomplete runs shown as such."""
    from customkd_cache.lab.report import build_report, load_runs, write_report

    rep = build_report(load_runs(dirs), by=by, metric=metric, select_on=select_on)
    if as_json:
        _print_json(rep.to_json())
    else:
        typer.echo(rep.to_markdown(), nl=False)
    if out is not None:
        written = write_report(rep, out)
        typer.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)


@app.command()
def paper(
    dataset: Annotated[str, typer.Option(help="the dataset: its tasks are pipelines/DATASET/*.toml")],
    out: Annotated[
        Path, typer.Option(help="one sweep directory per task, paper.json (the plan), table.md/.json")
    ] = Path("runs/paper"),
    pipelines: Annotated[
        Optional[Path], typer.Option(help="folder of task pipelines (default pipelines/DATASET)")
    ] = None,
    task: Annotated[
        Optional[list[str]], typer.Option("--task", help="only this task (a pipeline's stem); repeatable")
    ] = None,
    method: Annotated[
        Optional[list[str]],
        typer.Option("--method", help="only this method (default: the paper's 7); repeatable"),
    ] = None,
    seed: Annotated[Optional[list[int]], typer.Option("--seed", help="seeds (default 0, 1, 2)")] = None,
    set_: SetOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the number of runs and the GPU hours; train nothing")
    ] = False,
    images_per_s: Annotated[
        float,
        typer.Option(help="--dry-run: stage-two images per second per GPU (assumed; measure with gpu_check)"),
    ] = 1000.0,
    report_only: Annotated[bool, typer.Option("--report-only", help="only write the table from OUT")] = False,
    shard: Annotated[Optional[str], typer.Option(help="this job's share of each task's points, I/N")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="train failed points again")] = False,
) -> None:
    """The paper's comparison: every task x method x seed from one cache, then its table."""
    from customkd_cache.lab.paper import (
        PAPER_METHODS,
        PAPER_SEEDS,
        estimate,
        paper_report,
        plan_paper,
        run_paper,
    )
    from customkd_cache.stage_one.extract import Shard

    if not report_only:
        plan = plan_paper(
            dataset,
            pipelines=pipelines,
            tasks=task or (),
            methods=method or PAPER_METHODS,
            seeds=seed or PAPER_SEEDS,
            overrides=set_ or [],
        )
        if dry_run:
            for line in estimate(plan, images_per_s=images_per_s).lines():
                typer.echo(line)
            return
        part = Shard.parse(shard) if shard else None
        points = run_paper(
            plan, out, shard=(part.index, part.count) if part else None, retry_failed=retry_failed
        )
        counts = {s: sum(p.status == s for p in points) for s in ("ran", "done", "failed", "skipped")}
        typer.echo(f"{out}: {len(points)} points: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    table, written = paper_report(out)
    typer.echo(table.to_markdown(), nl=False)
    typer.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)


@app.command(name="export")
def export_(
    run_dir: Annotated[Path, typer.Argument(help="a finished train run directory", show_default=False)],
    format_: Annotated[str, typer.Option("--format", help="onnx or torchscript")] = "onnx",
    quantize: Annotated[
        Optional[str], typer.Option(help="int8: also write a statically quantized ONNX model")
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="best or last student of the run")] = "best",
    out: Annotated[
        Optional[Path], typer.Option(help="model file (default RUN_DIR/export/student.onnx or .pt)")
    ] = None,
    images: Annotated[int, typer.Option(help="evaluation images for the checks; 0 = all of them")] = 0,
    runs: Annotated[int, typer.Option(help="timed batch-1 runs per latency figure")] = 100,
) -> None:
    """Export the run's student as ONNX or TorchScript; check parity, size, MACs and CPU latency."""
    from customkd_cache.lab.export import FORMATS, ExportError, export_student

    if format_ not in FORMATS:
        raise ExportError(f"--format {format_}: unknown; choose one of {', '.join(FORMATS)}")
    if checkpoint not in ("best", "last"):
        raise ExportError(f"--checkpoint {checkpoint}: choose best or last")
    rep = export_student(
        run_dir,
        fmt=format_,  # type: ignore[arg-type]  # checked above
        quantize=quantize,  # type: ignore[arg-type]  # checked by export_student
        checkpoint=checkpoint,  # type: ignore[arg-type]
        out=out,
        max_images=images,
        latency_runs=runs,
    )
    typer.echo(
        f"{rep['student']} ({rep['checkpoint']}), {rep['input_size']} px: {rep['params']:,} params, "
        f"{rep['macs'] / 1e6:.2f} M MACs; torch accuracy {_pct(rep['torch_accuracy'])} "
        f"on {rep['num_images']} images"
    )
    typer.echo(
        f"{'format':12s} {'file':>10s} {'max|dlogit|':>12s} {'top-1 agree':>12s} {'accuracy':>9s} "
        f"{'p50/p90 ms, 1 thread':>21s} {'p50/p90 ms, ' + str(rep['threads_all']) + ' threads':>22s}"
    )
    for name, m in rep["formats"].items():
        one, every = m["latency_ms"]["1"], m["latency_ms"]["all"]
        typer.echo(
            f"{name:12s} {m['file_bytes'] / 2**20:8.2f}MB {m['max_abs_logit_diff']:12.2e} "
            f"{100 * m['top1_agreement']:11.2f}% {_pct(m['accuracy']):>9s} "
            f"{one['p50']:10.3f}/{one['p90']:.3f} {every['p50']:11.3f}/{every['p90']:.3f}"
        )
    typer.echo(f"wrote {Path(next(iter(rep['formats'].values()))['file']).parent / 'export.json'}")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _store_path(store: Path) -> Path:
    if not store.exists() and not store.is_absolute() and (specs.cache_root() / store).exists():
        return specs.cache_root() / store
    return store


@app.command()
def info(
    store: Annotated[Path, typer.Argument(help="store path (or a name under CUSTOMKD_CACHE_ROOT)")],
    as_json: JsonOpt = False,
) -> None:
    """Describe a feature store: completeness, samples per split, views, teacher, fingerprint."""
    from customkd_cache.store import FIDELITY_ATTR, FIDELITY_MIN_ATTR, open_store

    data = open_store(_store_path(store)).info()
    if as_json:
        _print_json(data)
        return
    keys = ("path", "complete", "fingerprint", "num_samples", "num_views", "feature_dim", "dtype")
    for key in (*keys, "bytes_per_view", "cosine_to_float32"):
        if key in data:  # the cosine only for int8 stores
            typer.echo(f"{key:12s} {data[key]}")
    teacher = data.get("teacher") or {}
    typer.echo(f"{'teacher':12s} {teacher.get('source')}:{teacher.get('name')} ({teacher.get('feature')})")
    typer.echo(f"{'precision':12s} {teacher.get('precision')}")
    if FIDELITY_ATTR in data:  # bf16 stores: the cosine to fp32 on the first rows computed
        low = data.get(FIDELITY_MIN_ATTR)
        shown = f"mean {data[FIDELITY_ATTR]:.6f}" + (f", min {low:.6f}" if low is not None else "")
        typer.echo(f"{'bf16 vs fp32':12s} cosine {shown}")


@app.command(name="ls")
def ls_(
    root: Annotated[Optional[Path], typer.Argument(help="cache root (default: CUSTOMKD_CACHE_ROOT)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the feature stores under a cache root: state, samples x views, teacher, size, creation."""
    from customkd_cache.store import list_stores

    entries = list_stores(root or specs.cache_root())
    if as_json:
        _print_json(entries)
        return
    for e in entries:
        size = f"{e['size_bytes'] / 2**20:.1f} MiB"
        if e["unreadable"]:
            typer.echo(f"{e['path']}  UNREADABLE  {e['error']}")
            continue
        if e["damaged"]:
            typer.echo(f"{e['path']}  DAMAGED  {size}  {e['error']}")
            continue
        state = "complete" if e["complete"] else "incomplete"
        typer.echo(
            f"{e['path']}  {state}  {e['dataset']}  {e['teacher']}  "
            f"{e['num_samples']} x {e['num_views']}  {size}  {e['created'] or '-'}"
        )


@app.command()
def gc(
    root: Annotated[Optional[Path], typer.Argument(help="cache root (default: CUSTOMKD_CACHE_ROOT)")] = None,
    older_than: Annotated[
        float, typer.Option(help="remove incomplete stores untouched for this many days")
    ] = 7.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list what would be removed; remove nothing")
    ] = False,
) -> None:
    """Remove what killed runs leave: temporary creator dirs, stale claims, old incomplete stores."""
    from customkd_cache.store.gc import collect_garbage

    res = collect_garbage(root or specs.cache_root(), older_than_days=older_than, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for r in res.removed:
        typer.echo(f"{verb} {r.kind:16s} {_bytes(r.bytes):>10s}  {r.path}  ({r.reason})")
    for path, why in res.kept:
        typer.echo(f"kept   {path}  ({why})")
    for path, why in res.failed:
        typer.echo(f"could not remove {path}  ({why}); left in place", err=True)
    typer.echo(f"{res.root}: {verb} {len(res.removed)} entries, {_bytes(res.bytes_freed)}")
    if res.failed:
        raise typer.Exit(1)


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@app.command()
def verify(
    store: Annotated[Path, typer.Argument(help="store path (or a name under CUSTOMKD_CACHE_ROOT)")],
) -> None:
    """Check a store: every unit present, shapes, finite values, checksums. Exit 1 if damaged."""
    from customkd_cache.store import open_store

    opened = open_store(_store_path(store))
    problems, repairable = opened.verify_report()
    for p in problems:
        typer.echo(f"{opened.shown}: {p}", err=True)
    if problems and repairable:
        typer.echo(f"{opened.shown}: repair with: {opened.repair_command()}", err=True)
    elif problems:
        typer.echo(
            f"{opened.shown}: its metadata is damaged, which repair cannot undo: remove the store and "
            f"rebuild it with: {opened.finish_command()}",
            err=True,
        )
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{opened.shown}: ok")


@app.command()
def labels(
    spec: SpecOpt,
    out: Annotated[Path, typer.Option(help="list file to write (one sample id per line)")],
    per_class: Annotated[int, typer.Option(help="labels per class")] = 4,
    seed: Annotated[int, typer.Option(help="seed of the draw")] = 0,
    split: Annotated[str, typer.Option(help="split to draw from")] = "train",
    set_: SetOpt = None,
) -> None:
    """Draw an SSL labeled subset (N per class, seeded) from a spec's dataset and write it to a list file."""
    from customkd_cache.data import open_dataset, write_labeled_list

    parsed = specs.load_any_spec(spec, set_ or [])
    manifest = open_dataset(parsed.dataset).manifest
    digest = write_labeled_list(manifest, split, per_class=per_class, seed=seed, out=out)
    typer.echo(f"{out}: {per_class} per class from {split}, seed {seed}; sha256 {digest}")


def main() -> None:
    """Entry point: run the app, turning user errors into one line on stderr and exit 2."""
    try:
        app()
    except CustomKDError as e:
        typer.echo(f"customkd-cache: error: {_one_line(e)}", err=True)
        sys.exit(2)


def _one_line(e: CustomKDError) -> str:
    """The error's own message; one re-raised from a DataLoader worker carries a traceback first."""
    text = str(e).strip()
    if "Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(("customkd_cache.errors.", type(e).__name__)) else last
