"""Array layouts: CIFAR-10/100 python pickles and Fashion-MNIST idx files, read without running code."""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from customkd_cache.data.layouts.base import Listing, select_splits
from customkd_cache.data.manifest import Sample, SplitManifest
from customkd_cache.data.registry import layout
from customkd_cache.errors import DatasetError
from customkd_cache.specs import DatasetSpec

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


class ArrayReader:
    """Images are rows of uint8 arrays: CIFAR pickles ``(N, 3, 32, 32)`` or idx files ``(N, H, W)``.

    ``fmt`` is ``"cifar10"``, ``"cifar100"`` or ``"idx"``; ``files[split]`` are the files of a split
    (CIFAR-10's training batches are concatenated in order).
    """

    def __init__(self, fmt: str, files: dict[str, tuple[Path, ...]], arrays: dict[str, np.ndarray]) -> None:
        self.fmt = fmt
        self.files = files
        self._arrays = dict(arrays)

    def __getstate__(self) -> dict[str, Any]:
        # Workers read the arrays themselves: shipping 150 MB through a pipe is slower than reading.
        return {**self.__dict__, "_arrays": {}}

    def rows(self, split: str) -> np.ndarray:
        if split not in self._arrays:
            if self.fmt == "idx":
                self._arrays[split] = _read_idx_images(self.files[split][0])
            else:
                self._arrays[split] = _read_cifar_split(self.files[split], _CIFAR_LABEL_KEYS[self.fmt])[0]
        return self._arrays[split]

    def load(self, root: Path, split: str, sample: Sample) -> Image.Image:
        row = self.rows(split)[_row_index(sample.id)]
        if row.ndim == 3:  # CIFAR rows are channel-major
            return Image.fromarray(np.ascontiguousarray(row.transpose(1, 2, 0)))
        return Image.fromarray(row).convert("RGB")

    def size(self, root: Path, split: str, sample: Sample) -> tuple[int, int]:
        shape = self.rows(split).shape
        return (shape[-1], shape[-2])


def _row_index(sample_id: str) -> int:
    return int(sample_id.rsplit("/", 1)[1])


class _NdarrayType:
    """Stands for ``numpy.ndarray`` inside a pickle: the subtype argument of ``_reconstruct``, never
    callable, so a pickle cannot call ``ndarray(shape)`` to allocate an array of any size."""


_REAL_RECONSTRUCT: Any = np.ndarray((0,)).__reduce__()[0]  # numpy's own, whatever module holds it
_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Loads CIFAR's pickles, refusing every global except what numpy arrays need (no code runs).

    Arrays are bounded before they are allocated: ``_reconstruct`` may not ask for more elements than
    the file has bytes (the array's data comes from the file), and ``ndarray`` itself is not callable.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        *_RECONSTRUCT,
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol 2
    }

    def __init__(self, f: Any, *, max_elements: int) -> None:
        super().__init__(f, encoding="bytes")
        self.max_elements = max_elements

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if (module, name) == ("numpy", "ndarray"):
            return _NdarrayType
        if (module, name) in _RECONSTRUCT:
            return self._reconstruct
        return super().find_class(module, name)

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not _NdarrayType:
            raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
        dims = shape if isinstance(shape, tuple) else (shape,)
        if not all(type(d) is int and d >= 0 for d in dims) or not isinstance(dtype, bytes | str):
            raise pickle.UnpicklingError(f"_reconstruct with a bad shape or dtype {shape!r:.60}")
        if math.prod(dims) > self.max_elements:
            raise pickle.UnpicklingError(
                f"an array of shape {dims!r:.60} is larger than the {self.max_elements}-byte file"
            )
        return _REAL_RECONSTRUCT(np.ndarray, dims, dtype)  # type: ignore[no-any-return]


