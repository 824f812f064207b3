"""Contracts of the view policy (views.py): replayable boxes and flips, and how a view is rendered."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from customkd_cache.data.views import INTERPOLATIONS, render_view, sample_views, to_tensor, view_params
from customkd_cache.errors import SpecError
from customkd_cache.specs import CacheSpec, ViewsSpec, validate

W, H = 640, 480


def pixel_box(box: np.ndarray, width: int = W, height: int = H) -> np.ndarray:
    return box.astype(np.float64) * [width, height, width, height]


class TestReplay:
    def test_golden_views(self) -> None:
        # These numbers pin the view policy. Every cache written so far stores features of exactly
        # these crops; if this test fails, the views changed and old caches no longer replay, so the
        # change needs a new fingerprint (format version), not a new golden value.
        boxes, flips = sample_views(ViewsSpec(num_views=4, seed=0), sample_index=7, width=W, height=H)
        expected_px = [[110, 30, 530, 450], [349, 107, 579, 413], [60, 72, 550, 449], [5, 7, 590, 472]]
        np.testing.assert_allclose(pixel_box(boxes), expected_px, atol=1e-3)
        assert flips.tolist() == [False, True, False, True]
        assert boxes.dtype == np.float32 and boxes.shape == (4, 4) and flips.dtype == bool

    def test_same_inputs_same_views(self) -> None:
        spec = ViewsSpec(num_views=6, seed=3)
        a = sample_views(spec, sample_index=11, width=W, height=H)
        b = sample_views(spec, sample_index=11, width=W, height=H)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])

    def test_view_params_agree_with_sample_views(self) -> None:
        spec = ViewsSpec(num_views=5, seed=1)
        boxes, flips = sample_views(spec, sample_index=2, width=W, height=H)
        for v in range(spec.num_views):
            box, flip = view_params(spec, sample_index=2, view_index=v, width=W, height=H)
            np.testing.assert_array_equal(box, boxes[v])
            assert flip == flips[v]

    def test_num_views_does_not_change_earlier_views(self) -> None:
        # A cache with more views extends one with fewer: view v depends only on its own index.
        few, _ = sample_views(ViewsSpec(num_views=3), sample_index=5, width=W, height=H)
        many, _ = sample_views(ViewsSpec(num_views=9), sample_index=5, width=W, height=H)
        np.testing.assert_array_equal(few, many[:3])

    def test_different_view_sample_or_seed_gives_different_box(self) -> None:
        spec = ViewsSpec(seed=0)
        box = view_params(spec, sample_index=4, view_index=1, width=W, height=H)[0]
        other_view = view_params(spec, sample_index=4, view_index=2, width=W, height=H)[0]
        other_sample = view_params(spec, sample_index=5, view_index=1, width=W, height=H)[0]
        other_seed = view_params(ViewsSpec(seed=1), sample_index=4, view_index=1, width=W, height=H)[0]
        for other in (other_view, other_sample, other_seed):
            assert not np.array_equal(box, other)

    def test_negative_seed_is_a_spec_error(self) -> None:
        with pytest.raises(SpecError, match="views.seed"):
            validate(
                CacheSpec,
                {"dataset": {"kind": "officehome"}, "teacher": {"name": "x"}, "views": {"seed": -1}},
                "f.toml",
            )


class TestPolicy:
    def test_view_zero_is_the_centred_eval_crop(self) -> None:
        box, flip = view_params(ViewsSpec(eval_crop=0.875), sample_index=9, view_index=0, width=W, height=H)
        side = 0.875 * H
        expected = [(W - side) / 2, (H - side) / 2, (W + side) / 2, (H + side) / 2]
        np.testing.assert_allclose(pixel_box(box), expected, atol=1e-3)
        assert flip is False

    @pytest.mark.parametrize("width,height", [(640, 480), (300, 900), (64, 64), (1000, 100)])
    def test_random_views_in_range(self, width: int, height: int) -> None:
        lo_s, lo_r, hi_r = 0.08, 3 / 4, 4 / 3
        spec = ViewsSpec(num_views=40, scale=(lo_s, 1.0), ratio=(lo_r, hi_r))
        fallback = centre_fallback(width, height, lo_r, hi_r)
        for i in range(5):
            boxes, _ = sample_views(spec, sample_index=i, width=width, height=height)
            assert (boxes >= 0).all() and (boxes <= 1).all()
            for px in pixel_box(boxes[1:], width, height):
                w, h = px[2] - px[0], px[3] - px[1]
                assert w >= 1 - 1e-3 and h >= 1 - 1e-3
                if np.allclose(px, fallback, atol=1e-3):
                    continue  # the 10 tries failed: torchvision's centre crop
                # w and h are rounded to whole pixels from an area and ratio drawn in range.
                assert (w + 0.5) * (h + 0.5) >= lo_s * width * height
                assert (w - 0.5) / (h + 0.5) <= hi_r and (w + 0.5) / (h - 0.5) >= lo_r

    def test_random_views_on_an_ordinary_image_keep_ratio(self) -> None:
        spec = ViewsSpec(num_views=200)
        boxes, _ = sample_views(spec, sample_index=0, width=W, height=H)
        px = pixel_box(boxes[1:])
        ratio = (px[:, 2] - px[:, 0]) / (px[:, 3] - px[:, 1])
        # Rounding to whole pixels moves the ratio a little past the drawn range.
        assert (ratio >= 3 / 4 * 0.97).all() and (ratio <= 4 / 3 * 1.03).all()

    def test_flip_frequency_is_about_half(self) -> None:
        spec = ViewsSpec(num_views=9)
        flips = np.concatenate(
            [sample_views(spec, sample_index=i, width=W, height=H)[1][1:] for i in range(250)]
        )
        assert 0.44 < flips.mean() < 0.56  # 2000 fair draws: 4.5 standard deviations of slack

    def test_no_flip_when_disabled(self) -> None:
        flips = [
            sample_views(ViewsSpec(hflip=False), sample_index=i, width=W, height=H)[1] for i in range(50)
        ]
        assert not np.concatenate(flips).any()

    def test_extreme_image_falls_back_to_a_centre_crop(self) -> None:
        # A 1000x10 strip admits no crop of ratio <= 4/3 with area >= 8%: torchvision's fallback.
        box, _ = view_params(ViewsSpec(), sample_index=0, view_index=1, width=1000, height=10)
        px = pixel_box(box, 1000, 10)
        np.testing.assert_allclose(px, [493, 0, 506, 10], atol=1e-3)


def centre_fallback(width: int, height: int, lo_r: float, hi_r: float) -> list[float]:
    """torchvision's fallback box in pixels: the whole image, clamped to the ratio range, centred."""
    w, h = width, height
    if width / height < lo_r:
        h = round(width / lo_r)
    elif width / height > hi_r:
        w = round(height * hi_r)
    top, left = (height - h) // 2, (width - w) // 2
    return [left, top, left + w, top + h]


