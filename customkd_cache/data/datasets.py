"""Dataset adapters: real on-disk layouts -> a stable manifest and RGB images.

``open_dataset(spec)`` lists a dataset in its real layout (OfficeHome, DomainNet, CIFAR-10/100,
ImageNet, Fashion-MNIST, an image folder or ``path label`` list files) without opening any image,
and returns a ``Dataset`` whose ``Manifest`` fixes, per split, the order of the samples, their ids,
labels and sizes. The manifest digest is part of every cache fingerprint, so it depends only on
what the samples are (ids, labels, byte sizes), never on the root path, the machine, the order the
file system returns entries in, or the locale: names sort by Unicode code point.

Sample ids are stable: the POSIX path relative to the dataset root for file datasets
(``"Art/Alarm_Clock/00001.jpg"``), ``"<split>/<index:05d>"`` for array-backed datasets (CIFAR,
Fashion-MNIST), where the index is the row in the original split.

Images are decoded on demand to RGB (``decode_image``). A corrupt image is never dropped silently:
it fails when loaded, naming the file; ``check_images`` finds them all up front, and
``dataset.skip_list`` leaves them out in a way that enters the manifest digest.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import stat
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps

from customkd_cache.errors import DatasetError, closest
from customkd_cache.files import ensure_dir, write_atomic
from customkd_cache.specs import DatasetSpec, data_path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})

OFFICEHOME_DOMAINS = ("Art", "Clipart", "Product", "Real_World")
# Sorted by code point, as torchvision's ImageFolder sorts them ("TV" before "Table"): label = index.
OFFICEHOME_CLASSES: tuple[str, ...] = (
    "Alarm_Clock",
    "Backpack",
    "Batteries",
    "Bed",
    "Bike",
    "Bottle",
    "Bucket",
    "Calculator",
    "Calendar",
    "Candles",
    "Chair",
    "Clipboards",
    "Computer",
    "Couch",
    "Curtains",
    "Desk_Lamp",
    "Drill",
    "Eraser",
    "Exit_Sign",
    "Fan",
    "File_Cabinet",
    "Flipflops",
    "Flowers",
    "Folder",
    "Fork",
    "Glasses",
    "Hammer",
    "Helmet",
    "Kettle",
    "Keyboard",
    "Knives",
    "Lamp_Shade",
    "Laptop",
    "Marker",
    "Monitor",
    "Mop",
    "Mouse",
    "Mug",
    "Notebook",
    "Oven",
    "Pan",
    "Paper_Clip",
    "Pen",
    "Pencil",
    "Postit_Notes",
    "Printer",
    "Push_Pin",
    "Radio",
    "Refrigerator",
    "Ruler",
    "Scissors",
    "Screwdriver",
    "Shelf",
    "Sink",
    "Sneakers",
    "Soda",
    "Speaker",
    "Spoon",
    "TV",
    "Table",
    "Telephone",
    "ToothBrush",
    "Toys",
    "Trash_Can",
    "Webcam",
)
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))

LAYOUTS: dict[str, str] = {
    "officehome": "ROOT/{Art,Clipart,Product,Real_World}/<65 class folders>/<images>",
    "domainnet": "ROOT/<domain>_{train,test}.txt listing ROOT/<domain>/<class>/<image>",
    "cifar100": "ROOT/cifar-100-python/{train,test,meta}",
    "cifar10": "ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
    "imagenet": "ROOT/{train,val}/<wnid>/<image>.JPEG",
    "fashion_mnist": "ROOT/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    "image_folder": "ROOT/<class>/<image>",
    "list_file": "dataset.lists files of `relative/path label` lines, paths relative to ROOT",
}

_SKIP_HINT = "re-download it, or leave it out by adding its id to a dataset.skip_list file"


# --- manifest ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One image: its stable ``id``, class ``label`` and ``size`` (file bytes; array rows: row bytes)."""

    id: str
    label: int
    size: int


