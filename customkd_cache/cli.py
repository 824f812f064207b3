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

from . import specs
from .errors import CustomKDError

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
) -> None:
    """Stage one: run the teacher over every view of the dataset and write the feature store."""
    from . import extract

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
    res = extract.run_cache(cspec, spec_path=spec, shard=part, progress=not quiet)
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
    from .train import run_train

    tspec = specs.load_train_spec(spec, set_ or [])
    res = run_train(tspec, spec_path=spec, out=out, resume=resume)
    if not res:  # a torchrun rank other than 0: rank 0 reports
        return
    typer.echo(
        f"{out}: {res['method']} student {_pct(res['student_accuracy'])} "
        f"(best {_pct(res['best_student_accuracy'])} at epoch {res['best_epoch']}), "
        f"teacher probe {_pct(res['teacher_accuracy'])}"
    )


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
    from .store import open_store

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


@app.command(name="ls")
def ls_(
    root: Annotated[Optional[Path], typer.Argument(help="cache root (default: CUSTOMKD_CACHE_ROOT)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the feature stores under a cache root."""
    from .store import list_stores

    entries = list_stores(root or specs.cache_root())
    if as_json:
        _print_json(entries)
        return
    for e in entries:
        done = "complete" if e["complete"] else "partial"
        typer.echo(f"{e['path']}  {e['dataset']}  {e['teacher']}  {done}  {e['size_bytes'] / 2**20:.1f} MiB")


@app.command()
def verify(
    store: Annotated[Path, typer.Argument(help="store path (or a name under CUSTOMKD_CACHE_ROOT)")],
) -> None:
    """Check a store: every unit present, shapes, finite values, checksums. Exit 1 if damaged."""
    from .store import open_store

    problems = open_store(_store_path(store)).verify()
    for p in problems:
        typer.echo(f"{store}: {p}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{store}: ok")


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
    from .data import open_dataset, write_labeled_list

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
