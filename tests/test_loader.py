"""Stage two's input pipeline: JPEG decoding at a reduced scale for the stored crop, uint8 pixels out
of the workers and their normalization on the training device."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from customkd_cache.data import Dataset
from customkd_cache.data.decode import decode, decode_region, draft_scale
from customkd_cache.data.views import normalize_on_device, render_view, to_tensor, to_uint8
from customkd_cache.errors import DatasetError
from customkd_cache.specs import ViewsSpec, load_train_spec
from customkd_cache.stage_two import replay
from customkd_cache.stage_two.replay import ReplayDataset, Row, decode_jpegs, jitter_on_device, make_loader
from customkd_cache.stage_two.train import run_train
from customkd_cache.store import open_store
from customkd_cache.testing import fakedata, run_cli
from customkd_cache.testing.fakedata import photo_like, photo_views_store

# Not a multiple of 8 either way: the reduced image's last pixel covers a partial block, so a box
# mapped with the reduced image's size instead of the exact full size / scale lands up to 5/8 pixel off.
W, H = 1203, 901
# Largest and mean absolute difference (0..255) between a view rendered from the reduced decode and
# from the full decode, on this photo-like JPEG. Measured: at most 2 and 0.26; mapping the box with the
# reduced image's size instead gives 3-7 and 0.47-1.12.
MAX_DIFF, MEAN_DIFF = 3, 0.35
BOXES = ([0.1, 0.05, 0.95, 0.99], [0.0, 0.0, 1.0, 1.0], [0.3, 0.2, 0.9, 0.8], [0.52, 0.4, 1.0, 1.0])


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    buf = io.BytesIO()
    photo_like(W, H, seed=1).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _view(
    img: Image.Image, box: np.ndarray, size: int, extent: tuple[float, float] | None = None
) -> np.ndarray:
    out = render_view(img, box, False, size=size, interpolation="bicubic", extent=extent)
    return np.asarray(out, np.int16)


class TestReducedDecode:
    def test_draft_scale_keeps_twice_the_output_size(self) -> None:
        box = (0.0, 0.0, 1.0, 1.0)
        assert draft_scale(3584, 3584, box, 224) == 8
        assert draft_scale(3583, 8000, box, 224) == 4  # the short side of the crop decides
        assert draft_scale(1792, 1792, box, 224) == 4
        assert draft_scale(1791, 1791, box, 224) == 2
        assert draft_scale(895, 2000, box, 224) == 1
        assert draft_scale(4000, 3000, (0.25, 0.25, 0.5, 0.5), 224) == 1  # a 1000 x 750 px crop
        assert draft_scale(4000, 3000, (0.0, 0.25, 0.5, 0.75), 224) == 2  # 2000 x 1500 px

    @pytest.mark.parametrize("box", BOXES)
    @pytest.mark.parametrize("size", [64, 100])
    def test_crop_of_the_reduced_image_is_the_full_decode_crop(
        self, jpeg: bytes, box: list[float], size: int
    ) -> None:
        b = np.asarray(box, np.float32)
        region = decode_region(jpeg, "photo.jpg", "hint", box=b, min_side=size)
        assert region.scale == draft_scale(W, H, b, size) > 1
        assert region.extent == (W / region.scale, H / region.scale)
        assert region.image.size == (-(-W // region.scale), -(-H // region.scale))
        assert region.image.mode == "RGB"
        full = _view(decode(jpeg, "photo.jpg", "hint"), b, size)
        diff = np.abs(_view(region.image, b, size, region.extent) - full)
        assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (diff.max(), diff.mean())

    def test_small_crop_is_decoded_in_full(self, jpeg: bytes) -> None:
        box = np.asarray([0.1, 0.1, 0.2, 0.2], np.float32)  # 120 x 90 px
        region = decode_region(jpeg, "photo.jpg", "hint", box=box, min_side=64)
        assert region.scale == 1 and region.extent == (W, H)
        assert region.image.tobytes() == decode(jpeg, "photo.jpg", "hint").tobytes()

    def test_rotated_and_non_jpeg_images_are_decoded_in_full(self, tmp_path: Path) -> None:
        img = photo_like(640, 480, seed=2)
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90: the decoded image is 480 x 640
        box = np.asarray([0.0, 0.0, 1.0, 1.0], np.float32)
        for name, kwargs in (("turned.jpg", {"exif": exif.tobytes(), "quality": 90}), ("flat.png", {})):
            path = tmp_path / name
            img.save(path, **kwargs)
            region = decode_region(path, str(path), "hint", box=box, min_side=32)
            full = decode(path, str(path), "hint")
            assert region.scale == 1 and region.image.tobytes() == full.tobytes()
            assert region.extent == (full.width, full.height)
        assert full.size == (640, 480) and region.image.size == (640, 480)  # the PNG
        turned = decode_region(tmp_path / "turned.jpg", "t", "hint", box=box, min_side=32)
        assert turned.image.size == (480, 640)

    def test_errors_are_decodes(self, jpeg: bytes, tmp_path: Path) -> None:
        box = np.asarray([0.0, 0.0, 1.0, 1.0], np.float32)
        with pytest.raises(DatasetError, match="photo.jpg: image too large.*dataset.max_pixels"):
            decode_region(
                jpeg, "photo.jpg", "re-download it, or skip it", box=box, min_side=8, max_pixels=1000
            )
        with pytest.raises(DatasetError, match="cut.jpg: unreadable image"):
            decode_region(jpeg[: len(jpeg) // 2], "cut.jpg", "hint", box=box, min_side=8)


class TestUint8Pixels:
    def test_normalize_on_device_equals_the_float_conversion(self) -> None:
        img = photo_like(40, 30, seed=3)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        x = to_uint8(img)
        assert x.dtype == torch.uint8 and x.shape == (3, 30, 40)
        want = to_tensor(img, mean=mean, std=std)
        assert torch.equal(normalize_on_device(x, mean, std), want)
        batch = normalize_on_device(torch.stack([x, x.flip(-1)]), mean, std)
        assert batch.dtype == torch.float32 and torch.equal(batch[0], want)
        assert torch.equal(batch[1], want.flip(-1))


# --- the replayed views --------------------------------------------------------------------------

VIEWS = ViewsSpec.model_validate({"num_views": 4, "seed": 1})
SIZES = ((300, 240), (257, 333), (96, 80), (640, 480))
STUDENT_SIZE = 24
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Path]:
    """Photo-like JPEGs in a list-file dataset and a store holding their views (features are zeros)."""
    return photo_views_store(tmp_path_factory.mktemp("photos"), SIZES, VIEWS)


def _replay(photos: tuple[Dataset, Path], **kw: Any) -> ReplayDataset:
    dataset, path = photos
    ds = ReplayDataset(
        dataset=dataset,
        store_path=path,
        features=None,
        student_size=STUDENT_SIZE,
        student_mean=MEAN,
        student_std=STD,
        **{"interpolation": "bicubic", **kw},
    )
    split = dataset.manifest.splits[0].name
    ds.set_items([(Row(split, r, True), v) for r in range(len(SIZES)) for v in range(VIEWS.num_views)], 0)
    return ds


class TestReplayedViews:
    def test_reduced_decode_stays_close_and_flips_stay_exact(self, photos: tuple[Dataset, Path]) -> None:
        reduced, full = _replay(photos), _replay(photos, reduced=False)
        dataset, path = photos
        boxes, flips = open_store(path).read_boxes(dataset.manifest.splits[0].name)
        scales = []
        for k in range(len(full)):
            a, b = reduced[k], full[k]
            assert a["pixels"].dtype == torch.uint8 and a["pixels"].shape == (3, STUDENT_SIZE, STUDENT_SIZE)
            diff = (a["pixels"].int() - b["pixels"].int()).abs()
            assert int(diff.max()) <= MAX_DIFF and float(diff.float().mean()) <= MEAN_DIFF
            row, view = a["row"], a["view"]
            box = boxes[row, view]
            w, h = SIZES[row]
            scales.append(draft_scale(w, h, box, STUDENT_SIZE))
            # the flip is the stored one, applied to the reduced rendering as to the full one
            region = dataset.load_region(dataset.manifest.splits[0].name, row, box=box, min_side=STUDENT_SIZE)
            plain = to_uint8(
                render_view(
                    region.image, box, False, size=STUDENT_SIZE, interpolation="bicubic", extent=region.extent
                )
            )
            assert torch.equal(a["pixels"], plain.flip(-1) if flips[row, view] else plain)
        assert set(scales) >= {1, 2, 4, 8}  # every scale was exercised
        assert any(flips.ravel()) and not all(flips[:, 1:].ravel())

    def test_batches_are_uint8_until_the_device(self, photos: tuple[Dataset, Path]) -> None:
        ds = _replay(photos, reduced=False)
        batch = next(iter(make_loader(ds, batch_size=5, batches=None, num_workers=0, seed=0)))
        assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (
            5,
            3,
            STUDENT_SIZE,
            STUDENT_SIZE,
        )
        on = ds.to_device(batch, "cpu")
        assert on["pixels"].dtype == torch.float32
        assert torch.equal(on["pixels"], normalize_on_device(batch["pixels"], MEAN, STD))
        assert torch.equal(on["label"], batch["label"]) and torch.equal(on["row"], batch["row"])


# --- the device path (run.decode = "gpu"), exercised on the CPU -----------------------------------

# Largest difference (0..255) of a view rendered on the device from Pillow's, both from a full decode:
# torch's antialiased kernels against Pillow's fixed-point ones, and the evaluation view's box rounded to
# whole pixels. Measured at most 6 (bicubic, upsampling a small crop), 1-3 otherwise.
DEVICE_MAX_DIFF = 8


def _pixels_255(ds: ReplayDataset, batch: dict[str, Any]) -> torch.Tensor:
    """A batch's normalized pixels, back in 0..255."""
    x = ds.to_device(batch, "cpu")["pixels"]
    return x * torch.tensor(STD).view(3, 1, 1) * 255.0 + torch.tensor(MEAN).view(3, 1, 1) * 255.0


