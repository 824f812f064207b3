"""What every layout adapter shares: the listing it returns, split selection and file images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from customkd_cache.data.decode import (
    DECODE_ERRORS,
    Region,
    decode,
    decode_error,
    decode_region,
    device_jpeg,
    opened,
    orientation,
    skip_hint,
)
from customkd_cache.data.manifest import Sample, SplitManifest
from customkd_cache.data.registry import layout
from customkd_cache.errors import DatasetError, closest
from customkd_cache.specs import DatasetSpec

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


class Reader(Protocol):
    def load(self, root: Path, split: str, sample: Sample) -> Image.Image: ...

    def size(self, root: Path, split: str, sample: Sample) -> tuple[int, int]: ...


class FileReader:
    """Images are files at ``root / id``; one of more than ``max_pixels`` pixels is refused."""

    def __init__(self, max_pixels: int | None = None) -> None:
        self.max_pixels = max_pixels

    def load(self, root: Path, split: str, sample: Sample) -> Image.Image:
        path = root / sample.id
        return decode(path, str(path), skip_hint(sample.id), max_pixels=self.max_pixels)

    def load_region(
        self, root: Path, split: str, sample: Sample, *, box: Sequence[float], min_side: int
    ) -> Region:
        """The image decoded for one crop (``decode_region``): a JPEG reduced where the crop allows."""
        path = root / sample.id
        return decode_region(
            path, str(path), skip_hint(sample.id), box=box, min_side=min_side, max_pixels=self.max_pixels
        )

    def device_jpeg(self, root: Path, split: str, sample: Sample) -> bytes | None:
        """The file's bytes when the training device can decode it as Pillow would (``device_jpeg``)."""
        path = root / sample.id
        return device_jpeg(path, str(path), skip_hint(sample.id), max_pixels=self.max_pixels)

    def size(self, root: Path, split: str, sample: Sample) -> tuple[int, int]:
        path = root / sample.id
        try:
            with opened(path, self.max_pixels) as im:
                w, h = im.size
                turned = orientation(im)
        except DECODE_ERRORS as e:
            raise decode_error(str(path), e, skip_hint(sample.id)) from e
        # EXIF orientations 5..8 rotate by 90 degrees, so the decoded image has swapped sides.
        return (h, w) if turned in (5, 6, 7, 8) else (w, h)


@dataclass
class Listing:
    classes: tuple[str, ...]
    splits: list[SplitManifest]
    reader: Reader


def select_splits(
    spec: DatasetSpec, root: Path, valid: tuple[str, ...] | list[str], present: Sequence[str]
) -> list[str]:
    """The splits to list, in dataset order: ``spec.splits`` (each must be valid), else ``present``."""
    if not spec.splits:
        if not present:
            raise DatasetError(f"{root}: no {spec.kind} splits found (expected layout: {layout(spec.kind)})")
        return list(present)
    for name in spec.splits:
        if name not in valid:
            raise DatasetError(
                f"{root}: unknown {spec.kind} split '{name}'{closest(name, valid)} in dataset.splits; "
                f"valid splits: {', '.join(valid)}"
            )
    return [name for name in valid if name in spec.splits]
