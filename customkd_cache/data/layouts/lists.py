"""List-file layouts: ``path label`` list files, and DomainNet (``<domain>_{train,test}.txt``)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from customkd_cache.data.layouts.base import FileReader, Listing, select_splits
from customkd_cache.data.manifest import Sample, SplitManifest
from customkd_cache.errors import DatasetError
from customkd_cache.specs import DatasetSpec, data_path

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


@dataclass(frozen=True)
class _ListLine:
    file: Path
    lineno: int
    id: str
    label: int
    size: int


def _read_list_file(path: Path, root: Path) -> list[_ListLine]:
    """Parse ``relative/path label`` lines (the label is after the last whitespace) and stat each image."""
    if not path.is_file():
        raise DatasetError(
            f"list file not found: {path} (relative list paths resolve against CUSTOMKD_DATA_ROOT; "
            "give `relative/path label` lines)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(
            f"{path}: cannot read list file ({e}); expected UTF-8 `relative/path label` lines"
        ) from e
    out = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
            raise DatasetError(
                f"{path}:{lineno}: expected `relative/path label` with a label >= 0, got {line!r}"
            )
        if "\0" in line:
            raise DatasetError(f"{path}:{lineno}: entry contains a NUL byte; fix the line")
        rel = PurePosixPath(parts[0].strip())
        if rel.is_absolute() or ".." in rel.parts:
            raise DatasetError(f"{path}:{lineno}: {rel} must be a path inside the dataset root {root}")
        sample_id = rel.as_posix()
        if sample_id in seen:
            raise DatasetError(
                f"{path}:{lineno}: {sample_id} is already listed at line {seen[sample_id]}; an image is "
                "listed once per split (with one label): remove one of the lines"
            )
        seen[sample_id] = lineno
        try:
            st = os.stat(root / sample_id)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise DatasetError(
                f"{path}:{lineno}: listed image not found: {root / sample_id} "
                "(check dataset.root, or remove the line)"
            )
        out.append(_ListLine(path, lineno, sample_id, int(parts[1]), st.st_size))
    if not out:
        raise DatasetError(f"{path}: list file has no entries (expected `relative/path label` lines)")
    return out


def list_list_file(spec: DatasetSpec, root: Path) -> Listing:
    if not spec.lists:
        raise DatasetError(
            f"{root}: dataset kind 'list_file' needs dataset.lists = ['train.txt', ...] "
            "(files of `relative/path label` lines)"
        )
    paths = [data_path(p) for p in spec.lists]
    stems = [p.stem for p in paths]
    for p in paths:
        if stems.count(p.stem) > 1:
            raise DatasetError(f"{p}: two list files share the split name '{p.stem}'; rename one")
    selected = select_splits(spec, root, stems, stems)
    lines = {p.stem: _read_list_file(p, root) for p in paths if p.stem in selected}
    _check_list_labels(lines)
    top = max(x.label for entries in lines.values() for x in entries)
    classes = tuple(str(i) for i in range(top + 1))
    splits = [_list_split(name, lines[name]) for name in selected]
    return Listing(classes, splits, FileReader())


def _check_list_labels(lines: dict[str, list[_ListLine]]) -> None:
    """Labels are class indices, so with every class listed at least once a label is below the
    number of entries; a larger one is a typo, refused before it sizes the class table."""
    entries = [x for part in lines.values() for x in part]
    for x in entries:
        if x.label >= len(entries):
            raise DatasetError(
                f"{x.file}:{x.lineno}: label {x.label} is not below the {len(entries)} listed entries; "
                "labels are class indices 0..C-1: fix the label"
            )


def _list_split(name: str, entries: list[_ListLine]) -> SplitManifest:
    return SplitManifest(name, tuple(Sample(x.id, x.label, x.size) for x in entries))


def list_domainnet(spec: DatasetSpec, root: Path) -> Listing:
    valid = [f"{d}_{part}" for d in DOMAINNET_DOMAINS for part in ("train", "test")]
    present = [name for name in valid if (root / f"{name}.txt").is_file()]
    selected = select_splits(spec, root, valid, present)
    lines = {name: _read_list_file(root / f"{name}.txt", root) for name in selected}
    classes = _domainnet_classes([x for entries in lines.values() for x in entries])
    splits = [_list_split(name, lines[name]) for name in selected]
    return Listing(classes, splits, FileReader())


def _domainnet_classes(entries: list[_ListLine]) -> tuple[str, ...]:
    """Class names by label, from the class folder of each listed path; labels must agree with folders."""
    by_label: dict[int, _ListLine] = {}
    by_folder: dict[str, _ListLine] = {}
    for x in entries:
        parts = x.id.split("/")
        if len(parts) < 3:
            raise DatasetError(f"{x.file}:{x.lineno}: expected <domain>/<class>/<image>, got {x.id!r}")
        folder = parts[-2]
        first = by_label.setdefault(x.label, x)
        other = by_folder.setdefault(folder, x)
        for prev in (first, other):
            prev_folder = prev.id.split("/")[-2]
            if prev.label != x.label or prev_folder != folder:
                raise DatasetError(
                    f"{x.file}:{x.lineno}: label {x.label} for class folder '{folder}', but "
                    f"{prev.file.name}:{prev.lineno} gives label {prev.label} for '{prev_folder}'; "
                    "fix the list file"
                )
    labels = sorted(by_label)
    gaps = sorted(set(range(labels[-1] + 1)) - set(labels))
    if gaps:
        raise DatasetError(
            f"{entries[0].file}: labels must run 0..{labels[-1]}, but label {gaps[0]} never appears "
            "in the selected list files; select the splits of a whole domain or fix the lists"
        )
    return tuple(by_label[i].id.split("/")[-2] for i in labels)