@dataclass(frozen=True)
class SplitManifest:
    """The samples of one split, in the dataset's stable order (the row order of a cache)."""

    name: str
    samples: tuple[Sample, ...]

    def __len__(self) -> int:
        return len(self.samples)

    def ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.samples)

    def labels(self) -> np.ndarray:
        """``(N,)`` int64 labels in sample order."""
        return np.fromiter((s.label for s in self.samples), dtype=np.int64, count=len(self.samples))


@dataclass(frozen=True)
class Manifest:
    """What a dataset is: its kind, class names (label = index), splits and the ids left out."""

    kind: str
    classes: tuple[str, ...]
    splits: tuple[SplitManifest, ...]
    skipped: tuple[str, ...] = ()

    def split(self, name: str) -> SplitManifest:
        """The split called ``name``; ``DatasetError`` naming the valid splits if there is none."""
        for s in self.splits:
            if s.name == name:
                return s
        names = self.split_names()
        raise DatasetError(
            f"{self.kind}: no split '{name}'{closest(name, names)}; valid splits: {', '.join(names)}"
        )

    def split_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.splits)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data: kind, classes, per split its ids, labels and sizes, and skipped ids."""
        return {
            "kind": self.kind,
            "classes": list(self.classes),
            "splits": [
                {
                    "name": s.name,
                    "ids": [x.id for x in s.samples],
                    "labels": [x.label for x in s.samples],
                    "sizes": [x.size for x in s.samples],
                }
                for s in self.splits
            ],
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """The inverse of ``to_json``."""
        splits = tuple(
            SplitManifest(
                s["name"],
                tuple(
                    Sample(i, int(lab), int(size))
                    for i, lab, size in zip(s["ids"], s["labels"], s["sizes"], strict=True)
                ),
            )
            for s in data["splits"]
        )
        return cls(data["kind"], tuple(data["classes"]), splits, tuple(data["skipped"]))

    def digest(self) -> str:
        """sha256 hex of the canonical JSON of ``to_json()`` (sorted keys, no spaces, UTF-8)."""
        return self._digest

    @cached_property
    def _digest(self) -> str:
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- datasets ----------------------------------------------------------------------------------


class _Reader(Protocol):
    def load(self, root: Path, split: str, sample: Sample) -> Image.Image: ...

    def size(self, root: Path, split: str, sample: Sample) -> tuple[int, int]: ...


class Dataset:
    """A listed dataset: ``manifest`` plus image access by (split, index into the split).

    Picklable, for DataLoader workers: array files (CIFAR, Fashion-MNIST) are read lazily and once
    per process, and are not part of the pickled state.
    """

    def __init__(self, manifest: Manifest, root: Path, reader: _Reader) -> None:
        self.manifest = manifest
        self.root = root
        self._reader = reader

    def __repr__(self) -> str:
        counts = ", ".join(f"{s.name}={len(s)}" for s in self.manifest.splits)
        return f"Dataset({self.manifest.kind}, {self.root}, {counts})"

    def sample(self, split: str, index: int) -> Sample:
        return self.manifest.split(split).samples[index]

    def load_image(self, split: str, index: int) -> Image.Image:
        """The RGB image of sample ``index`` of ``split``, EXIF orientation applied.

        Raises ``DatasetError`` naming the file when it is missing or cannot be decoded.
        """
        return self._reader.load(self.root, split, self.sample(split, index))

    def image_size(self, split: str, index: int) -> tuple[int, int]:
        """``(width, height)`` as ``load_image`` would return it; reads only the header of files."""
        return self._reader.size(self.root, split, self.sample(split, index))


class _FileReader:
    """Images are files at ``root / id``; one of more than ``max_pixels`` pixels is refused."""

    def __init__(self, max_pixels: int | None = None) -> None:
        self.max_pixels = max_pixels

    def load(self, root: Path, split: str, sample: Sample) -> Image.Image:
        path = root / sample.id
        return _decode(path, str(path), _skip_hint(sample.id), max_pixels=self.max_pixels)

    def size(self, root: Path, split: str, sample: Sample) -> tuple[int, int]:
        path = root / sample.id
        try:
            with _opened(path, self.max_pixels) as im:
                w, h = im.size
                orientation = _orientation(im)
        except _DECODE_ERRORS as e:
            raise DatasetError(f"{path}: unreadable image ({_reason(e)}); {_skip_hint(sample.id)}") from e
        # EXIF orientations 5..8 rotate by 90 degrees, so the decoded image has swapped sides.
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


class _ArrayReader:
    """Images are rows of uint8 arrays: CIFAR pickles ``(N, 3, 32, 32)`` or idx files ``(N, H, W)``.

    ``fmt`` is ``"cifar10"``, ``"cifar100"`` or ``"idx"``; ``files[split]`` are the files of a split
    (CIFAR-10's training batches are concatenated in order).
    """

    def __init__(self, fmt: str, files: dict[str, tuple[Path, ...]], arrays: dict[str, np.ndarray]) -> None:
        self.fmt = fmt
        self.files = files
        self._arrays = dict(arrays)

    def __getstate__(self) -> dict[str, Any]:
        # Workers read the arrays themselves: shipping 150 MB through a pipe is slower than reading.
        return {**self.__dict__, "_arrays": {}}

    def rows(self, split: str) -> np.ndarray:
        if split not in self._arrays:
            if self.fmt == "idx":
                self._arrays[split] = _read_idx_images(self.files[split][0])
            else:
                self._arrays[split] = _read_cifar_split(self.files[split], _CIFAR_LABEL_KEYS[self.fmt])[0]
        return self._arrays[split]

    def load(self, root: Path, split: str, sample: Sample) -> Image.Image:
        row = self.rows(split)[_row_index(sample.id)]
        if row.ndim == 3:  # CIFAR rows are channel-major
            return Image.fromarray(np.ascontiguousarray(row.transpose(1, 2, 0)))
        return Image.fromarray(row).convert("RGB")

    def size(self, root: Path, split: str, sample: Sample) -> tuple[int, int]:
        shape = self.rows(split).shape
        return (shape[-1], shape[-2])


def _skip_hint(sample_id: str) -> str:
    return f"re-download it, or leave it out by adding '{sample_id}' to a dataset.skip_list file"


def _row_index(sample_id: str) -> int:
    return int(sample_id.rsplit("/", 1)[1])


# --- opening -----------------------------------------------------------------------------------


@dataclass
class _Listing:
    classes: tuple[str, ...]
    splits: list[SplitManifest]
    reader: _Reader


def open_dataset(spec: DatasetSpec) -> Dataset:
    """List the dataset ``spec`` describes and return it, ready to load images.

    Validates the layout (class folders, list files, array headers) without decoding any image.
    Applies ``spec.splits`` (dataset order, not the spec's), ``spec.skip_list`` (ids left out,
    recorded in ``Manifest.skipped``) and then ``spec.max_per_split`` (first N of each split).

    Raises ``DatasetError`` (one line naming the path, what was expected and the fix) for a missing
    root, a wrong layout, an unknown split, a missing listed file or a bad skip list.
    """
    root = spec.resolved_root()
    if not root.is_dir():
        raise DatasetError(
            f"dataset root not found: {root} (set dataset.root or CUSTOMKD_DATA_ROOT; "
            f"expected layout: {LAYOUTS[spec.kind]})"
        )
    root = root.absolute()
    listing = _LISTERS[spec.kind](spec, root)
    splits, skipped = _apply_skip_list(listing.splits, spec)
    if spec.max_per_split:
        limits = spec.max_per_split
        splits = [
            SplitManifest(
                s.name, s.samples[: _limit(limits, s.name)] if _limit(limits, s.name) else s.samples
            )
            for s in splits
        ]
    manifest = Manifest(spec.kind, listing.classes, tuple(splits), skipped)
    reader = _FileReader(spec.max_pixels) if isinstance(listing.reader, _FileReader) else listing.reader
    return Dataset(manifest, root, reader)


def check_images(ds: Dataset) -> list[str]:
    """Decode every image of every split; the ids that fail, in manifest order, each once."""
    bad: dict[str, None] = {}
    for split in ds.manifest.splits:
        for i, sample in enumerate(split.samples):
            try:
                ds.load_image(split.name, i)
            except DatasetError:
                bad[sample.id] = None
    return list(bad)


def _select_splits(
    spec: DatasetSpec, root: Path, valid: tuple[str, ...] | list[str], present: Sequence[str]
) -> list[str]:
    """The splits to list, in dataset order: ``spec.splits`` (each must be valid), else ``present``."""
    if not spec.splits:
        if not present:
            raise DatasetError(f"{root}: no {spec.kind} splits found (expected layout: {LAYOUTS[spec.kind]})")
        return list(present)
    for name in spec.splits:
        if name not in valid:
            raise DatasetError(
                f"{root}: unknown {spec.kind} split '{name}'{closest(name, valid)} in dataset.splits; "
                f"valid splits: {', '.join(valid)}"
            )
    return [name for name in valid if name in spec.splits]


def _apply_skip_list(
    splits: list[SplitManifest], spec: DatasetSpec
) -> tuple[list[SplitManifest], tuple[str, ...]]:
    if not spec.skip_list:
        return splits, ()
    path = data_path(spec.skip_list)
    skip = set(_read_id_lines(path, "dataset.skip_list"))
    known = {s.id for split in splits for s in split.samples}
    unknown = sorted(skip - known)
    if unknown:
        example = next((s.samples[0].id for s in splits if s.samples), "")
        shown = _shown_ids(unknown, [x for s in splits for x in s.samples])
        raise DatasetError(
            f"{path}: {len(unknown)} id(s) in dataset.skip_list are not in splits "
            f"{', '.join(s.name for s in splits)} {shown}; "
            f"ids look like '{example}': fix or remove those lines"
        )
    kept = [SplitManifest(s.name, tuple(x for x in s.samples if x.id not in skip)) for s in splits]
    return kept, tuple(sorted(skip))


_ID_CHARS = re.compile(r"[\w./+\- ()\[\],&'~]{1,200}")


def _shown_ids(unknown: Sequence[str], samples: Sequence[Sample]) -> str:
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


def _read_id_lines(path: Path, what: str) -> list[str]:
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


# --- file datasets -----------------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _subdirs(folder: Path) -> list[str]:
    """Names of the non-hidden sub-folders of ``folder``, sorted by code point.

    Raises DatasetError for an unreadable folder or a link that leads nowhere (dangling or a loop):
    it may be a class folder, and dropping it would shift every label after it.
    """
    out = []
    for e in _entries(folder):
        if _is_hidden(e.name):
            continue
        if _followed(e, "is_dir"):
            out.append(e.name)
        elif e.is_symlink() and not _followed(e, "is_file"):
            raise DatasetError(f"{folder / e.name}: link to nothing (dangling or a loop); fix or remove it")
    return sorted(out)


def _followed(e: os.DirEntry[str], test: str) -> bool:
    """``e.is_dir()`` or ``e.is_file()``, where a link loop counts as neither."""
    try:
        return bool(getattr(e, test)())
    except OSError:  # ELOOP
        return False


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as e:
        raise DatasetError(
            f"{folder}: cannot list this folder ({e.strerror or e}); fix its permissions"
        ) from None


def _scan_images(root: Path, rel: str) -> list[tuple[str, int]]:
    """``(id, size)`` of every image under ``root / rel`` (recursive), sorted by id."""
    found: list[tuple[str, int]] = []
    stack = [rel]
    while stack:
        prefix = stack.pop()
        for e in _entries(root / prefix):
            if _is_hidden(e.name):
                continue
            # Linked sub-folders are not followed: a link to a parent would never end.
            if e.is_dir(follow_symlinks=False):
                stack.append(f"{prefix}/{e.name}")
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                if not _followed(e, "is_file"):  # a dangling or looping link: never dropped silently
                    raise DatasetError(
                        f"{root / prefix / e.name}: not a readable image file (dangling link, loop or "
                        "special file); fix it, remove it, or list it in dataset.skip_list"
                    )
                found.append((_checked_id(f"{prefix}/{e.name}", root), e.stat().st_size))
    found.sort()
    return found


def _checked_id(sample_id: str, root: Path) -> str:
    # Ids go into JSON, list files and stores: they must be valid UTF-8 and fit on one line.
    try:
        sample_id.encode("utf-8")
    except UnicodeEncodeError:
        raise DatasetError(
            f"{str(root / sample_id)!r}: file name is not valid UTF-8; rename the file"
        ) from None
    if "\n" in sample_id or "\r" in sample_id or "\0" in sample_id:
        raise DatasetError(
            f"{str(root / sample_id)!r}: file name contains a line break or NUL; rename the file"
        )
    return sample_id


def _class_folder_split(name: str, root: Path, rel: str, classes: Sequence[str]) -> SplitManifest:
    """A split made of ``root/rel/<class>/...`` for each class (label = index in ``classes``)."""
    samples: list[Sample] = []
    for label, cls in enumerate(classes):
        prefix = f"{rel}/{cls}" if rel else cls
        found = _scan_images(root, prefix)
        if not found:
            raise DatasetError(
                f"{root / prefix}: class folder holds no images (extensions "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}, any case); add its images or remove the folder"
            )
        samples.extend(Sample(i, label, size) for i, size in found)
    if not samples:
        raise DatasetError(
            f"{root / rel}: no images found (extensions {', '.join(sorted(IMAGE_EXTENSIONS))}, any case)"
        )
    return SplitManifest(name, tuple(samples))


def _list_officehome(spec: DatasetSpec, root: Path) -> _Listing:
    present = [d for d in OFFICEHOME_DOMAINS if (root / d).is_dir()]
    # Some copies of OfficeHome name the folder "Real World"; skipping it silently would drop a domain.
    wanted = not spec.splits or "Real_World" in spec.splits
    if wanted and "Real_World" not in present and (root / "Real World").is_dir():
        raise DatasetError(f"{root / 'Real World'}: rename this folder to 'Real_World' (the split name)")
    selected = _select_splits(spec, root, OFFICEHOME_DOMAINS, present)
    splits = []
    for domain in selected:
        folder = root / domain
        if not folder.is_dir():
            raise DatasetError(
                f"OfficeHome domain folder not found: {folder} (listed in dataset.splits; "
                f"found: {', '.join(present) or 'none'}; expected layout: {LAYOUTS['officehome']})"
            )
        _check_officehome_classes(folder)
        splits.append(_class_folder_split(domain, root, domain, OFFICEHOME_CLASSES))
    return _Listing(OFFICEHOME_CLASSES, splits, _FileReader())


def _check_officehome_classes(folder: Path) -> None:
    found = _subdirs(folder)
    if len(found) != len(OFFICEHOME_CLASSES):
        raise DatasetError(
            f"{folder}: found {len(found)} class folders, expected {len(OFFICEHOME_CLASSES)} "
            "(the OfficeHome classes Alarm_Clock ... Webcam); re-extract the dataset or fix dataset.root"
        )
    extra = sorted(set(found) - set(OFFICEHOME_CLASSES))
    if extra:
        missing = sorted(set(OFFICEHOME_CLASSES) - set(found))
        raise DatasetError(
            f"{folder / extra[0]}: not an OfficeHome class{closest(extra[0], missing)}; "
            f"missing: {', '.join(missing)}; rename the folder"
        )


def _list_image_folder(spec: DatasetSpec, root: Path) -> _Listing:
    _select_splits(spec, root, ("all",), ("all",))
    classes = tuple(_subdirs(root))
    if not classes:
        raise DatasetError(f"{root}: no class folders found (expected layout: {LAYOUTS['image_folder']})")
    return _Listing(classes, [_class_folder_split("all", root, "", classes)], _FileReader())


def _list_imagenet(spec: DatasetSpec, root: Path) -> _Listing:
    present = [s for s in ("train", "val") if (root / s).is_dir()]
    selected = _select_splits(spec, root, ("train", "val"), present)
    for name in ["train", *selected]:
        if not (root / name).is_dir():
            why = "class names come from it" if name == "train" else "listed in dataset.splits"
            raise DatasetError(
                f"ImageNet folder not found: {root / name} ({why}; expected {LAYOUTS['imagenet']})"
            )
    classes = tuple(_subdirs(root / "train"))
    if not classes:
        raise DatasetError(f"{root / 'train'}: no class folders found (expected {LAYOUTS['imagenet']})")
    if "val" in selected:
        _check_imagenet_val(root / "val", classes)
    splits = [_class_folder_split(name, root, name, classes) for name in selected]
    return _Listing(classes, splits, _FileReader())


def _check_imagenet_val(folder: Path, classes: tuple[str, ...]) -> None:
    with os.scandir(folder) as it:
        loose = next((e.name for e in it if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS), None)
    if loose is not None:
        raise DatasetError(
            f"{folder / loose}: validation images must be in class folders (val/<wnid>/<image>); "
            "move them into per-wnid folders first"
        )
    found = set(_subdirs(folder))
    if found != set(classes):
        diff = sorted(found ^ set(classes))
        raise DatasetError(
            f"{folder}: {len(found)} class folders, but train has {len(classes)}; they must be the same "
            f"wnids (differing: {', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''})"
        )


# --- list files --------------------------------------------------------------------------------


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


def _list_list_file(spec: DatasetSpec, root: Path) -> _Listing:
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
    selected = _select_splits(spec, root, stems, stems)
    lines = {p.stem: _read_list_file(p, root) for p in paths if p.stem in selected}
    _check_list_labels(lines)
    top = max(x.label for entries in lines.values() for x in entries)
    classes = tuple(str(i) for i in range(top + 1))
    splits = [_list_split(name, lines[name]) for name in selected]
    return _Listing(classes, splits, _FileReader())


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


def _list_domainnet(spec: DatasetSpec, root: Path) -> _Listing:
    valid = [f"{d}_{part}" for d in DOMAINNET_DOMAINS for part in ("train", "test")]
    present = [name for name in valid if (root / f"{name}.txt").is_file()]
    selected = _select_splits(spec, root, valid, present)
    lines = {name: _read_list_file(root / f"{name}.txt", root) for name in selected}
    classes = _domainnet_classes([x for entries in lines.values() for x in entries])
    splits = [_list_split(name, lines[name]) for name in selected]
    return _Listing(classes, splits, _FileReader())


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


# --- array datasets ----------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Loads CIFAR's pickles, refusing every global except what numpy arrays need (no code runs)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[Any, Any]:
    if not path.is_file():
        raise DatasetError(f"CIFAR file not found: {path} (expected layout: ROOT/{path.parent.name}/...)")
    try:
        with path.open("rb") as f:
            data = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, ValueError, pickle.UnpicklingError, AttributeError, ImportError) as e:
        raise DatasetError(f"{path}: not a CIFAR python pickle ({e}); re-download the python version") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(data).__name__}; re-download it")
    return data


def _field(data: dict[Any, Any], key: str, path: Path) -> Any:
    # The official files were written by Python 2: keys are bytes when loaded with encoding="bytes".
    for k in (key.encode(), key):
        if k in data:
            return data[k]
    raise DatasetError(f"{path}: no '{key}' entry (found {sorted(map(str, data))}); re-download the dataset")


_CIFAR_LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}


def _read_cifar_split(files: tuple[Path, ...], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 3, 32, 32)`` uint8 images and ``(N,)`` int64 labels of the batch files, concatenated."""
    images, labels = [], []
    for path in files:
        data = _unpickle(path)
        try:
            x = np.asarray(_field(data, "data", path))
            y = np.asarray(_field(data, label_key, path), dtype=np.int64).reshape(-1)
        except (TypeError, ValueError, OverflowError) as e:
            raise DatasetError(f"{path}: malformed CIFAR batch ({e}); re-download the dataset") from None
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
            raise DatasetError(
                f"{path}: expected 'data' uint8 (N, 3072) and N labels, got {x.dtype} {x.shape} and "
                f"{len(y)} labels; re-download the dataset"
            )
        images.append(x.reshape(-1, 3, 32, 32))
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def _names(path: Path, key: str) -> tuple[str, ...]:
    raw = _field(_unpickle(path), key, path)
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw)


