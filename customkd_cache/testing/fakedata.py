"""Tiny datasets in the real on-disk layouts, for tests, benchmarks and smoke runs.

Every writer is deterministic from its ``seed`` (each image draws from its own generator seeded by
``(seed, domain, class, index)``, so adding classes or images never changes the others) and
returns the root to put in ``dataset.root`` (``write_list_file``: the list file). Images are small
and class-dependent: a class-coloured shape (rectangle, ellipse or triangle) on a contrasting
background, jittered in position and with pixel noise, so a classifier can learn something; the
OfficeHome and DomainNet domains differ in background and noise, like a domain shift.

Awkward files on request (keyword flags of the folder writers): file names with spaces and
non-ASCII characters (``unicode_names``), upper-case extensions (``upper_ext``), one image of each
of ``ODD_MODES`` (``odd_modes``: grey, CMYK and EXIF-rotated JPEGs; RGBA, LA, palette and 16-bit
PNGs) and one truncated JPEG (``truncated``). They are named ``odd_<mode>.<ext>`` and
``truncated.jpg``; ``ODD_SIZES`` gives the size each odd image decodes to.
"""

from __future__ import annotations

import colorsys
import gzip
import io
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from customkd_cache.data import (
    CIFAR10_TRAIN_BATCHES,
    DOMAINNET_DOMAINS,
    OFFICEHOME_CLASSES,
    OFFICEHOME_DOMAINS,
)

if TYPE_CHECKING:
    from customkd_cache.data import Dataset
    from customkd_cache.specs import ViewsSpec

ODD_MODES = ("gray_jpeg", "cmyk_jpeg", "exif6_jpeg", "rgba_png", "la_png", "palette_png", "png16")
_ODD_EXT = {"gray_jpeg": "jpg", "cmyk_jpeg": "jpg", "exif6_jpeg": "jpg"}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Fine label names, in label order (alphabetical), as in the official meta file.
_CIFAR100_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
    "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange "
    "orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit "
    "raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel "
    "streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip "
    "turtle wardrobe whale willow_tree wolf woman worm"
)
CIFAR100_CLASSES = tuple(_CIFAR100_NAMES.split())
IMAGENET_WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475")


def odd_file_name(mode: str, *, upper_ext: bool = False) -> str:
    """The file name ``write_odd_images`` gives the image of ``mode``."""
    ext = _ODD_EXT.get(mode, "png")
    return f"odd_{mode}.{ext.upper() if upper_ext else ext}"


