"""Module boundaries, checked on the source: which module may import what.

Stage two never builds a teacher except in ``online.py``; only ``store.py`` imports zarr; only
``teachers.py`` imports open_clip.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "customkd_cache"
STAGE_TWO = ("train", "cached_data", "losses", "students", "probe", "distributed", "online")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``.x`` relative imports as ``customkd_cache.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = f"customkd_cache.{node.module or ''}".rstrip(".") if node.level else node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _importers(module: str) -> list[str]:
    return sorted(
        p.relative_to(PACKAGE).with_suffix("").as_posix()
        for p in PACKAGE.rglob("*.py")
        if any(name == module or name.startswith(f"{module}.") for name in _imports(p))
    )


def test_only_the_online_module_of_stage_two_builds_a_teacher() -> None:
    assert [m for m in _importers("customkd_cache.models.teachers") if m in STAGE_TWO] == ["online"]


def test_only_store_imports_zarr() -> None:
    assert _importers("zarr") == ["store"]


def test_only_teachers_imports_open_clip() -> None:
    assert _importers("open_clip") == ["teachers"]