def _list_cifar(spec: DatasetSpec, root: Path) -> _Listing:
    if spec.kind == "cifar100":
        folder = root / "cifar-100-python"
        files: dict[str, tuple[Path, ...]] = {"train": (folder / "train",), "test": (folder / "test",)}
        classes = _names(folder / "meta", "fine_label_names")
    else:
        folder = root / "cifar-10-batches-py"
        files = {"train": tuple(folder / b for b in CIFAR10_TRAIN_BATCHES), "test": (folder / "test_batch",)}
        classes = _names(folder / "batches.meta", "label_names")
    selected = _select_splits(spec, root, ("train", "test"), ("train", "test"))
    arrays: dict[str, np.ndarray] = {}
    splits: list[SplitManifest] = []
    for name in selected:
        arrays[name], labels = _read_cifar_split(files[name], _CIFAR_LABEL_KEYS[spec.kind])
        bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
        if len(bad):
            raise DatasetError(
                f"{files[name][0]}: label {labels[bad[0]]} at row {bad[0]} is outside 0..{len(classes) - 1}; "
                "re-download the dataset"
            )
        splits.append(_array_split(name, labels, 3072))
    return _Listing(classes, splits, _ArrayReader(spec.kind, {n: files[n] for n in selected}, arrays))


def _array_split(name: str, labels: np.ndarray, row_bytes: int) -> SplitManifest:
    return SplitManifest(
        name, tuple(Sample(f"{name}/{i:05d}", int(y), row_bytes) for i, y in enumerate(labels))
    )