def _unpickle(path: Path) -> dict[Any, Any]:
    if not path.is_file():
        raise DatasetError(f"CIFAR file not found: {path} (expected layout: ROOT/{path.parent.name}/...)")
    try:
        with path.open("rb") as f:
            data = _NumpyOnlyUnpickler(f, max_elements=os.fstat(f.fileno()).st_size).load()
    except (
        OSError,
        EOFError,
        ValueError,
        TypeError,
        MemoryError,
        RecursionError,
        pickle.UnpicklingError,
        AttributeError,
        ImportError,
    ) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise DatasetError(
            f"{path}: not a CIFAR python pickle ({reason}); re-download the python version"
        ) from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(data).__name__}; re-download it")
    return data


def _field(data: dict[Any, Any], key: str, path: Path) -> Any:
    # The official files were written by Python 2: keys are bytes when loaded with encoding="bytes".
    for k in (key.encode(), key):
        if k in data:
            return data[k]
    found = sorted(repr(k)[:40] for k in data if isinstance(k, str | bytes))[:10]
    raise DatasetError(f"{path}: no '{key}' entry (found {found}); re-download the dataset")


def _labels(raw: Any, path: Path, key: str) -> np.ndarray:
    """``(N,)`` int64 labels from a list of ints or a 1-D integer array; checked before converting, so
    a nested list (which a few hundred pickle bytes can make huge) is refused, not expanded."""
    if isinstance(raw, np.ndarray) and raw.ndim == 1 and raw.dtype.kind in "iu":
        return raw.astype(np.int64)
    if isinstance(raw, list) and all(type(v) is int for v in raw):
        return np.asarray(raw, dtype=np.int64)
    raise DatasetError(f"{path}: '{key}' is not a list of integer labels; re-download the dataset")


_CIFAR_LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}


