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


def _emit(obj: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(obj, indent=2, sort_keys=True))
    else:
        typer.echo(obj if isinstance(obj, str) else json.dumps(obj, indent=2))


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


def main() -> None:
    """Entry point: run the app, turning user errors into one line on stderr and exit 2."""
    try:
        app()
    except CustomKDError as e:
        typer.echo(f"customkd-cache: error: {e}", err=True)
        sys.exit(2)
