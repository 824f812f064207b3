"""Stage two's data path: cached teacher features, replayed views, and the batch plans that feed them.

The store holds, per split, teacher features ``(N, V, D)`` for ``V`` views of each image together with
the crop box and flip of every view. Stage two shows the student the *same* view the stored feature
came from: boxes and flips are read from the store, never re-drawn. View 0 is the evaluation view.

Reading: random rows from a compressed Zarr array cost 60-115 ms per 256-row read here, so features
are either held in RAM per split (``in_ram=True``) or read a whole unit (one chunk) at a time through a
small LRU, and in streaming mode ``stage_b_batches`` orders rows so each batch touches few units.

Processes: every object here that touches the store holds its *path* and opens it lazily in the
process that uses it, so DataLoader workers never share a store handle with their parent.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import random
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader, default_collate
from torch.utils.data import Dataset as TorchDataset

from customkd_cache.data.views import (
    DEVICE_INTERPOLATIONS,
    normalize_on_device,
    render_view,
    render_view_on_device,
    to_uint8,
)
from customkd_cache.errors import StoreError
from customkd_cache.store import dequantize, mean_std_from_sums, open_store, std_divisor

if TYPE_CHECKING:
    from customkd_cache.data import Dataset
    from customkd_cache.store import FeatureStore

# Blocks whose rows are shuffled together in streaming mode. Larger windows mix more of the dataset
# into each batch (manifests are often sorted by class) but need more decoded units held per worker.
WINDOW_BLOCKS = 4
# Enough decoded units for one labeled and one unlabeled window, plus the units a batch straddling
# two windows still needs: a smaller LRU re-decodes units inside a window.
DEFAULT_CACHE_UNITS = 2 * WINDOW_BLOCKS + 2
# float16 arrays at least this large are converted to float32 by torch (see ``_as_float32``); below it
# the call overhead outweighs numpy's slower per-value conversion (measured: a 1024-d row took 14 us
# with numpy, 9 us with torch, a 128 x 1024 batch 730 us and 43 us).
_TORCH_CONVERT_MIN = 1024
# Colour jitter strength of the optional student-only photometric augmentation (like
# torchvision's ColorJitter(0.4, 0.4, 0.4)); the teacher's stored view is never jittered.
JITTER = 0.4
# Batch entries of items decoded on the device (``ReplayDataset.collate``), used by ``to_device``.
_DEVICE_KEYS = frozenset({"jpeg", "jpeg_at", "box", "flip", "jitter"})


class _LazyStore:
    """A store path that opens the store on first use in each process.

    Under ``fork`` the child inherits the parent's object; the pid check makes it open its own handle
    instead of using one created in another process. Pickling (``spawn``) drops the handle.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._store: FeatureStore | None = None
        self._pid = -1

    def get(self) -> FeatureStore:
        if self._store is None or self._pid != os.getpid():
            self._store = open_store(self.path)
            self._pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_store": None, "_pid": -1}


@dataclass(frozen=True)
class _Block:
    """Stored features of consecutive rows from ``start`` (a unit boundary), as on disk, with the int8
    parameters of the units they span (``scale``/``offset`` ``(units, D)`` float32, None for float
    stores). Decoding happens per gathered row, so RAM holds the compact codes."""

    codes: np.ndarray  # (n, V, D) stored dtype
    start: int
    unit_rows: int
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None

    def take_one(self, row: int, view: int) -> np.ndarray:
        """``(D,)`` for one ``(row, view)``, decoded like ``take``."""
        local = row - self.start
        code = self.codes[local, view]
        if self.scale is None or self.offset is None:
            return code
        unit = local // self.unit_rows
        return dequantize(code, self.scale[unit], self.offset[unit])

    def take(self, rows: np.ndarray, views: np.ndarray | None) -> np.ndarray:
        """``(k, D)`` for ``(rows[i], views[i])``, or ``(k, V, D)`` every view when ``views`` is None:
        the stored float dtype, or float32 decoded from int8 codes."""
        local = rows - self.start
        part = self.codes[local] if views is None else self.codes[local, views]
        if self.scale is None or self.offset is None:
            return part
        units = local // self.unit_rows
        scale, offset = self.scale[units], self.offset[units]
        if views is None:
            scale, offset = scale[:, None], offset[:, None]
        return dequantize(part, scale, offset)


