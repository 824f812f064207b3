"""Class-folder layouts: OfficeHome, ImageNet and a plain image folder (``ROOT/<class>/<image>``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from customkd_cache.data.layouts.base import IMAGE_EXTENSIONS, FileReader, Listing, select_splits
from customkd_cache.data.manifest import Sample, SplitManifest
from customkd_cache.data.registry import layout
from customkd_cache.errors import DatasetError, closest
from customkd_cache.specs import DatasetSpec

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
    """``(id, size)`` of every image under ``root / rel`` (recursive), sorted by id.

    Linked sub-folders are followed (their images keep the linked path as id, like linked class
    folders); a link back to a folder above it is a loop, refused with one line. A linked entry that
    leads nowhere is refused too: nothing is dropped silently.
    """
    found: list[tuple[str, int]] = []
    stack: list[tuple[str, tuple[str, ...]]] = [(rel, (os.path.realpath(root / rel),))]
    while stack:
        prefix, above = stack.pop()
        for e in _entries(root / prefix):
            if _is_hidden(e.name):
                continue
            if _followed(e, "is_dir"):
                real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(above[-1], e.name)
                if real in above:
                    raise DatasetError(
                        f"{root / prefix / e.name}: links to a folder above it ({real}), a loop; "
                        "remove the link or point it elsewhere"
                    )
                stack.append((f"{prefix}/{e.name}", (*above, real)))
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


def list_officehome(spec: DatasetSpec, root: Path) -> Listing:
    present = [d for d in OFFICEHOME_DOMAINS if (root / d).is_dir()]
    # Some copies of OfficeHome name the folder "Real World"; skipping it silently would drop a domain.
    wanted = not spec.splits or "Real_World" in spec.splits
    if wanted and "Real_World" not in present and (root / "Real World").is_dir():
        raise DatasetError(f"{root / 'Real World'}: rename this folder to 'Real_World' (the split name)")
    selected = select_splits(spec, root, OFFICEHOME_DOMAINS, present)
    splits = []
    for domain in selected:
        folder = root / domain
        if not folder.is_dir():
            raise DatasetError(
                f"OfficeHome domain folder not found: {folder} (listed in dataset.splits; "
                f"found: {', '.join(present) or 'none'}; expected layout: {layout('officehome')})"
            )
        _check_officehome_classes(folder)
        splits.append(_class_folder_split(domain, root, domain, OFFICEHOME_CLASSES))
    return Listing(OFFICEHOME_CLASSES, splits, FileReader())


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


def list_image_folder(spec: DatasetSpec, root: Path) -> Listing:
    select_splits(spec, root, ("all",), ("all",))
    classes = tuple(_subdirs(root))
    if not classes:
        raise DatasetError(f"{root}: no class folders found (expected layout: {layout('image_folder')})")
    return Listing(classes, [_class_folder_split("all", root, "", classes)], FileReader())


def list_imagenet(spec: DatasetSpec, root: Path) -> Listing:
    present = [s for s in ("train", "val") if (root / s).is_dir()]
    selected = select_splits(spec, root, ("train", "val"), present)
    for name in ["train", *selected]:
        if not (root / name).is_dir():
            why = "class names come from it" if name == "train" else "listed in dataset.splits"
            raise DatasetError(
                f"ImageNet folder not found: {root / name} ({why}; expected {layout('imagenet')})"
            )
    classes = tuple(_subdirs(root / "train"))
    if not classes:
        raise DatasetError(f"{root / 'train'}: no class folders found (expected {layout('imagenet')})")
    if "val" in selected:
        _check_imagenet_val(root / "val", classes)
    splits = [_class_folder_split(name, root, name, classes) for name in selected]
    return Listing(classes, splits, FileReader())


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