def gradient_image(width: int = 48, height: int = 32) -> Image.Image:
    """An RGB image whose red channel grows left to right and green top to bottom (no symmetry)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, (x + y) / 2], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


class TestRender:
    def test_matches_manual_crop_resize_mirror(self) -> None:
        img = gradient_image()
        box = np.array([8 / 48, 4 / 32, 40 / 48, 28 / 32], dtype=np.float32)

        def manual(interpolation: str) -> np.ndarray:
            out = img.crop((8, 4, 40, 28)).resize((16, 16), INTERPOLATIONS[interpolation])
            return np.asarray(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT), dtype=int)

        nearest = render_view(img, box, True, size=16, interpolation="nearest")
        assert nearest.size == (16, 16)
        np.testing.assert_array_equal(np.asarray(nearest, dtype=int), manual("nearest"))
        # A filtering resample of the box reads the real neighbours just outside it, where a crop
        # first would clamp at its edge: the two agree inside and differ slightly on the border.
        bilinear = np.asarray(render_view(img, box, True, size=16, interpolation="bilinear"), dtype=int)
        np.testing.assert_allclose(bilinear[1:-1, 1:-1], manual("bilinear")[1:-1, 1:-1], atol=1)
        np.testing.assert_allclose(bilinear, manual("bilinear"), atol=4)

    def test_flip_mirrors(self) -> None:
        img = gradient_image()
        box = np.array([0.1, 0.2, 0.9, 0.8], dtype=np.float32)
        plain = np.asarray(render_view(img, box, False, size=20, interpolation="bicubic"))
        flipped = np.asarray(render_view(img, box, True, size=20, interpolation="bicubic"))
        np.testing.assert_array_equal(flipped, plain[:, ::-1])
        assert plain[:, -1, 0].mean() > plain[:, 0, 0].mean()  # red grows to the right unflipped

    def test_unknown_interpolation(self) -> None:
        with pytest.raises(ValueError, match="interpolation"):
            render_view(
                gradient_image(), np.array([0, 0, 1, 1], np.float32), False, size=8, interpolation="area"
            )


class TestToTensor:
    def test_shape_dtype_and_normalization(self) -> None:
        img = Image.new("RGB", (5, 4), (255, 0, 51))
        x = to_tensor(img, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
        assert x.shape == (3, 4, 5) and x.dtype == torch.float32
        expected = [(1 - 0.5) / 0.5, (0 - 0.5) / 0.25, (0.2 - 0.5) / 0.5]
        for c in range(3):
            assert math.isclose(float(x[c].mean()), expected[c], abs_tol=1e-6)

    def test_grayscale_becomes_rgb(self) -> None:
        x = to_tensor(Image.new("L", (3, 3), 128), mean=(0, 0, 0), std=(1, 1, 1))
        assert x.shape == (3, 3, 3)
        torch.testing.assert_close(x, torch.full((3, 3, 3), 128 / 255))