def odd_size(mode: str, size: tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` the odd image of ``mode`` written at ``size`` decodes to (EXIF 6 swaps sides)."""
    return (size[1], size[0]) if mode == "exif6_jpeg" else size


# --- pictures ----------------------------------------------------------------------------------


def class_image(
    label: int, size: tuple[int, int], rng: np.random.Generator, *, domain: int = 0
) -> Image.Image:
    """An RGB picture of class ``label``: colour and shape from the label, position and noise from ``rng``.

    ``domain`` shifts the background brightness and noise level, as a change of style would.
    """
    w, h = size
    hue = (label * 0.618033988749895) % 1.0
    fg = _rgb(hue, 0.85, 0.95)
    bg = _rgb((hue + 0.5) % 1.0, 0.35, 0.25 + 0.15 * (domain % 4))
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    cx = w * (0.5 + rng.uniform(-0.15, 0.15))
    cy = h * (0.5 + rng.uniform(-0.15, 0.15))
    rx, ry = w * 0.3, h * 0.3
    shape = label % 3
    if shape == 0:
        draw.rectangle((cx - rx, cy - ry, cx + rx, cy + ry), fill=fg)
    elif shape == 1:
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fg)
    else:
        draw.polygon([(cx, cy - ry), (cx - rx, cy + ry), (cx + rx, cy + ry)], fill=fg)
    noise = rng.normal(0.0, 6.0 + 6.0 * (domain % 3), size=(h, w, 3))
    pixels = np.asarray(img, dtype=np.float64) + noise
    return Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, "JPEG", quality=90)
    else:
        img.save(path, "PNG")


def _stem(index: int, unicode_names: bool) -> str:
    return f"Bild café {index + 1:05d} ü" if unicode_names else f"{index + 1:05d}"


def _ext(upper_ext: bool, index: int) -> str:
    # Alternate .JPG and .PNG so both upper-case extensions appear.
    if not upper_ext:
        return ".jpg"
    return ".JPG" if index % 2 == 0 else ".PNG"


def _write_class_folders(
    folder: Path,
    classes: Sequence[str],
    *,
    per_class: int,
    size: tuple[int, int],
    seed: int,
    domain: int,
    unicode_names: bool = False,
    upper_ext: bool = False,
) -> None:
    for label, name in enumerate(classes):
        for i in range(per_class):
            img = class_image(label, size, _rng(seed, domain, label, i), domain=domain)
            _save(img, folder / name / f"{_stem(i, unicode_names)}{_ext(upper_ext, i)}")


def write_odd_images(
    folders: Sequence[Path], *, size: tuple[int, int] = (32, 24), seed: int = 0, upper_ext: bool = False
) -> list[Path]:
    """Write one image of each of ``ODD_MODES``, spread round-robin over ``folders``; their paths."""
    base = class_image(0, size, _rng(seed, 99))
    paths = []
    for k, mode in enumerate(ODD_MODES):
        path = folders[k % len(folders)] / odd_file_name(mode, upper_ext=upper_ext)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_odd(mode, base, path)
        paths.append(path)
    return paths


def _write_odd(mode: str, base: Image.Image, path: Path) -> None:
    w, h = base.size
    if mode == "gray_jpeg":
        base.convert("L").save(path, "JPEG")
    elif mode == "cmyk_jpeg":
        base.convert("CMYK").save(path, "JPEG")
    elif mode == "exif6_jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display": the decoded image is h x w
        base.save(path, "JPEG", exif=exif.tobytes())
    elif mode == "rgba_png":
        alpha = np.full((h, w), 255, dtype=np.uint8)
        alpha[:, : w // 2] = 0  # left half fully transparent: decodes to white there
        rgba = base.convert("RGBA")
        rgba.putalpha(Image.fromarray(alpha))
        rgba.save(path, "PNG")
    elif mode == "la_png":
        base.convert("LA").save(path, "PNG")
    elif mode == "palette_png":
        base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path, "PNG")
    elif mode == "png16":
        grey = np.asarray(base.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        Image.fromarray(grey).save(path, "PNG")
    else:
        raise ValueError(f"unknown odd image mode {mode!r}; choose from {', '.join(ODD_MODES)}")


def write_truncated_jpeg(path: Path, *, size: tuple[int, int] = (32, 24), seed: int = 0) -> Path:
    """A JPEG whose headers are intact but whose image data stops early (fails only when decoded)."""
    buf = io.BytesIO()
    class_image(1, size, _rng(seed, 98)).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    start_of_scan = data.index(b"\xff\xda")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: start_of_scan + 40])
    return path


def _write_awkward(
    folders: Sequence[Path],
    *,
    odd_modes: bool,
    truncated: bool,
    upper_ext: bool,
    size: tuple[int, int],
    seed: int,
) -> None:
    if odd_modes:
        write_odd_images(folders, size=size, seed=seed, upper_ext=upper_ext)
    if truncated:
        write_truncated_jpeg(folders[-1] / "truncated.jpg", size=size, seed=seed)


# --- folder layouts ----------------------------------------------------------------------------


def write_officehome(
    root: Path,
    *,
    per_class: int = 1,
    domains: Sequence[str] = OFFICEHOME_DOMAINS,
    classes: Sequence[str] | None = None,
    size: tuple[int, int] = (32, 24),
    seed: int = 0,
    unicode_names: bool = False,
    upper_ext: bool = False,
    odd_modes: bool = False,
    truncated: bool = False,
) -> Path:
    """ROOT/<domain>/<class>/<00001.jpg ...>; ``classes`` defaults to all 65 (fewer makes a broken copy).

    Awkward files go into the first domain, spread over its classes.
    """
    names = OFFICEHOME_CLASSES if classes is None else tuple(classes)
    for d, domain in enumerate(domains):
        _write_class_folders(
            root / domain,
            names,
            per_class=per_class,
            size=size,
            seed=seed,
            domain=OFFICEHOME_DOMAINS.index(domain) if domain in OFFICEHOME_DOMAINS else d,
            unicode_names=unicode_names,
            upper_ext=upper_ext,
        )
    if domains:
        folders = [root / domains[0] / name for name in names]
        _write_awkward(
            folders, odd_modes=odd_modes, truncated=truncated, upper_ext=upper_ext, size=size, seed=seed
        )
    return root


def write_image_folder(
    root: Path,
    *,
    classes: Sequence[str] = ("cat", "dog", "fox"),
    per_class: int = 2,
    size: tuple[int, int] = (32, 24),
    seed: int = 0,
    unicode_names: bool = False,
    upper_ext: bool = False,
    odd_modes: bool = False,
    truncated: bool = False,
) -> Path:
    """ROOT/<class>/<image>; awkward files are spread over the class folders."""
    _write_class_folders(
        root,
        classes,
        per_class=per_class,
        size=size,
        seed=seed,
        domain=0,
        unicode_names=unicode_names,
        upper_ext=upper_ext,
    )
    folders = [root / name for name in classes]
    _write_awkward(
        folders, odd_modes=odd_modes, truncated=truncated, upper_ext=upper_ext, size=size, seed=seed
    )
    return root


def write_imagenet(
    root: Path,
    *,
    wnids: Sequence[str] = IMAGENET_WNIDS,
    per_class_train: int = 3,
    per_class_val: int = 1,
    size: tuple[int, int] = (40, 32),
    seed: int = 0,
) -> Path:
    """ROOT/train/<wnid>/<wnid>_<n>.JPEG and ROOT/val/<wnid>/ILSVRC2012_val_<n:08d>.JPEG."""
    val_index = 0
    for label, wnid in enumerate(wnids):
        for i in range(per_class_train):
            img = class_image(label, size, _rng(seed, 0, label, i))
            _save(img, root / "train" / wnid / f"{wnid}_{1000 + i}.JPEG")
        for i in range(per_class_val):
            val_index += 1
            img = class_image(label, size, _rng(seed, 1, label, i))
            _save(img, root / "val" / wnid / f"ILSVRC2012_val_{val_index:08d}.JPEG")
    return root


def write_imagenet_subset_list(root: Path, out: Path, *, per_class: int = 1, seed: int = 0) -> Path:
    """A SimCLR-style labeled subset list (like ImageNet's 1 % list): bare train file names, one a line."""
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for wnid_dir in sorted(p for p in (root / "train").iterdir() if p.is_dir()):
        files = sorted(p.name for p in wnid_dir.iterdir() if p.is_file())
        chosen.extend(files[i] for i in rng.choice(len(files), size=per_class, replace=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{name}\n" for name in sorted(chosen)), encoding="utf-8")
    return out


# --- list-file layouts -------------------------------------------------------------------------


def write_domainnet(
    root: Path,
    *,
    domains: Sequence[str] = ("clipart", "sketch"),
    num_classes: int = 345,
    per_class_train: int = 1,
    per_class_test: int = 1,
    size: tuple[int, int] = (32, 32),
    seed: int = 0,
) -> Path:
    """ROOT/<domain>/<class>/<domain>_<class+1:03d>_<n:06d>.jpg plus ROOT/<domain>_{train,test}.txt lists.

    Class folders are ``class_000`` ... (the real names are not needed to test the layout).
    """
    if not 1 <= num_classes <= 345:
        raise ValueError(f"num_classes must be in 1..345, got {num_classes}")
    for domain in domains:
        d = DOMAINNET_DOMAINS.index(domain) if domain in DOMAINNET_DOMAINS else len(DOMAINNET_DOMAINS)
        lines: dict[str, list[str]] = {"train": [], "test": []}
        for label in range(num_classes):
            for i in range(per_class_train + per_class_test):
                rel = f"{domain}/class_{label:03d}/{domain}_{label + 1:03d}_{i + 1:06d}.jpg"
                _save(class_image(label, size, _rng(seed, d, label, i), domain=d), root / rel)
                lines["train" if i < per_class_train else "test"].append(f"{rel} {label}\n")
        for part, entries in lines.items():
            (root / f"{domain}_{part}.txt").write_text("".join(entries), encoding="utf-8")
    return root


def write_list_file(
    root: Path,
    *,
    name: str = "train",
    num_classes: int = 3,
    per_class: int = 2,
    size: tuple[int, int] = (32, 24),
    seed: int = 0,
) -> Path:
    """Images under ROOT/images/<class k>/ and ROOT/<name>.txt of ``relative/path label`` lines; the list.

    Folder and file names contain spaces, so the label must be split off at the last whitespace.
    """
    entries = []
    for label in range(num_classes):
        for i in range(per_class):
            rel = f"images/class {label}/img {i:03d}.jpg"
            _save(class_image(label, size, _rng(seed, 0, label, i)), root / rel)
            entries.append(f"{rel} {label}\n")
    out = root / f"{name}.txt"
    out.write_text("".join(entries), encoding="utf-8")
    return out


# --- array layouts -----------------------------------------------------------------------------


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels covering every class as evenly as possible, in a shuffled order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _cifar_rows(labels: np.ndarray, seed: int, split: int) -> np.ndarray:
    """``(N, 3072)`` uint8 rows in CIFAR's channel-major order."""
    rows = [
        np.asarray(class_image(int(y), (32, 32), _rng(seed, split, int(y), i))).transpose(2, 0, 1).reshape(-1)
        for i, y in enumerate(labels)
    ]
    return np.stack(rows) if rows else np.empty((0, 3072), dtype=np.uint8)


def _pickle(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the official (Python 2) files


def write_cifar100(root: Path, *, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """ROOT/cifar-100-python/{train,test,meta}: pickled dicts with bytes keys, like the official files."""
    folder = root / "cifar-100-python"
    rng = np.random.default_rng(seed)
    for split, (name, n) in enumerate((("train", n_train), ("test", n_test))):
        fine = _labels(n, 100, rng)
        data = {
            b"filenames": [f"fake_{i:05d}.png".encode() for i in range(n)],
            b"batch_label": f"{name} batch".encode(),
            b"fine_labels": [int(y) for y in fine],
            b"coarse_labels": [int(y) // 5 for y in fine],
            b"data": _cifar_rows(fine, seed, split),
        }
        _pickle(data, folder / name)
    meta = {
        b"fine_label_names": [n.encode() for n in CIFAR100_CLASSES],
        b"coarse_label_names": [f"superclass_{i:02d}".encode() for i in range(20)],
    }
    _pickle(meta, folder / "meta")
    return root


def write_cifar10(root: Path, *, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
    """ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}; train rows split over 5 batches."""
    folder = root / "cifar-10-batches-py"
    rng = np.random.default_rng(seed)
    train_labels = _labels(n_train, 10, rng)
    test_labels = _labels(n_test, 10, rng)
    train_rows = _cifar_rows(train_labels, seed, 0)
    batches = [*zip(CIFAR10_TRAIN_BATCHES, np.array_split(np.arange(n_train), 5), strict=True)]
    for name, idx in batches:
        _pickle(_cifar10_batch(name, train_labels[idx], train_rows[idx]), folder / name)
    _pickle(
        _cifar10_batch("test_batch", test_labels, _cifar_rows(test_labels, seed, 1)), folder / "test_batch"
    )
    meta = {
        b"label_names": [n.encode() for n in CIFAR10_CLASSES],
        b"num_cases_per_batch": 10000,
        b"num_vis": 3072,
    }
    _pickle(meta, folder / "batches.meta")
    return root


def _cifar10_batch(name: str, labels: np.ndarray, rows: np.ndarray) -> dict[bytes, object]:
    return {
        b"batch_label": name.encode(),
        b"labels": [int(y) for y in labels],
        b"data": rows,
        b"filenames": [f"fake_{i:05d}.png".encode() for i in range(len(labels))],
    }


def write_fashion_mnist(
    root: Path, *, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0
) -> Path:
    """ROOT/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]: big-endian idx files, 28 x 28 grey."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, (prefix, n) in enumerate((("train", n_train), ("t10k", n_test))):
        labels = _labels(n, 10, rng)
        images = [
            np.asarray(class_image(int(y), (28, 28), _rng(seed, split, int(y), i)).convert("L"))
            for i, y in enumerate(labels)
        ]
        pixels = np.stack(images) if images else np.empty((0, 28, 28), dtype=np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte", struct.pack(">IIII", 0x803, n, 28, 28), pixels, gz)
        _write_idx(
            root / f"{prefix}-labels-idx1-ubyte", struct.pack(">II", 0x801, n), labels.astype(np.uint8), gz
        )
    return root


def _write_idx(path: Path, header: bytes, body: np.ndarray, gz: bool) -> None:
    payload = header + body.astype(np.uint8).tobytes()
    if gz:
        # mtime=0 keeps the gzip bytes identical from run to run.
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload, mtime=0))
    else:
        path.write_bytes(payload)


def photo_like(width: int, height: int, *, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth noise at three scales, a colour gradient and a little grain
    (JPEG sizes like a camera's, not a flat test card's)."""
    rng = _rng(seed, width, height)
    out = np.zeros((height, width, 3), np.float32)
    for per_1000px, amplitude in ((4, 90.0), (16, 45.0), (64, 20.0)):
        grid = rng.random((height * per_1000px // 1000 + 2, width * per_1000px // 1000 + 2, 3))
        small = Image.fromarray((grid * 255).astype(np.uint8))
        out += (
            amplitude
            / 255.0
            * np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), np.float32)
        )
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    out += 60.0 * (xs / width)[..., None] * np.array([1.0, 0.5, 0.0], np.float32)
    out += 40.0 * (ys / height)[..., None]
    out += rng.normal(0.0, 6.0, out.shape).astype(np.float32)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def with_edges(img: Image.Image, seed: int) -> Image.Image:
    """``img`` with black and white rectangles and lines drawn on it: hard edges, the worst case for
    decoding at a reduced scale."""
    rng = np.random.default_rng(seed)
    draw = ImageDraw.Draw(img)
    w, h = img.size
    for k in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(1, max(2, w // 4))), y0 + int(rng.integers(1, max(2, h // 4)))
        colour = (0, 0, 0) if k % 2 else (255, 255, 255)
        if k % 3:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=max(1, w // 300))
    return img


def photo_views_store(
    root: Path, sizes: Sequence[tuple[int, int]], views: ViewsSpec, *, edges: bool = False
) -> tuple[Dataset, Path]:
    """Photo-like JPEGs (quality 90) of ``sizes`` as a list-file dataset in ``root`` (labels 0/1
    alternating) and ``root/views.zarr``: a store holding every image's stored views (zero features)."""
    from customkd_cache.catalog import fingerprint
    from customkd_cache.data import open_dataset
    from customkd_cache.data.views import sample_views
    from customkd_cache.specs import DatasetSpec
    from customkd_cache.store import SplitInit, create_or_open_store

    lines = []
    for i, (w, h) in enumerate(sizes):
        img = photo_like(w, h, seed=i)
        (with_edges(img, i) if edges else img).save(root / f"{i}.jpg", quality=90)
        lines.append(f"{i}.jpg {i % 2}")
    (root / "all.txt").write_text("\n".join(lines) + "\n")
    spec = DatasetSpec.model_validate(
        {"kind": "list_file", "root": str(root), "lists": [str(root / "all.txt")]}
    )
    dataset = open_dataset(spec)
    split = dataset.manifest.splits[0]
    store = create_or_open_store(
        root / "views.zarr",
        fingerprint=fingerprint({"photos": "views"}),
        identity={"photos": "views"},
        provenance={},
        splits={split.name: SplitInit(ids=split.ids(), labels=split.labels())},
        num_views=views.num_views,
        feature_dim=2,
        dtype="float16",
        unit_rows=len(sizes),
        compressor="zstd",
    )
    drawn = [sample_views(views, sample_index=i, width=w, height=h) for i, (w, h) in enumerate(sizes)]
    store.write_unit(
        split.name,
        0,
        features=np.zeros((len(sizes), views.num_views, 2), np.float32),
        boxes=np.stack([b for b, _ in drawn]),
        flips=np.stack([f for _, f in drawn]),
    )
    if not store.finalize_split(split.name):
        raise RuntimeError(f"{root / 'views.zarr'}: split {split.name} did not finalize")
    return dataset, root / "views.zarr"
