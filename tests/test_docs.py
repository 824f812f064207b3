"""The README and docs/ point only at files that exist, and the README stays short."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README_MAX_BYTES = 10 * 1024

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a relative path with at least one folder and a file extension, not part of a URL or an absolute path
PATH = re.compile(
    r"(?<![\w./:~$<{-])((?:[\w.-]+/)+[\w.-]+\.(?:toml|py|md|json|png|txt|sh|cfg|yaml))(?![\w/{])"
)
BARE_MD = re.compile(r"(?<![\w./-])([A-Z][A-Z_]*\.md)\b")
PLACEHOLDERS = {"PREFIX.md"}  # `report --out PREFIX` writes PREFIX.md


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def code_files() -> list[Path]:
    """The project's Python files, this test file excepted (its examples name missing files on purpose)."""
    found = []
    for folder in ("customkd_cache", "tests", "evidence", "benchmarks"):
        found += sorted(p for p in (REPO / folder).rglob("*.py") if p.resolve() != Path(__file__).resolve())
    return found


def top_level() -> set[str]:
    """Names at the repository's top level (tracked files when git is there, else what is on disk)."""
    try:
        out = subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = []
    names = {p.split("/", 1)[0] for p in out}
    return names or {p.name for p in REPO.iterdir()}


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", path.read_text(), re.M)}


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(path.read_text()) if not re.match(r"[a-z][a-z+.-]*:", t)]


def path_references(path: Path) -> list[str]:
    tops = top_level()
    return [p for p in PATH.findall(path.read_text()) if p.split("/", 1)[0] in tops]


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_exist(doc: Path) -> None:
    missing = []
    for target in relative_links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            missing.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            missing.append(f"{target} (no such heading)")
    assert not missing, f"{doc.name}: links to nothing: {missing}"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_file_references_exist(doc: Path) -> None:
    missing = [p for p in path_references(doc) if not (REPO / p).exists() and not (doc.parent / p).exists()]
    assert not missing, f"{doc.name}: names files that do not exist: {missing}"


def test_no_bare_references_to_missing_markdown() -> None:
    """``METHOD.md``-style names in the docs and the code name files that exist."""
    known = {p.name for p in doc_files()} | PLACEHOLDERS
    missing = [
        f"{src.relative_to(REPO)}: {name}"
        for src in [*doc_files(), *code_files()]
        for name in BARE_MD.findall(src.read_text())
        if name not in known
    ]
    assert not missing, f"references to markdown files that do not exist: {missing}"


def test_code_cites_docs_that_exist() -> None:
    """Docstrings and comments that point into docs/ point at files that exist."""
    missing = [
        f"{src.relative_to(REPO)}: {ref}"
        for src in code_files()
        for ref in PATH.findall(src.read_text())
        if ref.startswith("docs/") and not (REPO / ref).exists()
    ]
    assert not missing, f"references to docs that do not exist: {missing}"


def test_readme_is_short() -> None:
    size = (REPO / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes; keep it <= {README_MAX_BYTES} (move detail to docs/)"
    )


def test_checks_catch_what_they_should(tmp_path: Path) -> None:
    """The patterns find a missing link, a missing spec path and a bare missing markdown name."""
    doc = tmp_path / "x.md"
    doc.write_text(
        "See [method](docs/nothing.md) and `pipelines/digits/D.toml`, METHOD.md, https://a.b/c/d.md, "
        "/usr/share/x/y.txt, `runs/smoke/report.md`.\n"
    )
    assert relative_links(doc) == ["docs/nothing.md"]
    assert path_references(doc) == ["docs/nothing.md", "pipelines/digits/D.toml"]
    assert BARE_MD.findall(doc.read_text()) == ["METHOD.md"]
    assert slug("Compact stores (int8)") == "compact-stores-int8"
    assert slug("UDA: digits and MNIST") == "uda-digits-and-mnist"
