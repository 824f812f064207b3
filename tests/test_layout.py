"""Package boundaries, checked on the source: which part of the package may import what.

- ``store/`` is the only importer of zarr;
- ``models/`` is the only importer of timm, open_clip and huggingface_hub;
- ``stage_two/`` never imports ``stage_one/`` nor the teachers, except ``stage_two/online.py``
  (the online-teacher reference);
- ``store/`` and ``data/`` know nothing of either stage or of the models.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "customkd_cache"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute dotted names (relative imports resolved)."""
    here = _module(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _importers(prefix: str) -> set[str]:
    """Package modules (dotted, without ``customkd_cache.``) that import ``prefix`` or a submodule of it."""
    return {
        _module(p).removeprefix("customkd_cache.")
        for p in PACKAGE.rglob("*.py")
        if any(name == prefix or name.startswith(f"{prefix}.") for name in _imports(p))
    }


def _inside(modules: set[str], part: str) -> set[str]:
    return {m for m in modules if m == part or m.startswith(f"{part}.")}


@pytest.mark.parametrize(
    ("library", "owner"),
    [
        ("zarr", "store"),
        ("timm", "models"),
        ("open_clip", "models"),
        ("huggingface_hub", "models"),
    ],
)
def test_one_owner_per_outside_dependency(library: str, owner: str) -> None:
    importers = _importers(library)
    assert importers, f"nothing imports {library}: update this test"
    assert importers == _inside(importers, owner), f"{library} imported outside {owner}/: {sorted(importers)}"


def test_stage_two_never_imports_stage_one() -> None:
    assert _inside(_importers("customkd_cache.stage_one"), "stage_two") == set()


def test_only_the_online_reference_of_stage_two_builds_a_teacher() -> None:
    assert _inside(_importers("customkd_cache.models.teachers"), "stage_two") == {"stage_two.online"}


@pytest.mark.parametrize("part", ["store", "data"])
def test_store_and_data_know_nothing_of_the_stages_or_models(part: str) -> None:
    for upper in ("stage_one", "stage_two", "models", "lab", "cli"):
        assert _inside(_importers(f"customkd_cache.{upper}"), part) == set(), f"{part}/ imports {upper}"


def test_the_tree_shows_the_two_stages_and_the_store() -> None:
    for part in ("store", "stage_one", "stage_two", "data", "models", "lab"):
        assert (PACKAGE / part / "__init__.py").is_file(), part
    assert not [p.name for p in PACKAGE.glob("*.py") if p.stem in {"train", "extract", "store", "teachers"}]
