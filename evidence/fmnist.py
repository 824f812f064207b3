"""Real data for the demo and the study: Fashion-MNIST, and lists and domains built from it.

``ensure_fashion_mnist`` finds the four idx files: the Debian package's copy
(``/usr/share/datasets/fashion-mnist``), else installs ``dataset-fashion-mnist`` with apt when this
is a Debian machine run as root, else downloads them from the dataset's official mirror into
``$CUSTOMKD_DATA_ROOT/fashion-mnist``. Every file is checked against the sha256 of its decompressed
content (the same whichever of the three sources it came from).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from customkd_cache.data import FASHION_MNIST_CLASSES
from customkd_cache.specs import data_root

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# sha256 of the decompressed idx files
SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in SHA256)


def _verify(folder: Path) -> None:
    for name, want in SHA256.items():
        got = hashlib.sha256(gzip.decompress((folder / name).read_bytes())).hexdigest()
        if got != want:
            raise SystemExit(
                f"{folder / name}: content sha256 {got[:12]} != expected {want[:12]}; delete it and rerun"
            )


def ensure_fashion_mnist() -> Path:
    """The folder holding the four verified Fashion-MNIST idx.gz files."""
    if _complete(DEBIAN_DIR):
        _verify(DEBIAN_DIR)
        return DEBIAN_DIR
    if shutil.which("apt-get") and os.geteuid() == 0:
        log("installing the Debian package dataset-fashion-mnist ...")
        ok = (
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], check=False
            ).returncode
            == 0
        )
        if not ok:
            subprocess.run(["apt-get", "update", "-q"], check=False)
            subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], check=False)
        if _complete(DEBIAN_DIR):
            _verify(DEBIAN_DIR)
            return DEBIAN_DIR
    target = data_root() / "fashion-mnist"
    target.mkdir(parents=True, exist_ok=True)
    for name in SHA256:
        if not (target / name).is_file():
            log(f"downloading {MIRROR}{name} ...")
            tmp = target / (name + ".part")
            urllib.request.urlretrieve(MIRROR + name, tmp)
            os.replace(tmp, target / name)
    _verify(target)
    return target


def read_idx(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) labels of ``train`` or ``t10k``."""
    images = np.frombuffer(
        gzip.decompress((folder / f"{prefix}-images-idx3-ubyte.gz").read_bytes()), np.uint8
    )
    labels = np.frombuffer(
        gzip.decompress((folder / f"{prefix}-labels-idx1-ubyte.gz").read_bytes()), np.uint8
    )
    return images[16:].reshape(-1, 28, 28), labels[8:].astype(np.int64)


def write_list(path: Path, ids: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))
    return path.resolve()


def ssl_lists(
    out: Path, *, labels: np.ndarray, n_pool: int, n_val: int, per_class: int, seed: int
) -> dict[str, Path]:
    """Disjoint labeled / unlabeled-pool / validation id lists over the train split.

    Ids are ``train/NNNNN`` (the Fashion-MNIST adapter's ids). Labeled: ``per_class`` per class;
    pool: the next ``n_pool`` training images; validation: the ``n_val`` after that. Drawn once
    with ``seed`` and written to files that every run reads.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    chosen: list[int] = []
    for c in range(10):
        chosen += [int(i) for i in order if labels[i] == c][:per_class]
    rest = [int(i) for i in order if int(i) not in set(chosen)]
    pool, val = rest[:n_pool], rest[n_pool : n_pool + n_val]

    def ids(ix: list[int]) -> list[str]:
        return [f"train/{i:05d}" for i in sorted(ix)]

    # The pool and validation split exclude this label count's labeled rows, so their names carry it:
    # lists of two label counts in one folder must not overwrite each other.
    return {
        "labeled": write_list(out / f"labeled_{per_class}pc_seed{seed}.txt", ids(chosen)),
        "pool": write_list(out / f"pool_{n_pool}_{per_class}pc_seed{seed}.txt", ids(pool)),
        "val": write_list(out / f"val_{n_val}_{per_class}pc_seed{seed}.txt", ids(val)),
    }


def write_shift_domains(
    out: Path, folder: Path, *, n_source: int, n_target: int, n_test: int, seed: int
) -> Path:
    """A UDA benchmark from the same real images, as a ``list_file`` dataset under ``out``.

    ``source``: original training images; ``target``: other training images, inverted and rotated
    by 90 degrees; ``target_test``: test images with the same shift. PNG files plus one list file
    (``path label``) per split.
    """
    out = out.resolve()
    if (out / "target_test.txt").is_file():
        return out
    train_x, train_y = read_idx(folder, "train")
    test_x, test_y = read_idx(folder, "t10k")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_y))
    parts = {
        "source": (train_x, train_y, order[:n_source], False),
        "target": (train_x, train_y, order[n_source : n_source + n_target], True),
        "target_test": (test_x, test_y, np.arange(n_test), True),
    }
    for split, (xs, ys, idx, shifted) in parts.items():
        lines = []
        for i in idx:
            img = xs[i]
            if shifted:
                img = np.rot90(255 - img).copy()
            rel = (
                f"{split}/{FASHION_MNIST_CLASSES[ys[i]].replace('/', '-').replace(' ', '_')}/{int(i):05d}.png"
            )
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(out / rel)
            lines.append(f"{rel} {int(ys[i])}\n")
        (out / f"{split}.txt").write_text("".join(lines))
    return out
