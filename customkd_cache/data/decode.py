"""Image decoding: a file (or its bytes) -> an RGB ``PIL.Image``, with every failure named.

Owns the mode conversions (alpha on white, 16-bit grey, float grey), EXIF orientation, the
``dataset.max_pixels`` bound checked before decoding, and the one-line ``DatasetError`` for a file
that is not an image or is truncated.

``decode_region`` decodes a JPEG at a reduced scale (libjpeg's DCT scaling, 1/2, 1/4 or 1/8) when the
one crop that will be taken from it keeps at least twice the output size in pixels at that scale:
stage two renders one small view per decode, and a full decode of a large photo costs many times
the view.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from customkd_cache.errors import DatasetError

_SKIP_HINT = "re-download it, or leave it out by adding its id to a dataset.skip_list file"


def skip_hint(sample_id: str) -> str:
    return f"re-download it, or leave it out by adding '{sample_id}' to a dataset.skip_list file"


DECODE_ERRORS = (
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
    return decode(source, name, _SKIP_HINT)


def decode(source: Path | bytes, name: str, hint: str, *, max_pixels: int | None = None) -> Image.Image:
    try:
        with opened(source if isinstance(source, Path) else io.BytesIO(source), max_pixels) as im:
            im.load()
            return _to_rgb(_exif_transposed(im))
    except DECODE_ERRORS as e:
        raise decode_error(name, e, hint) from e


# libjpeg's DCT scale factors (``Image.draft``), largest first.
DRAFT_SCALES = (8, 4, 2)
# A crop is decoded at scale 1/s only if it still spans DRAFT_MARGIN times the output size there, so
# the resize after it reduces at least 2x more. Measured on generated photos with hard edges drawn
# on them (``python -m benchmarks.bench_loader --edges [--margin 1]``, 224 px, docs/benchmarks.md):
# with a margin of 1 a view differed from the full decode's by up to 41 (of 255) at an edge (mean
# 0.25), with 2 by up to 15 (mean 0.05); 2 runs the mix at 2.00x the full decode's items/s, 1 at 2.73x.
DRAFT_MARGIN = 2
# Formats whose decoder scales in the DCT (``Image.draft``); Pillow reads MPO files with its JPEG decoder.
_DRAFT_FORMATS = ("JPEG", "MPO")


@dataclass(frozen=True)
class Region:
    """An image decoded for crops of a known size.

    ``image`` is RGB. ``extent`` is ``(width, height)`` of the full-resolution image in ``image``'s
    pixel coordinates: a normalized box ``(x0, y0, x1, y1)`` is the pixel box
    ``(x0 * extent[0], y0 * extent[1], x1 * extent[0], y1 * extent[1])`` of ``image``. At ``scale``
    1 it is ``image.size``; at scale ``s`` it is the full size divided by ``s`` exactly (libjpeg's
    reduced image holds ``ceil(W / s)`` pixels, the last one covering the partial block).
    """

    image: Image.Image
    extent: tuple[float, float]
    scale: int


def draft_scale(width: int, height: int, box: Sequence[float], min_side: int) -> int:
    """The largest of ``DRAFT_SCALES`` at which the normalized ``box`` of a ``width x height`` image
    still spans at least ``DRAFT_MARGIN * min_side`` pixels each way, else 1 (decode in full)."""
    crop_w = (float(box[2]) - float(box[0])) * width
    crop_h = (float(box[3]) - float(box[1])) * height
    for s in DRAFT_SCALES:
        if min(crop_w, crop_h) >= DRAFT_MARGIN * min_side * s:
            return s
    return 1


def decode_region(
    source: Path | bytes,
    name: str,
    hint: str,
    *,
    box: Sequence[float],
    min_side: int,
    max_pixels: int | None = None,
) -> Region:
    """Decode ``source`` for the crop ``box`` (normalized) that will be resized to ``min_side``
    pixels (the largest output asked): a JPEG without EXIF rotation at the largest ``draft_scale``,
    anything else in full as ``decode`` does. Errors are ``decode``'s."""
    try:
        with opened(source if isinstance(source, Path) else io.BytesIO(source), max_pixels) as im:
            width, height = im.size
            scale = 1
            if im.format in _DRAFT_FORMATS and orientation(im) == 1:
                scale = draft_scale(width, height, box, min_side)
            drafted = im.draft(im.mode, (width // scale, height // scale)) if scale > 1 else None
            im.load()
            if drafted is None:  # in full (also when the decoder cannot scale this file)
                full = _to_rgb(_exif_transposed(im))
                return Region(full, (float(full.width), float(full.height)), 1)
            # draft's box: the full image in the reduced image's coordinates, (0, 0, W / s, H / s)
            extent = (float(drafted[1][2]), float(drafted[1][3]))
            return Region(_to_rgb(im), extent, round(width / extent[0]))
    except DECODE_ERRORS as e:
        raise decode_error(name, e, hint) from e


def device_jpeg(source: Path, name: str, hint: str, *, max_pixels: int | None = None) -> bytes | None:
    """The bytes of ``source`` when it is a file a JPEG decoder on the training device gives the same
    image of as ``decode`` (``torchvision.io.decode_jpeg`` with RGB output): a baseline or
    progressive JPEG in RGB or grey, without EXIF rotation, within ``max_pixels``; else None (decode
    it with ``decode``). Only the header is parsed; an error reading or parsing it is ``decode``'s."""
    try:
        data = source.read_bytes()
        with opened(io.BytesIO(data), max_pixels) as im:
            fits = im.format == "JPEG" and im.mode in ("RGB", "L") and orientation(im) == 1
    except DECODE_ERRORS as e:
        raise decode_error(name, e, hint) from e
    return data if fits else None


def decode_error(name: str, e: BaseException, hint: str) -> DatasetError:
    """The one-line error for an image that failed to open or decode; one that is only larger than
    allowed says how to raise the bound, not "re-download it"."""
    if isinstance(e, _TooLarge | Image.DecompressionBombError | Image.DecompressionBombWarning):
        leave_out = hint.removeprefix("re-download it, or ")
        return DatasetError(
            f"{name}: image too large ({reason(e)}); raise dataset.max_pixels if genuine, or {leave_out}"
        )
    return DatasetError(f"{name}: unreadable image ({reason(e)}); {hint}")


class _TooLarge(ValueError):
    pass


@contextlib.contextmanager
def opened(source: Path | io.BytesIO, max_pixels: int | None) -> Iterator[Image.Image]:
    """``Image.open`` that refuses an image of more than ``max_pixels`` before decoding it, and
    treats Pillow's DecompressionBombWarning as the error it is."""
    if max_pixels is not None and max_pixels > (Image.MAX_IMAGE_PIXELS or max_pixels):
        # Pillow's own bound (89 MP by default) would refuse first: dataset.max_pixels is the bound.
        # It is only ever raised, to the largest bound a spec of this process asked for.
        Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise _TooLarge(f"{im.width}x{im.height} px is more than dataset.max_pixels = {max_pixels}")
            yield im


def reason(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except _EXIF_ERRORS:
        return 1


def _exif_transposed(im: Image.Image) -> Image.Image:
    if orientation(im) == 1:
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
