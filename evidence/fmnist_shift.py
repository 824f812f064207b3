"""Fashion-MNIST -> Fashion-MNIST sketches: a UDA benchmark from real images.

The source is Fashion-MNIST as it is (white garments on black); the target is a pencil-sketch
rendering of other Fashion-MNIST images: the Sobel gradient magnitude of the image, scaled to the
image's own maximum and inverted, so the garment's outline and inner edges are dark lines on white
paper (:func:`sketch`). The filled silhouette the source student learns from is gone and the
contrast is reversed.

``write_fmnist_shift_domains`` writes a ``list_file`` dataset (PNG files, one ``path label`` list
per split), deterministic from ``seed``: ``fmnist_train`` and ``fmnist_val`` (labeled source and its
held-out validation split) and ``sketch_train`` (unlabeled target) are disjoint sets of training
images, ``sketch_test`` (evaluation) comes from the test images (:data:`SIZES`).

    python -m evidence.fmnist_shift   # writes $CUSTOMKD_DATA_ROOT/fmnist_sketch once
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evidence.mnistm import write_split

SPLITS = ("fmnist_train", "fmnist_val", "sketch_train", "sketch_test")
SIZES = {"fmnist_train": 3000, "fmnist_val": 500, "sketch_train": 3000, "sketch_test": 1500}


def sketch(img: np.ndarray) -> np.ndarray:
    """(28, 28) uint8 -> (28, 28) uint8: inverted Sobel gradient magnitude, scaled per image."""
    x = np.pad(img.astype(np.float64), 1, mode="edge")
    gx = (x[:-2, 2:] + 2 * x[1:-1, 2:] + x[2:, 2:]) - (x[:-2, :-2] + 2 * x[1:-1, :-2] + x[2:, :-2])
    gy = (x[2:, :-2] + 2 * x[2:, 1:-1] + x[2:, 2:]) - (x[:-2, :-2] + 2 * x[:-2, 1:-1] + x[:-2, 2:])
    mag = np.hypot(gx, gy)
    top = mag.max()
    edges = mag / top if top > 0 else mag
    return np.rint(255.0 * (1.0 - edges)).astype(np.uint8)


def write_fmnist_shift_domains(
    out: Path,
    *,
    seed: int = 0,
    train: tuple[np.ndarray, np.ndarray] | None = None,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    sizes: dict[str, int] = SIZES,
) -> Path:
    """Write the four splits under ``out`` (once; an existing complete folder is reused).
    ``train`` / ``test`` ((N, 28, 28) uint8, (N,) labels) default to Fashion-MNIST's idx files
    (``evidence.fmnist.ensure_fashion_mnist``)."""
    out = out.resolve()
    if all((out / f"{s}.txt").is_file() for s in SPLITS):
        return out
    if train is None or test is None:
        from evidence.fmnist import ensure_fashion_mnist, read_idx

        folder = ensure_fashion_mnist()
        train, test = read_idx(folder, "train"), read_idx(folder, "t10k")
    (tx, ty), (vx, vy) = train, test
    order = np.random.default_rng([seed, len(ty)]).permutation(len(ty))
    a, b, c = sizes["fmnist_train"], sizes["fmnist_val"], sizes["sketch_train"]
    parts = {
        "fmnist_train": np.sort(order[:a]),
        "fmnist_val": np.sort(order[a : a + b]),
        "sketch_train": np.sort(order[a + b : a + b + c]),
    }
    for split, idx in parts.items():
        imgs = tx[idx] if split.startswith("fmnist") else np.stack([sketch(im) for im in tx[idx]])
        write_split(out, split, imgs, ty[idx], idx)
    test_idx = np.sort(np.random.default_rng([seed, len(vy)]).permutation(len(vy))[: sizes["sketch_test"]])
    write_split(out, "sketch_test", np.stack([sketch(im) for im in vx[test_idx]]), vy[test_idx], test_idx)
    return out


def main() -> None:
    from customkd_cache.specs import data_root

    print(write_fmnist_shift_domains(data_root() / "fmnist_sketch"))


if __name__ == "__main__":
    main()