class TestDevicePath:
    def test_device_decode_gives_pillows_pixels(self, photos: tuple[Dataset, Path]) -> None:
        gpu, cpu = _replay(photos, decode="gpu"), _replay(photos, reduced=False)
        item = gpu[0]
        assert "pixels" not in item and item["jpeg"].dtype == torch.uint8 and item["box"].shape == (4,)
        batch = gpu.collate([gpu[k] for k in range(len(gpu))])
        assert len(batch["jpeg"]) == len(gpu) and batch["pixels"].dtype == torch.uint8
        want = _pixels_255(cpu, cpu.collate([cpu[k] for k in range(len(cpu))]))
        got = _pixels_255(gpu, batch)
        assert float((got - want).abs().max()) <= DEVICE_MAX_DIFF + 1e-3
        # the same files decode to the same pixels as Pillow's full decode
        dataset, _ = photos
        split = dataset.manifest.splits[0].name
        data = [
            torch.frombuffer(bytearray(dataset.device_jpeg(split, r) or b""), dtype=torch.uint8)
            for r in range(2)
        ]
        for r, img in enumerate(decode_jpegs(data, torch.device("cpu"))):
            assert img is not None and torch.equal(img, to_uint8(dataset.load_image(split, r)))

    def test_jitter_on_device_is_pillows(self, photos: tuple[Dataset, Path]) -> None:
        gpu, cpu = (
            _replay(photos, decode="gpu", photometric=True, seed=4),
            _replay(photos, photometric=True, seed=4),
        )
        img = to_uint8(photo_like(40, 30, seed=5))
        factors = torch.from_numpy(np.stack([cpu._jitter_factors(0, r) for r in range(6)]))  # noqa: SLF001
        want = []
        for r in range(6):
            pil = Image.fromarray(img.permute(1, 2, 0).numpy())
            want.append(to_uint8(cpu._jitter(pil, 0, r)))  # noqa: SLF001
        assert torch.equal(jitter_on_device(img[None].expand(6, -1, -1, -1), factors), torch.stack(want))
        batch = gpu.collate([gpu[k] for k in range(8)])
        assert batch["jitter"].shape == (8, 3)
        plain = _replay(photos, decode="gpu", seed=4)
        jittered, unjittered = (
            _pixels_255(gpu, batch),
            _pixels_255(plain, plain.collate([plain[k] for k in range(8)])),
        )
        assert float((jittered - unjittered).abs().mean()) > 5

    def test_other_images_are_rendered_by_the_workers(
        self, photos: tuple[Dataset, Path], tmp_path: Path
    ) -> None:
        dataset, path = photos
        ds = _replay(photos, decode="gpu")
        split = dataset.manifest.splits[0].name
        png = dataset.root / dataset.sample(split, 1).id
        grey = photo_like(*SIZES[1], seed=1).convert("L")
        original = png.read_bytes()
        try:
            grey.save(png, "PNG")  # same name, now a PNG: decoded by the worker
            items = [ds[k] for k in range(VIEWS.num_views * 2)]
        finally:
            png.write_bytes(original)
        assert all("jpeg" in it for it in items[: VIEWS.num_views])
        assert all("pixels" in it and "jpeg" not in it for it in items[VIEWS.num_views :])
        batch = ds.collate(items)
        assert batch["jpeg_at"].tolist() == list(range(VIEWS.num_views))
        out = _pixels_255(ds, batch)
        for k, it in enumerate(items[VIEWS.num_views :], start=VIEWS.num_views):
            want = normalize_on_device(it["pixels"][None], MEAN, STD)[0]
            assert torch.equal(ds.to_device(batch, "cpu")["pixels"][k], want)
        assert float(out[: VIEWS.num_views].std()) > 1  # the device rendered something

    def test_a_file_the_device_cannot_decode_fails_with_its_name(
        self, photos: tuple[Dataset, Path], tmp_path: Path
    ) -> None:
        ds = _replay(photos, decode="gpu")
        dataset, _ = photos
        split = dataset.manifest.splits[0].name
        path = dataset.root / dataset.sample(split, 0).id
        original = path.read_bytes()
        try:
            batch = ds.collate([ds[0], ds[VIEWS.num_views]])
            batch["jpeg"][0] = batch["jpeg"][0][: len(original) // 2].clone()  # as if cut short on disk
            path.write_bytes(original[: len(original) // 2])
            with pytest.raises(DatasetError, match=r"0\.jpg: unreadable image"):
                ds.to_device(batch, "cpu")
        finally:
            path.write_bytes(original)

    def test_online_teacher_and_other_interpolations_stay_on_the_workers(
        self, photos: tuple[Dataset, Path]
    ) -> None:
        teacher = {"teacher_size": 32, "teacher_mean": MEAN, "teacher_std": STD}
        for ds in (
            _replay(photos, decode="gpu", **teacher),
            _replay(photos, decode="gpu", interpolation="lanczos"),
        ):
            item = ds[0]
            assert "jpeg" not in item and item["pixels"].dtype == torch.uint8
        with pytest.raises(ValueError, match="decode"):
            _replay(photos, decode="nvjpeg")


def test_training_with_device_decode_runs_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run.decode = "gpu"`` through stage A, stage B and evaluation: every batch's JPEGs decoded in
    ``to_device`` (on the CPU here, the same function as on CUDA)."""
    repo = Path(__file__).resolve().parents[1]
    root = fakedata.write_officehome(tmp_path / "OfficeHome", per_class=1)
    env = dict(
        os.environ, CUSTOMKD_CACHE_ROOT=str(tmp_path / "caches"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"
    )
    cache_spec = repo / "cache_specs" / "smoke" / "officehome.toml"
    run_cli("cache", "--spec", str(cache_spec), "--set", f"dataset.root={root}", "-q", env=env)
    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path / "caches"))
    decoded: list[int] = []
    decode_jpegs = replay.decode_jpegs

    def counting(data: Any, device: torch.device) -> Any:
        decoded.append(len(data))
        return decode_jpegs(data, device)

    monkeypatch.setattr(replay, "decode_jpegs", counting)
    train_spec = repo / "pipelines" / "smoke" / "officehome.toml"
    spec = load_train_spec(train_spec, [f"dataset.root={root}", "run.decode=gpu", "optim.epochs=1"])
    result = run_train(spec, spec_path=train_spec, out=tmp_path / "run")
    assert result["student_accuracy"] is not None
    assert sum(decoded) > 0
