"""Opening a dataset: ``open_dataset(spec)`` -> a ``Dataset`` (manifest + image access).

``open_dataset`` finds the kind's adapter in the registry, lists the dataset in its real layout
without opening any image, then applies ``dataset.skip_list`` and ``dataset.max_per_split``, and sets
the content digest of every sample kept (``customkd_cache.data.digests``: files whose ``stat`` is
unchanged since this user last read them are not read again).
A corrupt image is never dropped silently: it fails when loaded, naming the file; ``check_images``
finds them all up front, and ``dataset.skip_list`` leaves them out in a way that enters the
manifest digest.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from customkd_cache.data.decode import Region
from customkd_cache.data.digests import CACHE_DIR, file_digests, row_digests
from customkd_cache.data.labels import read_id_lines, shown_ids
from customkd_cache.data.layouts.arrays import ArrayReader, _row_index
from customkd_cache.data.layouts.base import FileReader, Reader
from customkd_cache.data.manifest import Manifest, Sample, SplitManifest
from customkd_cache.data.registry import kind_info
from customkd_cache.errors import DatasetError
from customkd_cache.specs import DatasetSpec, cache_root, data_path


class Dataset:
    """A listed dataset: ``manifest`` plus image access by (split, index into the split).

    Picklable, for DataLoader workers: array files (CIFAR, Fashion-MNIST) are read lazily and once
    per process, and are not part of the pickled state.
    """

    def __init__(self, manifest: Manifest, root: Path, reader: Reader) -> None:
        self.manifest = manifest
        self.root = root
        self._reader = reader

    def __repr__(self) -> str:
        counts = ", ".join(f"{s.name}={len(s)}" for s in self.manifest.splits)
        return f"Dataset({self.manifest.kind}, {self.root}, {counts})"

    def sample(self, split: str, index: int) -> Sample:
        return self.manifest.split(split).samples[index]

    def load_image(self, split: str, index: int) -> Image.Image:
        """The RGB image of sample ``index`` of ``split``, EXIF orientation applied.

        Raises ``DatasetError`` naming the file when it is missing or cannot be decoded.
        """
        return self._reader.load(self.root, split, self.sample(split, index))

    def load_region(self, split: str, index: int, *, box: Sequence[float], min_side: int) -> Region:
        """Sample ``index`` of ``split`` decoded for the crop ``box`` (normalized), to be resized to
        ``min_side`` pixels: image files at a reduced scale where that crop allows (see
        ``decode_region``), other images in full. Errors are ``load_image``'s."""
        load_region = getattr(self._reader, "load_region", None)
        if load_region is not None:
            region: Region = load_region(
                self.root, split, self.sample(split, index), box=box, min_side=min_side
            )
            return region
        img = self.load_image(split, index)
        return Region(img, (float(img.width), float(img.height)), 1)

    def device_jpeg(self, split: str, index: int) -> bytes | None:
        """The JPEG file of sample ``index`` of ``split`` as bytes, when a decoder on the training
        device gives the image ``load_image`` gives (see ``decode.device_jpeg``); else None."""
        read = getattr(self._reader, "device_jpeg", None)
        if read is None:
            return None
        data: bytes | None = read(self.root, split, self.sample(split, index))
        return data

    def image_size(self, split: str, index: int) -> tuple[int, int]:
        """``(width, height)`` as ``load_image`` would return it; reads only the header of files."""
        return self._reader.size(self.root, split, self.sample(split, index))


def open_dataset(spec: DatasetSpec) -> Dataset:
    """List the dataset ``spec`` describes and return it, ready to load images.

    Validates the layout (class folders, list files, array headers) without decoding any image.
    Applies ``spec.splits`` (dataset order, not the spec's), ``spec.skip_list`` (ids left out,
    recorded in ``Manifest.skipped``) and then ``spec.max_per_split`` (first N of each split).

    Raises ``DatasetError`` (one line naming the path, what was expected and the fix) for a missing
    root, a wrong layout, an unknown split, a missing listed file or a bad skip list.
    """
    kind = kind_info(spec.kind)
    root = spec.resolved_root()
    if not root.is_dir():
        raise DatasetError(
            f"dataset root not found: {root} (set dataset.root or CUSTOMKD_DATA_ROOT; "
            f"expected layout: {kind.layout})"
        )
    root = root.absolute()
    listing = kind.lister()(spec, root)
    splits, skipped = _apply_skip_list(listing.splits, spec)
    if spec.max_per_split:
        limits = spec.max_per_split
        splits = [
            SplitManifest(
                s.name, s.samples[: _limit(limits, s.name)] if _limit(limits, s.name) else s.samples
            )
            for s in splits
        ]
    splits, changed = _content_digests(splits, root, listing.reader)
    if changed:
        print(
            f"{root}: {len(changed)} image(s) hold other bytes than when last read here, under the same "
            f"name (first: {changed[0]}); caches of the earlier bytes no longer match and are not used",
            file=sys.stderr,
            flush=True,
        )
    manifest = Manifest(spec.kind, listing.classes, tuple(splits), skipped, changed)
    reader = FileReader(spec.max_pixels) if isinstance(listing.reader, FileReader) else listing.reader
    return Dataset(manifest, root, reader)


def check_images(ds: Dataset) -> list[str]:
    """Decode every image of every split; the ids that fail, in manifest order, each once."""
    bad: dict[str, None] = {}
    for split in ds.manifest.splits:
        for i, sample in enumerate(split.samples):
            try:
                ds.load_image(split.name, i)
            except DatasetError:
                bad[sample.id] = None
    return list(bad)


def _content_digests(
    splits: list[SplitManifest], root: Path, reader: Reader
) -> tuple[list[SplitManifest], tuple[str, ...]]:
    """The splits with every sample's content digest, and the ids whose bytes changed since this
    user's digest cache last recorded them."""
    if isinstance(reader, ArrayReader):
        return [row_digests(s, reader.rows(s.name), _row_index) for s in splits], ()
    done = [file_digests(root, s, cache_dir=cache_root() / CACHE_DIR) for s in splits]
    return [d.split for d in done], tuple(x for d in done for x in d.changed)


def _apply_skip_list(
    splits: list[SplitManifest], spec: DatasetSpec
) -> tuple[list[SplitManifest], tuple[str, ...]]:
    if not spec.skip_list:
        return splits, ()
    path = data_path(spec.skip_list)
    skip = set(read_id_lines(path, "dataset.skip_list"))
    known = {s.id for split in splits for s in split.samples}
    unknown = sorted(skip - known)
    if unknown:
        example = next((s.samples[0].id for s in splits if s.samples), "")
        shown = shown_ids(unknown, [x for s in splits for x in s.samples])
        raise DatasetError(
            f"{path}: {len(unknown)} id(s) in dataset.skip_list are not in splits "
            f"{', '.join(s.name for s in splits)} {shown}; "
            f"ids look like '{example}': fix or remove those lines"
        )
    kept = [SplitManifest(s.name, tuple(x for x in s.samples if x.id not in skip)) for s in splits]
    return kept, tuple(sorted(skip))


def _limit(limits: int | dict[str, int], split: str) -> int:
    """``max_per_split`` for one split: one number for all, or a table by split name (0 = all)."""
    return limits if isinstance(limits, int) else limits.get(split, 0)