def _idx_file(root: Path, stem: str) -> Path:
    """The plain idx file if present (faster to read), else the gzipped one."""
    plain = root / stem
    return plain if plain.is_file() else root / f"{stem}.gz"


def _open_idx(path: Path) -> io.BufferedIOBase:
    if not path.is_file():
        raise DatasetError(
            f"Fashion-MNIST file not found: {path} (with or without .gz; "
            f"expected layout: {LAYOUTS['fashion_mnist']})"
        )
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _read_idx_header(f: io.BufferedIOBase, path: Path, magic: int, dims: int) -> tuple[int, ...]:
    head = f.read(4 + 4 * dims)
    if len(head) < 4 + 4 * dims:
        raise DatasetError(f"{path}: file too short for an idx header; re-download it")
    found, *shape = struct.unpack(f">{1 + dims}I", head)
    if found != magic:
        raise DatasetError(f"{path}: idx magic number {found:#010x}, expected {magic:#010x}; re-download it")
    return tuple(shape)


def _idx_images_shape(path: Path) -> tuple[int, ...]:
    """``(N, H, W)`` from the header of an idx3 image file."""
    try:
        with _open_idx(path) as f:
            return _read_idx_header(f, path, 0x00000803, 3)
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read idx file ({e}); re-download it") from e


