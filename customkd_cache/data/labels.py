"""Labeled subsets and id files: write/read labeled lists, map ids to rows of a split.

Also reads the plain id files used by ``dataset.skip_list`` (one id per line, '#' comments), and
shortens the ids an error names so that a file given by mistake never has its lines echoed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from customkd_cache.data.manifest import Manifest, Sample, SplitManifest
from customkd_cache.errors import DatasetError
from customkd_cache.files import ensure_dir, write_atomic

_ID_CHARS = re.compile(r"[\w./+\- ()\[\],&'~]{1,200}")


def shown_ids(unknown: Sequence[str], samples: Sequence[Sample]) -> str:
    """``(first: 'a', 'b')`` naming the unknown ids that look like sample ids (a known file extension,
    no ':' nor '$'), so that a file given by mistake (``/etc/shadow``) never has its lines echoed."""
    suffixes = {s.id.rsplit(".", 1)[-1].lower() for s in samples[:1000] if "." in s.id}
    plausible = [
        i
        for i in unknown
        if _ID_CHARS.fullmatch(i) and (not suffixes or i.rsplit(".", 1)[-1].lower() in suffixes)
    ]
    if not plausible:
        return "(none of them looks like a sample id: is it a list of ids?)"
    return f"(first: {', '.join(map(repr, plausible[:3]))})"


def read_id_lines(path: Path, what: str) -> list[str]:
    """Non-blank lines of a UTF-8 id file, stripped; lines starting with '#' are comments."""
    if not path.is_file():
        raise DatasetError(
            f"{path}: {what} file not found (relative paths resolve against CUSTOMKD_DATA_ROOT)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read {what} ({e}); expected UTF-8 text, one id per line") from e
    lines = (line.strip() for line in text.split("\n"))
    return [line for line in lines if line and not line.startswith("#")]


# --- labeled subsets ---------------------------------------------------------------------------


def write_labeled_list(manifest: Manifest, split: str, *, per_class: int, seed: int, out: Path) -> str:
    """Draw ``per_class`` ids of each class of ``split`` and write them to ``out``; return its sha256.

    Draws with ``numpy.random.default_rng(seed)``, class by class in label order; the file holds one
    id per line (UTF-8, ``\\n``, no header) in manifest order, so the same manifest, split and seed
    always give the same bytes. Raises ``DatasetError`` if a class has fewer than ``per_class``
    samples in the split.
    """
    if per_class < 1:
        raise DatasetError(f"{out}: per_class must be >= 1, got {per_class}")
    if seed < 0:
        raise DatasetError(f"--seed {seed}: the seed must be >= 0")
    if out.is_dir():
        raise DatasetError(f"--out {out}: is a directory; give the path of the list file to write")
    samples = manifest.split(split).samples
    labels = np.fromiter((s.label for s in samples), dtype=np.int64, count=len(samples))
    rng = np.random.default_rng(seed)
    chosen = []
    for label, name in enumerate(manifest.classes):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise DatasetError(
                f"{out}: class {label} '{name}' has {len(members)} samples in split '{split}', fewer than "
                f"per_class = {per_class}; ask for fewer per class"
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    order = np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)
    payload = "".join(f"{samples[i].id}\n" for i in order).encode("utf-8")
    ensure_dir(out.parent, what="--out")
    write_atomic(out, payload)  # readers never see a half-written list; a planted link is replaced
    return hashlib.sha256(payload).hexdigest()


def read_labeled_list(path: Path, *, sha256: str = "") -> tuple[str, ...]:
    """The ids of a labeled-list file (one per line; blank lines and '#' comments ignored).

    Raises ``DatasetError`` if the file is missing or empty, or if ``sha256`` is given and the
    file's digest differs (both digests are named).
    """
    ids = read_id_lines(path, "labeled list")
    if sha256:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != sha256.lower():
            raise DatasetError(
                f"{path}: sha256 is {actual}, expected {sha256}; "
                "use the original list or update ssl.labeled_sha256"
            )
    if not ids:
        raise DatasetError(f"{path}: labeled list has no ids (expected one sample id per line)")
    return tuple(ids)


def labeled_indices(split: SplitManifest, ids: Sequence[str]) -> np.ndarray:
    """``(len(ids),)`` int64 indices into ``split`` of ``ids``, in the order given.

    An id matches a sample id exactly, or else the sample's file name, for lists of bare names like
    ImageNet's 1 % list (``n01440764_10026.JPEG``). Raises ``DatasetError`` for ids that match
    nothing (naming the first few), a file name shared by several samples, or an id given twice.
    """
    exact = {s.id: i for i, s in reversed(list(enumerate(split.samples)))}
    by_name: dict[str, int] | None = None
    out = np.empty(len(ids), dtype=np.int64)
    unknown = []
    for k, sample_id in enumerate(ids):
        index = exact.get(sample_id)
        if index is None:
            by_name = by_name if by_name is not None else _basename_index(split)
            index = by_name.get(sample_id)
        if index is None:
            unknown.append(sample_id)
        elif index < 0:
            raise DatasetError(
                f"split '{split.name}': file name {sample_id!r} matches several samples; list full ids"
            )
        else:
            out[k] = index
    if unknown:
        example = split.samples[0].id if split.samples else ""
        raise DatasetError(
            f"split '{split.name}': {len(unknown)} labeled id(s) not found "
            f"{shown_ids(unknown, split.samples)}; ids look like '{example}' or its file name"
        )
    values, counts = np.unique(out, return_counts=True)
    if (counts > 1).any():
        twice = split.samples[int(values[counts > 1][0])].id
        raise DatasetError(
            f"split '{split.name}': sample {twice!r} is listed more than once; remove duplicates"
        )
    return out


def _basename_index(split: SplitManifest) -> dict[str, int]:
    """File name -> index; -1 where a name is shared, so that using it is an error, not a guess."""
    index: dict[str, int] = {}
    for i, s in enumerate(split.samples):
        name = s.id.rsplit("/", 1)[-1]
        index[name] = -1 if name in index else i
    return index
