"""Deterministic, replayable views: the crop box and flip of every (image, view) pair.

Stage one renders each view, runs the teacher on it and stores the feature beside the box; stage two
renders the *same* view for the student. Both call the functions here, so a view is a pure function
of ``(views.seed, sample_index, view_index, width, height)``: the same inputs give the same box in
both stages, on every machine and for every teacher that shares the seed. Nothing here depends on
the teacher: its own resize/crop policy is replaced by the view policy (only its input size,
mean/std and interpolation are used), so that teachers with one seed see identical pixels.

Boxes are ``(x0, y0, x1, y1)`` float32 in normalized image coordinates, ``0 <= x0 < x1 <= 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from customkd_cache.errors import SpecError
from customkd_cache.specs import ViewsSpec

if TYPE_CHECKING:
    import torch

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}

# torchvision's RandomResizedCrop tries this many times before it falls back to a centre crop.
_CROP_TRIES = 10


def view_params(
    spec: ViewsSpec, *, sample_index: int, view_index: int, width: int, height: int
) -> tuple[np.ndarray, bool]:
    """The crop box ``(4,) float32`` (normalized x0, y0, x1, y1) and flip of one view.

    View 0 is the evaluation view: the centre square whose side is ``spec.eval_crop`` times the
    short side, never flipped. Views >= 1 follow torchvision's ``RandomResizedCrop.get_params``
    (10 tries of an area in ``scale`` times the image area and a log-uniform aspect ratio in
    ``ratio``, integer pixel sizes, else a centre crop clamped to the ratio range), then a flip with
    probability 0.5 when ``spec.hflip``. The randomness is a numpy PCG64 generator seeded with
    ``SeedSequence([spec.seed, sample_index, view_index])``, whose stream numpy keeps stable across
    versions, so boxes never depend on the torch version or on draw order elsewhere.

    Raises ``SpecError`` for a negative seed (SeedSequence refuses it) and ``ValueError`` for a
    negative index or an empty image.
    """
    if spec.seed < 0:
        raise SpecError(f"views.seed = {spec.seed}: the view seed must be >= 0")
    if sample_index < 0 or view_index < 0:
        raise ValueError(f"sample_index and view_index must be >= 0, got {sample_index}, {view_index}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1, got {width}x{height}")
    if view_index == 0:
        return _eval_box(spec.eval_crop, width, height), False
    rng = np.random.default_rng([spec.seed, sample_index, view_index])
    i, j, h, w = _random_resized_crop(rng, width, height, spec.scale, spec.ratio)
    flip = bool(rng.random() < 0.5) if spec.hflip else False
    box = np.array([j / width, i / height, (j + w) / width, (i + h) / height], dtype=np.float32)
    return box, flip


def sample_views(
    spec: ViewsSpec, *, sample_index: int, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """All ``spec.num_views`` views of one image: boxes ``(V, 4) float32`` and flips ``(V,) bool``."""
    boxes = np.empty((spec.num_views, 4), dtype=np.float32)
    flips = np.empty((spec.num_views,), dtype=bool)
    for v in range(spec.num_views):
        boxes[v], flips[v] = view_params(
            spec, sample_index=sample_index, view_index=v, width=width, height=height
        )
    return boxes, flips


def render_view(
    img: Image.Image,
    box: np.ndarray,
    flip: bool,
    *,
    size: int,
    interpolation: str,
    extent: tuple[float, float] | None = None,
) -> Image.Image:
    """The view as a ``size x size`` image: crop ``box`` and resize in one resample, then mirror.

    Cropping and resizing in one ``Image.resize(..., box=...)`` call filters from the decoded pixels
    once (no intermediate rounding), and accepts the fractional pixel box that a normalized float32
    box maps to. ``extent`` is the full image's ``(width, height)`` in ``img``'s pixel coordinates
    (``Region.extent`` of an image decoded at a reduced scale); by default ``img.size``.
    ``interpolation`` is one of ``INTERPOLATIONS``; else ``ValueError``.
    """
    resample = INTERPOLATIONS.get(interpolation)
    if resample is None:
        raise ValueError(f"interpolation {interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
    width, height = extent if extent is not None else img.size
    x0, y0, x1, y1 = (float(c) for c in box)
    out = img.resize((size, size), resample, box=(x0 * width, y0 * height, x1 * width, y1 * height))
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


def to_tensor(img: Image.Image, *, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An RGB image as a ``(3, H, W) float32`` tensor scaled to [0, 1], then ``(x - mean) / std``."""
    import torch

    pixels = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.float32)
    x = torch.from_numpy(pixels).permute(2, 0, 1).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(m).div_(s).contiguous()


# The interpolations ``render_view_on_device`` renders as Pillow does: torch's antialiased bilinear
# and bicubic kernels follow Pillow's resampling (support scaled with the reduction, bicubic
# a = -0.5). Nearest is left out: torch and Pillow round pixel centres differently (a 1-pixel shift).
DEVICE_INTERPOLATIONS = ("bilinear", "bicubic")


def render_view_on_device(
    img: torch.Tensor, box: Sequence[float], flip: bool, *, size: int, interpolation: str
) -> torch.Tensor:
    """``render_view`` for a decoded ``(3, H, W) uint8`` tensor, on its device: ``(3, size, size) uint8``.

    The box is rounded to whole pixels (the crop is a slice), then resized with torch's antialiased
    kernel in float32 and rounded. Random views' boxes are whole pixels already (``view_params``);
    the evaluation view's centre square can move by up to half a pixel. ``interpolation`` is one of
    ``DEVICE_INTERPOLATIONS``; else ``ValueError``.
    """
    import torch
    import torch.nn.functional as F

    if interpolation not in DEVICE_INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r} is not one of {list(DEVICE_INTERPOLATIONS)}")
    height, width = img.shape[-2:]
    x0, y0, x1, y1 = (float(c) for c in box)
    left, top = min(round(x0 * width), width - 1), min(round(y0 * height), height - 1)
    right, bottom = max(round(x1 * width), left + 1), max(round(y1 * height), top + 1)
    crop = img[None, :, top:bottom, left:right].float()
    out = F.interpolate(crop, size=(size, size), mode=interpolation, align_corners=False, antialias=True)
    out = out[0].clamp_(0, 255).round_().to(torch.uint8)
    return out.flip(-1) if flip else out


def to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB image as a ``(3, H, W) uint8`` tensor, unnormalized: a quarter of ``to_tensor``'s bytes
    between processes; ``normalize_on_device`` (on the training device) makes ``to_tensor``'s values of it."""
    import torch

    pixels = np.array(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def normalize_on_device(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``uint8`` pixels ``(..., 3, H, W)`` -> float32 ``(x / 255 - mean) / std`` on ``x``'s device.

    The same float32 operations in the same order as ``to_tensor``, so on the CPU the values are
    equal to ``to_tensor``'s bit for bit.
    """
    import torch

    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.to(torch.float32).div_(255.0).sub_(m).div_(s)


def _eval_box(eval_crop: float, width: int, height: int) -> np.ndarray:
    side = eval_crop * min(width, height)
    x0 = (width - side) / 2.0
    y0 = (height - side) / 2.0
    return np.array([x0 / width, y0 / height, (x0 + side) / width, (y0 + side) / height], dtype=np.float32)


def _random_resized_crop(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` in pixels, torchvision's algorithm with draws from ``rng``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    # torchvision can return an empty crop for extreme ratios on tiny images; a view needs a pixel.
    w, h = max(w, 1), max(h, 1)
    return (height - h) // 2, (width - w) // 2, h, w