def _read_idx_images(path: Path) -> np.ndarray:
    """``(N, H, W)`` uint8 images of an idx3 file."""
    try:
        with _open_idx(path) as f:
            n, h, w = _read_idx_header(f, path, 0x00000803, 3)
            body = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read idx file ({e}); re-download it") from e
    if len(body) != n * h * w:
        raise DatasetError(
            f"{path}: {len(body)} image bytes, expected {n} x {h} x {w} = {n * h * w}; re-download it"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(n, h, w)


def _read_idx_labels(path: Path) -> np.ndarray:
    try:
        with _open_idx(path) as f:
            (n,) = _read_idx_header(f, path, 0x00000801, 1)
            body = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read idx file ({e}); re-download it") from e
    if len(body) != n:
        raise DatasetError(f"{path}: {len(body)} labels, but the header says {n}; re-download it")
    return np.frombuffer(body, dtype=np.uint8).astype(np.int64)


def _list_fashion_mnist(spec: DatasetSpec, root: Path) -> _Listing:
    selected = _select_splits(spec, root, ("train", "test"), ("train", "test"))
    splits: list[SplitManifest] = []
    files: dict[str, tuple[Path, ...]] = {}
    for name in selected:
        image_path, label_path = (_idx_file(root, stem) for stem in FASHION_MNIST_FILES[name])
        n, h, w = _idx_images_shape(image_path)
        labels = _read_idx_labels(label_path)
        if len(labels) != n:
            raise DatasetError(
                f"{label_path}: {len(labels)} labels for {n} images in {image_path}; re-download both"
            )
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise DatasetError(f"{label_path}: label {labels.max()} is outside 0..9; re-download it")
        # Only uncompressed files can be size-checked without reading them; gzipped ones are checked on load.
        if image_path.suffix != ".gz" and image_path.stat().st_size != 16 + n * h * w:
            raise DatasetError(
                f"{image_path}: {image_path.stat().st_size} bytes, expected {16 + n * h * w}; re-download it"
            )
        files[name] = (image_path,)
        splits.append(_array_split(name, labels, h * w))
    return _Listing(FASHION_MNIST_CLASSES, splits, _ArrayReader("idx", files, {}))


_LISTERS = {
    "officehome": _list_officehome,
    "domainnet": _list_domainnet,
    "cifar100": _list_cifar,
    "cifar10": _list_cifar,
    "imagenet": _list_imagenet,
    "fashion_mnist": _list_fashion_mnist,
    "image_folder": _list_image_folder,
    "list_file": _list_list_file,
}


# --- decoding ----------------------------------------------------------------------------------

_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
# What a malformed EXIF block can raise inside Pillow; it must not make a readable image fail.
_EXIF_ERRORS = (OSError, SyntaxError, ValueError, struct.error, KeyError, TypeError, IndexError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def decode_image(source: Path | bytes, *, name: str) -> Image.Image:
    """Decode an image file (or its bytes) fully to RGB, with its EXIF orientation applied.

    Modes: transparent images (RGBA, LA, PA, palette or L/RGB with a transparency key) are
    composited on white, like a viewer shows them (and like OfficeHome's white product shots);
    16-bit and 32-bit integer grey (``I;16``, ``I``) are scaled by 255/65535; float grey is clipped
    to 0..255; CMYK, YCbCr, 1-bit, L and palette images are converted by Pillow.

    Raises ``DatasetError`` naming ``name`` when the data is not an image, is truncated (the whole
    image is decoded, so truncation is detected) or has a mode that has no RGB conversion.
    """
    return _decode(source, name, _SKIP_HINT)


def _decode(source: Path | bytes, name: str, hint: str, *, max_pixels: int | None = None) -> Image.Image:
    try:
        with _opened(source if isinstance(source, Path) else io.BytesIO(source), max_pixels) as im:
            im.load()
            return _to_rgb(_exif_transposed(im))
    except _DECODE_ERRORS as e:
        raise DatasetError(f"{name}: unreadable image ({_reason(e)}); {hint}") from e


class _TooLarge(ValueError):
    pass


@contextlib.contextmanager
def _opened(source: Path | io.BytesIO, max_pixels: int | None) -> Iterator[Image.Image]:
    """``Image.open`` that refuses an image of more than ``max_pixels`` before decoding it, and
    treats Pillow's DecompressionBombWarning as the error it is."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise _TooLarge(
                    f"{im.width}x{im.height} px is more than dataset.max_pixels = {max_pixels}; "
                    "raise dataset.max_pixels if the image is genuine"
                )
            yield im


def _reason(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except _EXIF_ERRORS:
        return 1


def _exif_transposed(im: Image.Image) -> Image.Image:
    if _orientation(im) == 1:
        return im
    try:
        return ImageOps.exif_transpose(im)
    except _EXIF_ERRORS:
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """A new RGB image (never ``im`` itself, which may still hold the file open)."""
    if im.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(im).astype(np.float64).clip(0, 65535) * (255.0 / 65535.0)
        return Image.fromarray(grey.round().astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        return Image.fromarray(np.asarray(im).clip(0, 255).round().astype(np.uint8)).convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


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
    ids = _read_id_lines(path, "labeled list")
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
            f"{_shown_ids(unknown, split.samples)}; ids look like '{example}' or its file name"
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


def _limit(limits: int | dict[str, int], split: str) -> int:
    """``max_per_split`` for one split: one number for all, or a table by split name (0 = all)."""
    return limits if isinstance(limits, int) else limits.get(split, 0)
