"""Copies of shipped specs with tiny models swapped in, for tests and smoke runs of real pipelines.

``tiny_cache_spec`` writes a copy of a cache spec whose teacher is a random-init ViT at 32 px
(``TINY_CACHE``); a pipeline then trains from it with ``--set cache.spec=COPY`` plus ``TINY_TRAIN``
(one epoch of MobileNetV3-Small at 32 px). The copy keeps the spec's dataset section, so the store it
makes is found through the normal lookup.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from customkd_cache.specs import apply_overrides

# Swapped into a cache spec copy: a random-init ViT at 32 px, 2 views, small units, on the CPU.
TINY_CACHE: tuple[str, ...] = (
    'teacher={source = "timm", name = "test_vit", weights = "random", input_size = 32, feature = "cls"}',
    "views.num_views=2",
    "store.unit_rows=64",
    "run.batch_size=64",
    "run.num_workers=0",
    'run.device="cpu"',
)
# One epoch of a tiny student at 32 px, with a one-epoch probe and two stage-A steps, on the CPU.
TINY_TRAIN: tuple[str, ...] = (
    "student.name=mobilenetv3_small_050",
    'student.weights=""',
    "student.input_size=32",
    "optim.epochs=1",
    "optim.batch_size=32",
    "probe.epochs=1",
    "customkd.stage_a_steps=2",
    "run.num_workers=0",
    'run.device="cpu"',
)


def toml_text(data: dict[str, Any]) -> str:
    """A TOML document of ``data``: top-level values, then one table per dict of the top level (values
    written as JSON, which TOML reads for strings, numbers and lists; dicts as inline tables)."""

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]", *(f"{kk} = {value(vv)}" for kk, vv in v.items())]
    return "\n".join(lines) + "\n"


def tiny_cache_spec(source: Path, out: Path, extra: Sequence[str] = ()) -> Path:
    """Write ``source`` with ``TINY_CACHE`` and ``extra`` (``--set`` syntax) applied to ``out``."""
    data = apply_overrides(tomllib.loads(Path(source).read_text(encoding="utf-8")), [*TINY_CACHE, *extra])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(toml_text(data), encoding="utf-8")
    return out