class FeatureSource:
    """Teacher features of one store, per split, as float32, optionally standardized.

    ``in_ram=True``: a split is read whole (``(N, V, D)`` in the stored dtype, float16 by default, or
    int8 codes with their per-unit parameters) on its first use and kept. Arrays loaded before a
    ``fork`` are shared copy-on-write with DataLoader workers; a pickled copy (``spawn``) drops them
    and reloads in the new process.
    ``in_ram=False``: features are read one unit (``store.unit_rows`` rows, one chunk) at a time,
    decoded and standardized in one vectorized step, and the last ``cache_units`` units are kept
    (LRU, float32), so rows close together cost one read. In RAM, int8 codes and float16 values are
    decoded only for the rows asked.

    ``standardize=(mean, std)``, each ``(D,)``: returned features are ``(f - mean) / std``, computed in
    float32; a dimension with ``std == 0`` is only centred (divided by 1), so no value is inf or NaN.
    """

    def __init__(
        self,
        store_path: Path,
        *,
        in_ram: bool,
        standardize: tuple[np.ndarray, np.ndarray] | None,
        cache_units: int = DEFAULT_CACHE_UNITS,
    ) -> None:
        if cache_units < 1:
            raise ValueError(f"cache_units must be >= 1, got {cache_units}")
        self.store_path = Path(store_path)
        self.in_ram = in_ram
        self.cache_units = cache_units
        self._store = _LazyStore(self.store_path)
        self._mean: np.ndarray | None = None
        self._std: np.ndarray | None = None
        if standardize is not None:
            mean, std = (np.asarray(a, np.float32).reshape(-1) for a in standardize)
            if mean.shape != std.shape:
                raise ValueError(f"standardize: mean {mean.shape} and std {std.shape} differ in shape")
            self._mean, self._std = mean, std_divisor(std)
        self._splits: dict[str, _Block] = {}
        self._units: OrderedDict[tuple[str, int], _Block] = OrderedDict()
        self._params: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_splits"], state["_units"], state["_params"] = {}, OrderedDict(), {}
        return state

    @property
    def store(self) -> FeatureStore:
        """This process's handle on the store (opened on first use)."""
        return self._store.get()

    def preload(self, splits: Sequence[str]) -> None:
        """In RAM mode, read ``splits`` now. Call it in the parent before a DataLoader starts: forked
        workers then share these arrays copy-on-write instead of each reading its own copy.
        Streaming mode has nothing to preload."""
        if self.in_ram:
            for split in splits:
                self._split_array(split)

    def get(self, split: str, row: int, view: int) -> np.ndarray:
        """The feature of ``view`` of ``row``: ``(D,)`` float32, equal to ``get_many``'s.

        The per-item path of every DataLoader item: one block lookup and a few vector operations,
        without the batch bookkeeping of ``get_many``.
        """
        block = self._split_array(split) if self.in_ram else None
        n = len(block.codes) if block is not None else self.store.num_samples(split)
        if not 0 <= row < n:
            raise IndexError(f"{self.store_path}: split '{split}' has rows 0..{n - 1}; asked for {row}")
        if block is None:  # an LRU unit holds standardized float32 already
            return self._unit(split, row // self.store.unit_rows).take_one(row, view).copy()
        return self._standardized(block.take_one(row, view))

    def get_many(self, split: str, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Features of ``(rows[i], views[i])``: ``(k, D)`` float32; rows may repeat and come in any order."""
        rows, views = np.asarray(rows, np.int64), np.asarray(views, np.int64)
        if rows.shape != views.shape or rows.ndim != 1:
            raise ValueError(f"rows {rows.shape} and views {views.shape} must be 1-d of one length")
        return self._gather(split, rows, views)

    def all_views(self, split: str, rows: np.ndarray) -> np.ndarray:
        """Every view of ``rows``: ``(k, V, D)`` float32 (for the teacher probe and stage A)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        return self._gather(split, rows, None)

    def _gather(self, split: str, rows: np.ndarray, views: np.ndarray | None) -> np.ndarray:
        """Standardized float32 features of ``rows`` (and ``views``, else all views), in the order asked."""
        # In RAM mode the loaded block answers alone, so a forked worker of a parent that preloaded
        # its splits never opens the store.
        data = self._split_array(split) if self.in_ram else None
        n = len(data.codes) if data is not None else self.store.num_samples(split)
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(
                f"{self.store_path}: split '{split}' has rows 0..{n - 1}; asked for {rows.tolist()}"
            )
        if data is not None:
            return self._standardized(data.take(rows, views))
        return self._gather_units(split, rows, views)

    def _gather_units(self, split: str, rows: np.ndarray, views: np.ndarray | None) -> np.ndarray:
        unit_rows = self.store.unit_rows
        unit_of = rows // unit_rows
        out: np.ndarray | None = None
        # One read per distinct unit, taken in order so a sorted request walks the store forwards.
        for unit in np.unique(unit_of):
            at = np.flatnonzero(unit_of == unit)
            block = self._unit(split, int(unit))
            part = block.take(rows[at], None if views is None else views[at])
            if out is None:
                out = np.empty((len(rows), *part.shape[1:]), part.dtype)
            out[at] = part
        if out is None:  # no rows asked
            tail = (
                (self.store.feature_dim,)
                if views is not None
                else (self.store.num_views, self.store.feature_dim)
            )
            return np.empty((0, *tail), np.float32)
        return out

    def _split_array(self, split: str) -> _Block:
        if split not in self._splits:
            store = self.store
            codes = store.read_codes(split, 0, store.num_samples(split))
            scale, offset = store.quant_params(split) if store.quantized else (None, None)
            self._splits[split] = _Block(codes, 0, store.unit_rows, scale, offset)
        return self._splits[split]

    def _unit(self, split: str, unit: int) -> _Block:
        key = (split, unit)
        if key in self._units:
            self._units.move_to_end(key)
            return self._units[key]
        store = self.store
        rows = store.units(split)[unit]
        decoded = store.read_codes(split, rows.start, rows.stop)
        if store.quantized:
            if split not in self._params:  # one read of every unit's parameters per split
                self._params[split] = store.quant_params(split)
            scale, offset = self._params[split]
            decoded = dequantize(decoded, scale[unit], offset[unit])
        # Decoded and standardized once per read: a block-shuffled epoch uses every row of a unit it
        # reads, and an item then costs one row copy.
        block = _Block(self._standardized(decoded), rows.start, store.unit_rows)
        self._units[key] = block
        while len(self._units) > self.cache_units:
            self._units.popitem(last=False)
        return block

    def _standardized(self, x: np.ndarray) -> np.ndarray:
        x = _as_float32(x)
        if self._mean is None or self._std is None:
            return x
        return (x - self._mean) / self._std


def _as_float32(x: np.ndarray) -> np.ndarray:
    """``x`` as float32. float16 goes through torch, whose conversion is vectorized (numpy's took
    about 5.5 ns per value here, torch's 0.3 for a batch); both are exact, so the values are equal."""
    if x.dtype == np.float16 and x.size >= _TORCH_CONVERT_MIN:
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).numpy()
    return x.astype(np.float32)


def combined_stats(store: FeatureStore, splits: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-dimension mean and (population) std over every view of every row of ``splits``.

    Sums the stores' float64 ``raw_sums`` rather than averaging per-split means, so splits of different
    sizes are weighted by their rows. Returns ``((D,), (D,))`` float32.
    """
    if not splits:
        raise ValueError("combined_stats needs at least one split")
    total = total_sq = None
    count = 0
    for split in splits:
        s, sq, n = store.raw_sums(split)
        total = np.asarray(s, np.float64) if total is None else total + s
        total_sq = np.asarray(sq, np.float64) if total_sq is None else total_sq + sq
        count += int(n)
    if count == 0 or total is None or total_sq is None:
        raise StoreError(f"{store.path}: splits {list(splits)} hold no features to compute statistics from")
    return mean_std_from_sums(total, total_sq, count)


# --- epoch plans ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One image of the store: its split, its row (= dataset index) and whether its label may be used."""

    split: str
    row: int
    labeled: bool


def draw_views(
    *, seed: int, epoch: int, rows: Sequence[Row], num_views: int, include_eval: bool = False
) -> np.ndarray:
    """One view per entry of ``rows`` for this epoch: ``(len(rows),)`` int64.

    Views are drawn uniformly from 1..V-1 (the random views), or from 0..V-1 with ``include_eval``
    (view 0, the evaluation view, among them); view 0 only when ``V == 1``. The generator is
    ``np.random.default_rng([seed, epoch, 7])`` in the calling process, so the plan does not depend
    on the number of DataLoader workers.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if num_views == 1:
        return np.zeros(len(rows), np.int64)
    low = 0 if include_eval else 1
    return np.random.default_rng([seed, epoch, 7]).integers(low, num_views, size=len(rows), dtype=np.int64)


def stage_b_batches(
    *,
    labeled: Sequence[Row],
    unlabeled: Sequence[Row],
    batch_size: int,
    labeled_share: float,
    seed: int,
    epoch: int,
    block_rows: int | None = None,
    window_blocks: int = WINDOW_BLOCKS,
) -> list[list[Row]]:
    """One epoch of stage-B batches, each labeled rows first, then unlabeled rows.

    The epoch is one pass over ``unlabeled`` (every row exactly once; the last batch may be short).
    Each batch holds ``round(batch_size * labeled_share)`` labeled rows, at least 1 when labeled rows
    exist and at most ``batch_size - 1`` when unlabeled rows exist, drawn by cycling through reshuffled
    passes over ``labeled``. Without unlabeled rows the epoch is one pass over ``labeled`` in batches
    of ``batch_size``. Deterministic from ``(seed, epoch)``.

    ``block_rows`` (streaming mode, = ``store.unit_rows``): orders are block-shuffled instead of fully
    shuffled: the order of the blocks ``(split, row // block_rows)`` is shuffled, then rows are shuffled
    within windows of ``window_blocks`` consecutive blocks, so a batch touches at most about
    ``2 * window_blocks`` units of each of its two parts.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= labeled_share <= 1.0:
        raise ValueError(f"labeled_share must be in [0, 1], got {labeled_share}")
    if (block_rows is not None and block_rows < 1) or window_blocks < 1:
        raise ValueError(f"block_rows and window_blocks must be >= 1, got {block_rows}, {window_blocks}")
    unl_rng = np.random.default_rng([seed, epoch, 11])
    lab_rng = np.random.default_rng([seed, epoch, 12])
    if not unlabeled:
        order = _epoch_order(labeled, lab_rng, block_rows, window_blocks)
        return [[labeled[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    n_lab = 0
    if labeled:
        n_lab = min(max(1, round(batch_size * labeled_share)), batch_size - 1) if batch_size > 1 else 1
    n_unl = max(1, batch_size - n_lab)
    order = _epoch_order(unlabeled, unl_rng, block_rows, window_blocks)
    unl_batches = [[unlabeled[i] for i in order[s : s + n_unl]] for s in range(0, len(order), n_unl)]
    lab_stream = _labeled_stream(labeled, n_lab * len(unl_batches), lab_rng, block_rows, window_blocks)
    return [lab_stream[b * n_lab : (b + 1) * n_lab] + unl for b, unl in enumerate(unl_batches)]


def _labeled_stream(
    labeled: Sequence[Row], count: int, rng: np.random.Generator, block_rows: int | None, window_blocks: int
) -> list[Row]:
    """``count`` labeled rows: consecutive passes over ``labeled``, each in a fresh order."""
    out: list[Row] = []
    while len(out) < count:
        out.extend(labeled[i] for i in _epoch_order(labeled, rng, block_rows, window_blocks))
    return out[:count]


def _epoch_order(
    rows: Sequence[Row], rng: np.random.Generator, block_rows: int | None, window_blocks: int
) -> np.ndarray:
    """A permutation of ``range(len(rows))``: a full shuffle, or a block shuffle when ``block_rows``."""
    if block_rows is None:
        return rng.permutation(len(rows))
    blocks: dict[tuple[str, int], list[int]] = {}
    for i, r in enumerate(rows):
        blocks.setdefault((r.split, r.row // block_rows), []).append(i)
    keys = sorted(blocks)  # a fixed key order, so the rng alone decides the block order
    shuffled = [keys[i] for i in rng.permutation(len(keys))]
    parts = []
    for w in range(0, len(shuffled), window_blocks):
        window = np.concatenate([np.asarray(blocks[k], np.int64) for k in shuffled[w : w + window_blocks]])
        parts.append(rng.permutation(window))
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def epoch_items(
    batches: Sequence[Sequence[Row]], views: np.ndarray
) -> tuple[list[tuple[Row, int]], list[list[int]]]:
    """Flatten a batch plan: items ``(row, view)`` in order, and each batch as indices into them.

    ``views`` is ``(total rows,)``, e.g. ``draw_views(rows=[r for b in batches for r in b], ...)``.
    """
    flat = [r for b in batches for r in b]
    if len(views) != len(flat):
        raise ValueError(f"{len(views)} views for {len(flat)} rows")
    items = [(r, int(v)) for r, v in zip(flat, views, strict=True)]
    index_batches, start = [], 0
    for b in batches:
        index_batches.append(list(range(start, start + len(b))))
        start += len(b)
    return items, index_batches


def eval_items(split: str, num_rows: int) -> list[tuple[Row, int]]:
    """Every row of ``split`` at view 0, the stored evaluation view, in dataset order."""
    return [(Row(split, r, False), 0) for r in range(num_rows)]


# --- replayed views ------------------------------------------------------------------------------


@dataclass
class _SplitViews:
    boxes: np.ndarray  # (N, V, 4) float32, normalized image coordinates, as stored
    flips: np.ndarray  # (N, V) bool
    labels: np.ndarray  # (N,) int64


class ReplayDataset(TorchDataset):
    """Item ``k`` of the current list of ``(Row, view)`` -> the student's rendering of that stored view.

    Each item is a dict:

    - ``"pixels"``: ``(3, s, s)`` uint8, the stored box and flip of ``view`` rendered at
      ``student_size``; with ``photometric`` a colour jitter seeded by ``(seed, epoch, split, row)``
      is applied to the student's pixels only. ``to_device`` normalizes a collated batch with the
      student's mean/std on the training device (a quarter of float32's bytes between processes).
    - ``"feature"``: ``(D,)`` float32, the cached teacher feature of the same view (when ``features``).
    - ``"teacher_pixels"``: ``(3, S, S)`` uint8, the same view rendered for an online teacher (when
      ``teacher_size``), never jittered; ``to_device`` normalizes it with the teacher's mean/std.
    - ``"label"`` int (int64 once collated): the stored label. Unlabeled rows carry theirs too, for
      evaluation and analysis only: training must use it only where ``"labeled"`` is true.
    - ``"labeled"`` bool, ``"row"`` int, ``"view"`` int, ``"split_index"`` int (into ``split_names``).

    Boxes, flips and labels are read once per split from the store, lazily in each process.

    Decoding (``reduced=True``): a JPEG is decoded at the largest DCT scale (1/2, 1/4, 1/8) at which
    the stored crop still spans twice ``student_size`` pixels each way (``Dataset.load_region``), so
    the student's pixels differ slightly from a full decode's (docs/benchmarks.md gives the largest
    difference measured); ``reduced=False`` decodes in full. With an online teacher
    (``teacher_size``) every image is decoded in full, so the teacher sees exactly stage one's pixels.

    ``decode="gpu"``: an item whose image is a JPEG file the device decodes as Pillow does
    (``Dataset.device_jpeg``) carries the file's bytes and its stored box instead of pixels, and
    ``to_device`` decodes and renders it on the training device; other images, items with an online
    teacher and interpolations other than bilinear and bicubic are rendered in the worker as above.
    """

    def __init__(
        self,
        *,
        dataset: Dataset,
        store_path: Path,
        features: FeatureSource | None,
        student_size: int,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        interpolation: str,
        teacher_size: int | None = None,
        teacher_mean: Sequence[float] | None = None,
        teacher_std: Sequence[float] | None = None,
        teacher_interpolation: str | None = None,
        photometric: bool = False,
        seed: int = 0,
        reduced: bool = True,
        decode: str = "cpu",
    ) -> None:
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode must be 'cpu' or 'gpu', got {decode!r}")
        if teacher_size is not None and (teacher_mean is None or teacher_std is None):
            raise ValueError(
                "teacher_size needs teacher_mean and teacher_std (from the teacher's preprocessing)"
            )
        self.dataset = dataset
        self.store_path = Path(store_path)
        self.features = features
        self.student_size = student_size
        self.student_mean = tuple(float(x) for x in student_mean)
        self.student_std = tuple(float(x) for x in student_std)
        self.interpolation = interpolation
        self.teacher_size = teacher_size
        self.teacher_mean = tuple(float(x) for x in teacher_mean) if teacher_mean is not None else None
        self.teacher_std = tuple(float(x) for x in teacher_std) if teacher_std is not None else None
        self.teacher_interpolation = teacher_interpolation or interpolation
        self.photometric = photometric
        self.seed = seed
        self.reduced = reduced
        self.decode = decode
        # The device path renders the student's view only; an online teacher's view is rendered by
        # Pillow from a full decode (stage one's pixels), and so is the student's beside it.
        self._on_device = decode == "gpu" and teacher_size is None and interpolation in DEVICE_INTERPOLATIONS
        self.split_names: tuple[str, ...] = tuple(s.name for s in dataset.manifest.splits)
        self._split_index = {name: i for i, name in enumerate(self.split_names)}
        self._split_sizes = {s.name: len(s.samples) for s in dataset.manifest.splits}
        self._store = _LazyStore(self.store_path)
        self._views: dict[str, _SplitViews] = {}
        self.epoch = 0
        # The item list as flat arrays: cheap to hand to workers, whatever the start method.
        self._splits = np.empty(0, np.int16)
        self._rows = np.empty(0, np.int64)
        self._view_of = np.empty(0, np.int16)
        self._labeled = np.empty(0, bool)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_views"] = {}
        return state

    def preload(self, splits: Sequence[str]) -> None:
        """Read the boxes, flips and labels of ``splits`` now, so forked workers inherit them."""
        for split in splits:
            self._split_views(split)

    def set_items(self, items: Sequence[tuple[Row, int]], epoch: int) -> None:
        """Replace the item list (e.g. one epoch's plan); ``epoch`` seeds the photometric jitter.

        Workers see a new list only when they are started after this call (``make_loader`` starts
        them per iteration).
        """
        try:
            splits = [self._split_index[r.split] for r, _ in items]
        except KeyError as e:
            raise ValueError(
                f"split {e.args[0]!r} is not in the dataset (splits: {', '.join(self.split_names)})"
            ) from None
        self._splits = np.asarray(splits, np.int16)
        self._rows = np.asarray([r.row for r, _ in items], np.int64)
        self._view_of = np.asarray([v for _, v in items], np.int16)
        self._labeled = np.asarray([r.labeled for r, _ in items], bool)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, k: int) -> dict[str, Any]:
        split_index, row, view = int(self._splits[k]), int(self._rows[k]), int(self._view_of[k])
        split = self.split_names[split_index]
        sv = self._split_views(split)
        box, flip = sv.boxes[row, view], bool(sv.flips[row, view])
        item: dict[str, Any] = {
            "label": int(sv.labels[row]),
            "labeled": bool(self._labeled[k]),
            "row": row,
            "split_index": split_index,
            "view": view,
        }
        if self.features is not None:
            item["feature"] = torch.from_numpy(self.features.get(split, row, view))
        jpeg = self.dataset.device_jpeg(split, row) if self._on_device else None
        if jpeg is not None:  # decoded, cropped and resized in ``to_device``
            item["jpeg"] = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
            item["box"], item["flip"] = torch.from_numpy(box.copy()), flip
            if self.photometric:
                item["jitter"] = torch.from_numpy(self._jitter_factors(split_index, row))
            return item
        if self.teacher_size is None:
            student = self._student_view(split, row, box, flip)
        else:  # decoded in full: the online teacher sees exactly stage one's pixels
            img = self.dataset.load_image(split, row)
            size, interp = self.teacher_size, self.teacher_interpolation
            item["teacher_pixels"] = to_uint8(render_view(img, box, flip, size=size, interpolation=interp))
            student = render_view(img, box, flip, size=self.student_size, interpolation=self.interpolation)
        if self.photometric:
            student = self._jitter(student, split_index, row)
        item["pixels"] = to_uint8(student)
        return item

    def _student_view(self, split: str, row: int, box: np.ndarray, flip: bool) -> Image.Image:
        if self.reduced:
            region = self.dataset.load_region(split, row, box=box.tolist(), min_side=self.student_size)
            img, extent = region.image, region.extent
        else:
            img, extent = self.dataset.load_image(split, row), None
        size, interp = self.student_size, self.interpolation
        return render_view(img, box, flip, size=size, interpolation=interp, extent=extent)

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Items -> one batch, as the DataLoader makes it (``make_loader`` passes this as its collate_fn).

        Items whose JPEG is decoded on the device (``decode="gpu"``) leave zeros in ``"pixels"`` at
        ``"jpeg_at"`` and bring ``"jpeg"`` (a list of their files' bytes), ``"box"`` ``(n, 4)``,
        ``"flip"`` ``(n,)`` and, with ``photometric``, ``"jitter"`` ``(n, 3)``, which ``to_device`` uses.
        """
        at = [i for i, item in enumerate(items) if "jpeg" in item]
        if not at:
            batch: dict[str, Any] = default_collate(list(items))
            return batch
        keys = [k for k in items[at[0]] if k not in _DEVICE_KEYS]  # the items' common entries
        batch = {k: default_collate([item[k] for item in items]) for k in keys}
        pixels = torch.zeros((len(items), 3, self.student_size, self.student_size), dtype=torch.uint8)
        for i, item in enumerate(items):
            if "pixels" in item:
                pixels[i] = item["pixels"]
        batch["pixels"] = pixels
        batch["jpeg"] = [items[i]["jpeg"] for i in at]
        batch["jpeg_at"] = torch.tensor(at, dtype=torch.int64)
        batch["box"] = torch.stack([items[i]["box"] for i in at])
        batch["flip"] = torch.tensor([items[i]["flip"] for i in at], dtype=torch.bool)
        if self.photometric:
            batch["jitter"] = torch.stack([items[i]["jitter"] for i in at])
        return batch

    def to_device(
        self, batch: dict[str, Any], device: torch.device | str, *, non_blocking: bool = False
    ) -> dict[str, torch.Tensor]:
        """A collated batch of items on ``device``, its uint8 pixels normalized there to float32:
        ``"pixels"`` with the student's mean/std, ``"teacher_pixels"`` with the teacher's.

        Items whose JPEG came as bytes (``decode="gpu"``) are decoded here in one batched call
        (``torchvision.io.decode_jpeg``: nvjpeg on CUDA), their stored boxes cropped and resized, their
        flips and colour jitter applied, on ``device``. A file the device decoder refuses is decoded by
        Pillow instead, so a broken file fails with the one-line error naming it.
        """
        device = torch.device(device)
        out = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items() if k not in _DEVICE_KEYS}
        if "jpeg" in batch:
            out["pixels"][batch["jpeg_at"].to(device)] = self._device_views(batch, device)
        out["pixels"] = normalize_on_device(out["pixels"], self.student_mean, self.student_std)
        if "teacher_pixels" in out:
            assert self.teacher_mean is not None and self.teacher_std is not None  # checked in __init__
            mean, std = self.teacher_mean, self.teacher_std
            out["teacher_pixels"] = normalize_on_device(out["teacher_pixels"], mean, std)
        return out

    def _device_views(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        """``(n, 3, s, s) uint8`` on ``device``: the student views of a batch's JPEG items."""
        images = decode_jpegs(batch["jpeg"], device)
        size, interp = self.student_size, self.interpolation
        views = []
        for j, img in enumerate(images):
            box, flip = batch["box"][j].tolist(), bool(batch["flip"][j])
            if img is None:
                i = int(batch["jpeg_at"][j])
                split = self.split_names[int(batch["split_index"][i])]
                row = int(batch["row"][i])
                view = self._student_view(split, row, np.asarray(box, np.float32), flip)
                views.append(to_uint8(view).to(device))
            else:
                views.append(render_view_on_device(img, box, flip, size=size, interpolation=interp))
        pixels = torch.stack(views)
        if "jitter" in batch:
            pixels = jitter_on_device(pixels, batch["jitter"].to(device))
        return pixels

    def _split_views(self, split: str) -> _SplitViews:
        if split not in self._views:
            store = self._store.get()
            boxes, flips = store.read_boxes(split)
            if len(boxes) != self._split_sizes[split]:
                raise StoreError(
                    f"{self.store_path}: split '{split}' has {len(boxes)} rows but the dataset has "
                    f"{self._split_sizes[split]}; use the store made from this dataset spec"
                )
            labels = np.asarray(store.labels(split), np.int64)
            self._views[split] = _SplitViews(np.asarray(boxes, np.float32), np.asarray(flips, bool), labels)
        return self._views[split]

    def _jitter_factors(self, split_index: int, row: int) -> np.ndarray:
        """``(3,) float64``: the brightness, contrast and saturation factors of this epoch's jitter."""
        rng = np.random.default_rng([self.seed, self.epoch, split_index, row, 13])
        return rng.uniform(1.0 - JITTER, 1.0 + JITTER, size=3)

    def _jitter(self, img: Image.Image, split_index: int, row: int) -> Image.Image:
        """Brightness, contrast and saturation each scaled by a factor in [1 - JITTER, 1 + JITTER]."""
        factors = self._jitter_factors(split_index, row)
        for enhance, f in zip(
            (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors, strict=True
        ):
            img = enhance(img).enhance(float(f))
        return img


def decode_jpegs(data: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG files' bytes (1-d uint8 CPU tensors) -> ``(3, H, W) uint8`` RGB images on ``device``, in one
    ``torchvision.io.decode_jpeg`` call (batched nvjpeg on CUDA, libjpeg on the CPU). When the batch
    fails, each file is decoded alone and the ones that still fail are None."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image decoders in favour of torchcodec; the call is unchanged
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def jitter_on_device(pixels: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``ReplayDataset._jitter`` (Pillow's ImageEnhance Brightness, Contrast, Color) on ``(n, 3, H, W)
    uint8`` images, each with its own ``(3,)`` row of ``factors``, on their device.

    Pillow's arithmetic: each step blends with a degenerate image in float32 and truncates to uint8
    (``Image.blend``); grey is ITU-R 601 luma in 16-bit fixed point, rounded (``convert("L")``); the
    contrast's mean grey is the rounded mean of that luma.
    """
    f = factors.to(torch.float32)
    x = pixels.to(torch.float32)

    def blend(degenerate: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return (degenerate + alpha.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 255).floor_()

    def luma(x: torch.Tensor) -> torch.Tensor:
        w = torch.tensor([19595, 38470, 7471], dtype=torch.int64, device=x.device).view(1, 3, 1, 1)
        return ((x.to(torch.int64) * w).sum(1, keepdim=True) + 0x8000).div(65536, rounding_mode="floor")

    x = blend(torch.zeros_like(x), x, f[:, 0])
    mean = luma(x).to(torch.float64).mean(dim=(1, 2, 3)).add(0.5).floor().to(torch.float32)
    x = blend(mean.view(-1, 1, 1, 1).expand_as(x), x, f[:, 1])
    x = blend(luma(x).to(torch.float32).expand_as(x), x, f[:, 2])
    return x.to(torch.uint8)


# --- loading -------------------------------------------------------------------------------------


def _seed_worker(worker_id: int, *, seed: int) -> None:
    """Seed Python, numpy and torch in a worker from ``(seed, epoch, worker_id)``.

    Items are deterministic by construction (their randomness is seeded per item); this keeps any
    library randomness inside a worker reproducible too.
    """
    info = torch.utils.data.get_worker_info()
    epoch = int(getattr(info.dataset, "epoch", 0)) if info is not None else 0
    state = np.random.SeedSequence([seed, epoch, worker_id]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[0]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def make_loader(
    ds: ReplayDataset,
    *,
    batch_size: int | None,
    batches: list[list[int]] | None,
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``ds``: either the given ``batches`` (lists of item indices, in order) or
    consecutive batches of ``batch_size`` items (evaluation). Items come back in plan order whatever
    ``num_workers`` is, and their values do not depend on it.

    Workers are started per iteration (not persistent) so they see the items set for that epoch.
    """
    if (batch_size is None) == (batches is None):
        raise ValueError("give exactly one of batch_size (sequential batches) and batches (a batch plan)")
    worker_args: dict[str, Any] = {}
    if num_workers > 0:
        worker_args = {
            "worker_init_fn": functools.partial(_seed_worker, seed=seed),
            "multiprocessing_context": _start_method(),
            "persistent_workers": False,
        }
    generator = torch.Generator().manual_seed(seed)
    if batches is not None:
        return DataLoader(
            ds,
            batch_sampler=batches,
            num_workers=num_workers,
            collate_fn=ds.collate,
            generator=generator,
            pin_memory=pin_memory,
            **worker_args,
        )
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=ds.collate,
        generator=generator,
        pin_memory=pin_memory,
        **worker_args,
    )


def _start_method() -> str:
    """``"fork"`` where the platform has it, else ``"spawn"``.

    Measured here (2 cores; the parent had run 2-thread torch ops and zarr reads first): with fork
    two workers deliver the first batch in about 0.5 s, with spawn or forkserver in 6-7.5 s, since
    each worker imports torch again; workers restart every epoch (``set_items``), so that cost would
    recur. Fork is safe for this data path: zarr 3.1 resets its IO loop in a forked child
    (``os.register_at_fork``), stores are opened per process (pid check), workers run torch on one
    thread and never touch the parent's OpenMP pool or CUDA, and splits the parent preloaded are
    shared copy-on-write instead of copied into every worker. Python 3.14 defaults to forkserver on
    Linux, hence the explicit choice.
    """
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