def _read_cifar_split(files: tuple[Path, ...], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 3, 32, 32)`` uint8 images and ``(N,)`` int64 labels of the batch files, concatenated."""
    images, labels = [], []
    for path in files:
        data = _unpickle(path)
        x = _field(data, "data", path)
        if not isinstance(x, np.ndarray):
            raise DatasetError(
                f"{path}: 'data' is a {type(x).__name__}, not an array; re-download the dataset"
            )
        y = _labels(_field(data, label_key, path), path, label_key)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
            raise DatasetError(
                f"{path}: expected 'data' uint8 (N, 3072) and N labels, got {x.dtype} {x.shape} and "
                f"{len(y)} labels; re-download the dataset"
            )
        images.append(x.reshape(-1, 3, 32, 32))
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def _names(path: Path, key: str) -> tuple[str, ...]:
    raw = _field(_unpickle(path), key, path)
    if not isinstance(raw, list | tuple) or not all(isinstance(n, str | bytes) for n in raw):
        raise DatasetError(f"{path}: '{key}' is not a list of class names; re-download the dataset")
    try:
        return tuple(n.decode("utf-8") if isinstance(n, bytes) else n for n in raw)
    except UnicodeDecodeError:
        raise DatasetError(
            f"{path}: '{key}' holds a name that is not UTF-8; re-download the dataset"
        ) from None


def list_cifar(spec: DatasetSpec, root: Path) -> Listing:
    if spec.kind == "cifar100":
        folder = root / "cifar-100-python"
        files: dict[str, tuple[Path, ...]] = {"train": (folder / "train",), "test": (folder / "test",)}
        classes = _names(folder / "meta", "fine_label_names")
    else:
        folder = root / "cifar-10-batches-py"
        files = {"train": tuple(folder / b for b in CIFAR10_TRAIN_BATCHES), "test": (folder / "test_batch",)}
        classes = _names(folder / "batches.meta", "label_names")
    selected = select_splits(spec, root, ("train", "test"), ("train", "test"))
    arrays: dict[str, np.ndarray] = {}
    splits: list[SplitManifest] = []
    for name in selected:
        arrays[name], labels = _read_cifar_split(files[name], _CIFAR_LABEL_KEYS[spec.kind])
        bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
        if len(bad):
            raise DatasetError(
                f"{files[name][0]}: label {labels[bad[0]]} at row {bad[0]} is outside 0..{len(classes) - 1}; "
                "re-download the dataset"
            )
        splits.append(_array_split(name, labels, 3072))
    return Listing(classes, splits, ArrayReader(spec.kind, {n: files[n] for n in selected}, arrays))


def _array_split(name: str, labels: np.ndarray, row_bytes: int) -> SplitManifest:
    return SplitManifest(
        name, tuple(Sample(f"{name}/{i:05d}", int(y), row_bytes) for i, y in enumerate(labels))
    )


def _idx_file(root: Path, stem: str) -> Path:
    """The plain idx file if present (faster to read), else the gzipped one."""
    plain = root / stem
    return plain if plain.is_file() else root / f"{stem}.gz"


def _open_idx(path: Path) -> io.BufferedIOBase:
    if not path.is_file():
        raise DatasetError(
            f"Fashion-MNIST file not found: {path} (with or without .gz; "
            f"expected layout: {layout('fashion_mnist')})"
        )
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _read_idx_header(f: io.BufferedIOBase, path: Path, magic: int, dims: int) -> tuple[int, ...]:
    head = f.read(4 + 4 * dims)
    if len(head) < 4 + 4 * dims:
        raise DatasetError(f"{path}: file too short for an idx header; re-download it")
    found, *shape = struct.unpack(f">{1 + dims}I", head)
    if found != magic:
        raise DatasetError(f"{path}: idx magic number {found:#010x}, expected {magic:#010x}; re-download it")
    return tuple(shape)


def _idx_images_shape(path: Path) -> tuple[int, ...]:
    """``(N, H, W)`` from the header of an idx3 image file."""
    try:
        with _open_idx(path) as f:
            return _read_idx_header(f, path, 0x00000803, 3)
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read idx file ({e}); re-download it") from e


def _read_idx_images(path: Path) -> np.ndarray:
    """``(N, H, W)`` uint8 images of an idx3 file."""
    try:
        with _open_idx(path) as f:
            n, h, w = _read_idx_header(f, path, 0x00000803, 3)
            body = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read idx file ({e}); re-download it") from e
    if len(body) != n * h * w:
        raise DatasetError(
            f"{path}: {len(body)} image bytes, expected {n} x {h} x {w} = {n * h * w}; re-download it"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(n, h, w)


def _read_idx_labels(path: Path) -> np.ndarray:
    try:
        with _open_idx(path) as f:
            (n,) = _read_idx_header(f, path, 0x00000801, 1)
            body = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read idx file ({e}); re-download it") from e
    if len(body) != n:
        raise DatasetError(f"{path}: {len(body)} labels, but the header says {n}; re-download it")
    return np.frombuffer(body, dtype=np.uint8).astype(np.int64)


def list_fashion_mnist(spec: DatasetSpec, root: Path) -> Listing:
    selected = select_splits(spec, root, ("train", "test"), ("train", "test"))
    splits: list[SplitManifest] = []
    files: dict[str, tuple[Path, ...]] = {}
    for name in selected:
        image_path, label_path = (_idx_file(root, stem) for stem in FASHION_MNIST_FILES[name])
        n, h, w = _idx_images_shape(image_path)
        labels = _read_idx_labels(label_path)
        if len(labels) != n:
            raise DatasetError(
                f"{label_path}: {len(labels)} labels for {n} images in {image_path}; re-download both"
            )
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise DatasetError(f"{label_path}: label {labels.max()} is outside 0..9; re-download it")
        # Only uncompressed files can be size-checked without reading them; gzipped ones are checked on load.
        if image_path.suffix != ".gz" and image_path.stat().st_size != 16 + n * h * w:
            raise DatasetError(
                f"{image_path}: {image_path.stat().st_size} bytes, expected {16 + n * h * w}; re-download it"
            )
        files[name] = (image_path,)
        splits.append(_array_split(name, labels, h * w))
    return Listing(FASHION_MNIST_CLASSES, splits, ArrayReader("idx", files, {}))
