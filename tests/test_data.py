"""Dataset adapters by contract: manifests, each real layout, decoding, labeled lists, bad input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from customkd_cache.data import (
    OFFICEHOME_CLASSES,
    OFFICEHOME_DOMAINS,
    Manifest,
    check_images,
    decode_image,
    labeled_indices,
    open_dataset,
    read_labeled_list,
    write_labeled_list,
)
from customkd_cache.data.registry import KIND_NAMES
from customkd_cache.errors import DatasetError
from customkd_cache.specs import DatasetSpec
from customkd_cache.testing import fakedata

KINDS: tuple[str, ...] = KIND_NAMES
Sizes = dict[str, tuple[int, dict[str, int]]]
REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _relocated(spec: DatasetSpec, dest: Path) -> DatasetSpec:
    """The same dataset copied to ``dest`` (list files travel inside the root)."""
    old = Path(spec.root)
    shutil.copytree(old, dest)
    lists = tuple(str(dest / Path(p).relative_to(old)) for p in spec.lists)
    return spec.model_copy(update={"root": str(dest), "lists": lists})


def _one_line_error(excinfo: pytest.ExceptionInfo[DatasetError], *parts: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# --- every kind --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
class TestManifestContract:
    def test_counts_classes_and_labels(
        self, kind: str, fake_specs: dict[str, DatasetSpec], fake_sizes: Sizes
    ) -> None:
        m = open_dataset(fake_specs[kind]).manifest
        num_classes, counts = fake_sizes[kind]
        assert m.kind == kind
        assert len(m.classes) == num_classes
        assert {s.name: len(s) for s in m.splits} == counts
        assert m.split_names() == tuple(counts)
        for split in m.splits:
            ids = split.ids()
            assert len(set(ids)) == len(ids)
            labels = split.labels()
            assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < len(m.classes)
            assert all(s.size > 0 for s in split.samples)
        assert m.skipped == ()

    def test_digest_stable_and_independent_of_location(
        self, kind: str, fake_specs: dict[str, DatasetSpec], tmp_path: Path
    ) -> None:
        spec = fake_specs[kind]
        first = open_dataset(spec).manifest
        assert open_dataset(spec).manifest.digest() == first.digest()
        moved = open_dataset(_relocated(spec, tmp_path / "elsewhere" / "copy")).manifest
        assert moved == first
        assert moved.digest() == first.digest()

    def test_digest_is_sha256_of_canonical_json(self, kind: str, fake_specs: dict[str, DatasetSpec]) -> None:
        m = open_dataset(fake_specs[kind]).manifest
        text = json.dumps(m.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert m.digest() == hashlib.sha256(text.encode("utf-8")).hexdigest()
        assert Manifest.from_json(json.loads(text)) == m

    def test_images_are_rgb_and_sized(self, kind: str, fake_specs: dict[str, DatasetSpec]) -> None:
        ds = open_dataset(fake_specs[kind])
        for split in ds.manifest.splits:
            for index in (0, len(split) - 1):
                img = ds.load_image(split.name, index)
                assert img.mode == "RGB"
                assert img.size == ds.image_size(split.name, index)

    def test_pickled_dataset_loads_the_same_pixels(
        self, kind: str, fake_specs: dict[str, DatasetSpec]
    ) -> None:
        ds = open_dataset(fake_specs[kind])
        split = ds.manifest.splits[-1].name
        clone = pickle.loads(pickle.dumps(ds))
        assert clone.manifest == ds.manifest
        assert clone.load_image(split, 1).tobytes() == ds.load_image(split, 1).tobytes()

    def test_select_splits_and_limit(self, kind: str, fake_specs: dict[str, DatasetSpec]) -> None:
        spec = fake_specs[kind]
        full = open_dataset(spec).manifest
        last = full.split_names()[-1]
        limited = open_dataset(spec.model_copy(update={"splits": (last,), "max_per_split": 2})).manifest
        assert limited.split_names() == (last,)
        assert limited.split(last).samples == full.split(last).samples[:2]
        assert limited.classes == full.classes
        assert limited.digest() != full.digest()

    def test_unknown_split_names_valid_ones(
        self, kind: str, fake_specs: dict[str, DatasetSpec], fake_sizes: Sizes
    ) -> None:
        spec = fake_specs[kind].model_copy(update={"splits": ("nope",)})
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(spec)
        _one_line_error(excinfo, "'nope'", *fake_sizes[kind][1])

    def test_manifest_split_lookup_suggests_closest(
        self, kind: str, fake_specs: dict[str, DatasetSpec]
    ) -> None:
        m = open_dataset(fake_specs[kind]).manifest
        name = m.split_names()[0]
        with pytest.raises(DatasetError) as excinfo:
            m.split(name + "x")
        _one_line_error(excinfo, f"did you mean '{name}'", "valid splits")


class TestDigest:
    def _write(self, root: Path, order: list[tuple[str, int]]) -> DatasetSpec:
        # The manifest never opens images, so fixed byte contents give a digest independent of encoders.
        for rel, size in order:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"x" * size)
        return DatasetSpec(kind="image_folder", root=str(root))

    FILES = [
        ("b/z.jpg", 3),
        ("a/y.png", 5),
        ("a/x.JPG", 1),
        ("Z/ü 1.webp", 2),
        ("a/.hidden.jpg", 4),
        ("a/n.txt", 6),
    ]

    def test_golden_digest(self, tmp_path: Path) -> None:
        m = open_dataset(self._write(tmp_path / "d", self.FILES)).manifest
        # Code-point order: "Z" sorts before "a" whatever the locale; hidden and non-image files are left out.
        assert m.classes == ("Z", "a", "b")
        assert m.split("all").ids() == ("Z/ü 1.webp", "a/x.JPG", "a/y.png", "b/z.jpg")
        assert [s.size for s in m.split("all").samples] == [2, 1, 5, 3]
        sha = [hashlib.sha256(b"x" * s.size).hexdigest() for s in m.split("all").samples]
        assert [s.digest for s in m.split("all").samples] == sha
        assert m.digest() == "f55bfe7ab114b7aae983df15d093a2d6b39b654d13f5d9a5659d580a9fa6b2ab"

    def test_independent_of_creation_order(self, tmp_path: Path) -> None:
        one = open_dataset(self._write(tmp_path / "one", self.FILES)).manifest
        two = open_dataset(self._write(tmp_path / "two", self.FILES[::-1])).manifest
        assert one.digest() == two.digest()

    def test_changes_with_content_of_the_same_size(self, tmp_path: Path) -> None:
        spec = self._write(tmp_path / "one", self.FILES)
        base = open_dataset(spec).manifest.digest()
        (tmp_path / "one" / "a" / "y.png").write_bytes(b"y" * 5)
        assert open_dataset(spec).manifest.digest() != base

    def test_changes_with_content(self, tmp_path: Path) -> None:
        base = open_dataset(self._write(tmp_path / "one", self.FILES)).manifest.digest()
        grown = [*self.FILES[:-1], ("a/y.png", 6)]
        assert open_dataset(self._write(tmp_path / "two", grown)).manifest.digest() != base


# --- real layouts ------------------------------------------------------------------------------


class TestOfficeHome:
    def test_layout(self, officehome_root: Path) -> None:
        m = open_dataset(DatasetSpec(kind="officehome", root=str(officehome_root))).manifest
        assert m.split_names() == OFFICEHOME_DOMAINS
        assert m.classes == OFFICEHOME_CLASSES and len(m.classes) == 65
        assert m.classes.index("TV") < m.classes.index("Table")
        first = m.split("Art").samples[0]
        assert (first.id, first.label) == ("Art/Alarm_Clock/00001.jpg", 0)
        assert [s.label for s in m.split("Clipart").samples] == list(range(65))

    def test_wrong_class_count_names_domain(self, tmp_path: Path) -> None:
        root = fakedata.write_officehome(tmp_path / "oh", domains=("Art",), classes=OFFICEHOME_CLASSES[:64])
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="officehome", root=str(root)))
        _one_line_error(excinfo, str(root / "Art"), "found 64", "expected 65")

    def test_misnamed_class_folder(self, tmp_path: Path) -> None:
        classes = ["Alarm_clock", *OFFICEHOME_CLASSES[1:]]
        root = fakedata.write_officehome(tmp_path / "oh", domains=("Art",), classes=classes)
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="officehome", root=str(root)))
        _one_line_error(excinfo, "Alarm_clock", "did you mean 'Alarm_Clock'")

    def test_present_domains_and_missing_selected_domain(self, tmp_path: Path) -> None:
        root = fakedata.write_officehome(tmp_path / "oh", domains=("Product",))
        spec = DatasetSpec(kind="officehome", root=str(root))
        assert open_dataset(spec).manifest.split_names() == ("Product",)
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(spec.model_copy(update={"splits": ("Product", "Clipart")}))
        _one_line_error(excinfo, str(root / "Clipart"), "Product")

    def test_real_world_with_a_space_is_refused(self, tmp_path: Path) -> None:
        root = fakedata.write_officehome(tmp_path / "oh", domains=("Art", "Real_World"))
        (root / "Real_World").rename(root / "Real World")
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="officehome", root=str(root)))
        _one_line_error(excinfo, "Real World", "rename")

    def test_hidden_and_non_image_files_are_ignored(self, tmp_path: Path) -> None:
        root = fakedata.write_officehome(tmp_path / "oh", domains=("Art",))
        spec = DatasetSpec(kind="officehome", root=str(root))
        before = open_dataset(spec).manifest.digest()
        (root / ".DS_Store").write_bytes(b"junk")
        (root / "Art" / "Mug" / "._00001.jpg").write_bytes(b"junk")
        (root / "Art" / "Mug" / "Thumbs.db").write_bytes(b"junk")
        (root / "Art" / ".cache").mkdir()
        (root / "ImageInfo.csv").write_text("x")
        assert open_dataset(spec).manifest.digest() == before

    def test_awkward_names_and_upper_case_extensions(self, tmp_path: Path) -> None:
        root = fakedata.write_officehome(
            tmp_path / "oh", domains=("Clipart",), unicode_names=True, upper_ext=True
        )
        m = open_dataset(DatasetSpec(kind="officehome", root=str(root))).manifest
        ids = m.split("Clipart").ids()
        assert len(ids) == 65
        assert ids[0] == "Clipart/Alarm_Clock/Bild café 00001 ü.JPG"


class TestDomainNet:
    def _root(self, tmp_path: Path) -> Path:
        return fakedata.write_domainnet(
            tmp_path / "dn", domains=("clipart",), num_classes=3, per_class_train=2
        )

    def test_classes_from_lists(self, fake_specs: dict[str, DatasetSpec]) -> None:
        m = open_dataset(fake_specs["domainnet"]).manifest
        assert m.classes == tuple(f"class_{i:03d}" for i in range(5))
        for split in m.splits:
            assert all(s.id.split("/")[1] == m.classes[s.label] for s in split.samples)
        first = m.split("sketch_test").samples[0]
        assert first.id == "sketch/class_000/sketch_001_000003.jpg"

    def test_list_order_is_kept(self, tmp_path: Path) -> None:
        root = self._root(tmp_path)
        lines = (root / "clipart_train.txt").read_text().splitlines()
        (root / "clipart_train.txt").write_text("\n".join(lines[::-1]) + "\n")
        m = open_dataset(DatasetSpec(kind="domainnet", root=str(root), splits=("clipart_train",))).manifest
        assert m.split("clipart_train").ids() == tuple(line.rsplit(" ", 1)[0] for line in lines[::-1])

    def test_missing_listed_file_names_list_line_and_path(self, tmp_path: Path) -> None:
        root = self._root(tmp_path)
        gone = "clipart/class_001/clipart_002_000002.jpg"
        (root / gone).unlink()
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="domainnet", root=str(root)))
        _one_line_error(excinfo, f"{root / 'clipart_train.txt'}:4", str(root / gone))

    def test_label_disagreeing_with_folder_names_the_line(self, tmp_path: Path) -> None:
        root = self._root(tmp_path)
        lines = (root / "clipart_test.txt").read_text().splitlines()
        lines[1] = lines[1].rsplit(" ", 1)[0] + " 2"
        (root / "clipart_test.txt").write_text("\n".join(lines) + "\n")
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="domainnet", root=str(root)))
        _one_line_error(excinfo, "clipart_test.txt:2", "label 2")

    def test_unknown_split_suggests_closest(self, tmp_path: Path) -> None:
        spec = DatasetSpec(kind="domainnet", root=str(self._root(tmp_path)), splits=("clipart_tset",))
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(spec)
        _one_line_error(excinfo, "did you mean 'clipart_test'")

    def test_selected_split_without_list_file(self, tmp_path: Path) -> None:
        root = self._root(tmp_path)
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="domainnet", root=str(root), splits=("real_train",)))
        _one_line_error(excinfo, str(root / "real_train.txt"))


class TestImageNet:
    def test_layout(self, fake_specs: dict[str, DatasetSpec]) -> None:
        m = open_dataset(fake_specs["imagenet"]).manifest
        assert m.classes == fakedata.IMAGENET_WNIDS
        assert m.split("train").samples[0].id == "train/n01440764/n01440764_1000.JPEG"
        assert m.split("val").labels().tolist() == [0, 1, 2, 3, 4]

    def test_val_wnids_must_match_train(self, tmp_path: Path) -> None:
        root = fakedata.write_imagenet(tmp_path / "in", wnids=("n01", "n02"), per_class_train=1)
        shutil.move(root / "val" / "n02", root / "val" / "n03")
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="imagenet", root=str(root)))
        _one_line_error(excinfo, str(root / "val"), "n03")
        assert open_dataset(DatasetSpec(kind="imagenet", root=str(root), splits=("train",))).manifest

    def test_flat_val_folder_is_refused(self, tmp_path: Path) -> None:
        root = fakedata.write_imagenet(tmp_path / "in", wnids=("n01",), per_class_train=1)
        shutil.move(root / "val" / "n01" / "ILSVRC2012_val_00000001.JPEG", root / "val")
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="imagenet", root=str(root)))
        _one_line_error(excinfo, "ILSVRC2012_val_00000001.JPEG", "class folders")


class TestArrayDatasets:
    def test_cifar100_rows_are_chw(self, fake_specs: dict[str, DatasetSpec]) -> None:
        ds = open_dataset(fake_specs["cifar100"])
        assert ds.manifest.classes == fakedata.CIFAR100_CLASSES
        with (Path(fake_specs["cifar100"].root) / "cifar-100-python" / "test").open("rb") as f:
            raw = pickle.load(f, encoding="bytes")
        sample = ds.manifest.split("test").samples[7]
        assert (sample.id, sample.label, sample.size) == ("test/00007", raw[b"fine_labels"][7], 3072)
        expected = raw[b"data"][7].reshape(3, 32, 32).transpose(1, 2, 0)
        assert np.array_equal(np.asarray(ds.load_image("test", 7)), expected)

    def test_cifar10_concatenates_the_five_batches(self, fake_specs: dict[str, DatasetSpec]) -> None:
        m = open_dataset(fake_specs["cifar10"]).manifest
        assert m.classes == fakedata.CIFAR10_CLASSES
        assert m.split("train").samples[-1].id == "train/00049"

    def test_cifar_pickle_with_foreign_globals_is_refused(self, tmp_path: Path) -> None:
        root = fakedata.write_cifar10(tmp_path / "c10", n_train=10, n_test=5)

        class Evil:
            def __reduce__(self) -> tuple[object, tuple[str]]:
                return (print, ("executed",))

        with (root / "cifar-10-batches-py" / "test_batch").open("wb") as f:
            pickle.dump({b"data": Evil()}, f)
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="cifar10", root=str(root)))
        _one_line_error(excinfo, "test_batch", "refusing to load builtins.print")

    def test_fashion_mnist_gz_and_plain_are_the_same_dataset(self, tmp_path: Path) -> None:
        gz = open_dataset(
            DatasetSpec(kind="fashion_mnist", root=str(fakedata.write_fashion_mnist(tmp_path / "a")))
        )
        plain_root = fakedata.write_fashion_mnist(tmp_path / "b", gz=False)
        plain = open_dataset(DatasetSpec(kind="fashion_mnist", root=str(plain_root)))
        assert gz.manifest.digest() == plain.manifest.digest()
        assert gz.load_image("test", 3).tobytes() == plain.load_image("test", 3).tobytes()
        assert gz.image_size("train", 0) == (28, 28)

    def test_wrong_idx_magic_names_the_file(self, tmp_path: Path) -> None:
        root = fakedata.write_fashion_mnist(tmp_path / "fm", gz=False)
        path = root / "t10k-labels-idx1-ubyte"
        path.write_bytes(struct.pack(">I", 0x803) + path.read_bytes()[4:])
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="fashion_mnist", root=str(root)))
        _one_line_error(excinfo, str(path), "0x00000801")

    def test_label_count_mismatch_names_the_file(self, tmp_path: Path) -> None:
        root = fakedata.write_fashion_mnist(tmp_path / "fm", gz=False)
        path = root / "train-labels-idx1-ubyte"
        path.write_bytes(struct.pack(">II", 0x801, 59) + bytes(59))
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="fashion_mnist", root=str(root)))
        _one_line_error(excinfo, str(path), "59 labels for 60 images")

    def test_truncated_gz_images_are_refused_when_listed(self, tmp_path: Path) -> None:
        """The rows are read for their content digests, so a truncated file fails up front."""
        root = fakedata.write_fashion_mnist(tmp_path / "fm")
        path = root / "train-images-idx3-ubyte.gz"
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100], mtime=0))
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="fashion_mnist", root=str(root)))
        _one_line_error(excinfo, str(path), "expected 60 x 28 x 28")

    @pytest.mark.skipif(
        not REAL_FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed"
    )
    def test_real_fashion_mnist(self) -> None:
        ds = open_dataset(DatasetSpec(kind="fashion_mnist"))  # the default root
        m = ds.manifest
        assert {s.name: len(s) for s in m.splits} == {"train": 60000, "test": 10000}
        assert len(m.classes) == 10 and m.classes[0] == "T-shirt/top"
        with gzip.open(REAL_FASHION_MNIST / "train-labels-idx1-ubyte.gz", "rb") as f:
            first_label = f.read(9)[8]
        assert m.split("train").samples[0].label == first_label
        img = ds.load_image("test", 9999)
        assert img.mode == "RGB" and img.size == (28, 28)


class TestListFile:
    def test_paths_with_spaces(self, fake_specs: dict[str, DatasetSpec]) -> None:
        m = open_dataset(fake_specs["list_file"]).manifest
        assert m.classes == ("0", "1", "2")
        assert m.split("train").samples[0].id == "images/class 0/img 000.jpg"

    def test_bad_line_names_file_and_line(self, tmp_path: Path) -> None:
        lst = fakedata.write_list_file(tmp_path / "l", num_classes=1, per_class=2)
        lst.write_text(lst.read_text() + "images/class 0/img 000.jpg cat\n")
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="list_file", root=str(lst.parent), lists=(str(lst),)))
        _one_line_error(excinfo, f"{lst}:3", "relative/path label")

    def test_path_outside_root_is_refused(self, tmp_path: Path) -> None:
        lst = fakedata.write_list_file(tmp_path / "l", num_classes=1, per_class=1)
        lst.write_text("../secret.jpg 0\n")
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="list_file", root=str(lst.parent), lists=(str(lst),)))
        _one_line_error(excinfo, f"{lst}:1", "inside the dataset root")

    def test_needs_lists_with_distinct_names(self, tmp_path: Path) -> None:
        lst = fakedata.write_list_file(tmp_path / "l", num_classes=1, per_class=1)
        with pytest.raises(DatasetError, match="dataset.lists"):
            open_dataset(DatasetSpec(kind="list_file", root=str(lst.parent)))
        (tmp_path / "other").mkdir()
        twin = Path(shutil.copy(lst, tmp_path / "other" / lst.name))
        with pytest.raises(DatasetError, match="share the split name"):
            open_dataset(DatasetSpec(kind="list_file", root=str(lst.parent), lists=(str(lst), str(twin))))


# --- decoding ----------------------------------------------------------------------------------


class TestImageDecoding:
    SIZE = (32, 24)

    @pytest.mark.parametrize("mode", fakedata.ODD_MODES)
    def test_odd_modes_decode_to_rgb(self, mode: str, awkward_root: Path) -> None:
        path = next(awkward_root.glob(f"*/{fakedata.odd_file_name(mode, upper_ext=True)}"))
        img = decode_image(path, name=str(path))
        assert img.mode == "RGB"
        assert img.size == fakedata.odd_size(mode, self.SIZE)
        assert decode_image(path.read_bytes(), name="bytes").tobytes() == img.tobytes()

    def test_exif_rotation_swaps_sides_in_dataset(self, awkward_root: Path) -> None:
        ds = open_dataset(DatasetSpec(kind="image_folder", root=str(awkward_root)))
        ids = ds.manifest.split("all").ids()
        index = next(i for i, x in enumerate(ids) if "exif6" in x)
        assert ds.image_size("all", index) == (24, 32)
        assert ds.load_image("all", index).size == (24, 32)

    def test_transparent_pixels_become_white(self, awkward_root: Path) -> None:
        path = next(awkward_root.glob("*/odd_rgba_png.PNG"))
        img = decode_image(path, name=str(path))
        assert img.getpixel((0, 0)) == (255, 255, 255)
        assert img.getpixel((31, 12)) != (255, 255, 255)

    def test_sixteen_bit_grey_is_scaled_to_eight_bits(self) -> None:
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 6), 0x8080, dtype=np.uint16)).save(buf, "PNG")
        img = decode_image(buf.getvalue(), name="grey16.png")
        assert img.getpixel((0, 0)) == (128, 128, 128)

    def test_cmyk_jpeg_keeps_its_colours(self) -> None:
        rgb = Image.new("RGB", (16, 16), (200, 60, 40))
        buf = io.BytesIO()
        rgb.convert("CMYK").save(buf, "JPEG", quality=95)
        got = np.asarray(decode_image(buf.getvalue(), name="cmyk.jpg"), dtype=np.int16)
        assert np.abs(got - np.array([200, 60, 40])).max() <= 12

    @pytest.mark.parametrize("mode", ["1", "L", "P", "I;16", "F", "CMYK", "YCbCr", "LA", "PA", "LAB"])
    def test_any_tiff_mode_decodes_to_rgb(self, mode: str) -> None:
        buf = io.BytesIO()
        Image.new("RGB", (6, 4), (200, 100, 50)).convert(mode).save(buf, "TIFF")
        img = decode_image(buf.getvalue(), name=f"{mode}.tif")
        assert img.mode == "RGB" and img.size == (6, 4)

    def test_truncated_jpeg_names_the_file_and_skip_list(self, awkward_root: Path) -> None:
        ds = open_dataset(DatasetSpec(kind="image_folder", root=str(awkward_root)))
        ids = ds.manifest.split("all").ids()
        index = ids.index("b/truncated.jpg")
        assert ds.image_size("all", index) == self.SIZE  # the header is intact
        with pytest.raises(DatasetError) as excinfo:
            ds.load_image("all", index)
        _one_line_error(excinfo, str(awkward_root / "b" / "truncated.jpg"), "truncated", "skip_list")

    def test_not_an_image_and_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(DatasetError, match="junk.jpg"):
            decode_image(b"not an image at all", name="junk.jpg")
        with pytest.raises(DatasetError, match="gone.png"):
            decode_image(tmp_path / "gone.png", name=str(tmp_path / "gone.png"))

    def test_check_images_finds_exactly_the_broken_ones(self, awkward_root: Path) -> None:
        ds = open_dataset(DatasetSpec(kind="image_folder", root=str(awkward_root)))
        assert check_images(ds) == ["b/truncated.jpg"]

    def test_skip_list_leaves_out_and_records(self, awkward_root: Path, tmp_path: Path) -> None:
        skip = tmp_path / "skip.txt"
        skip.write_text("# found by check_images\nb/truncated.jpg\n")
        spec = DatasetSpec(kind="image_folder", root=str(awkward_root))
        full = open_dataset(spec).manifest
        ds = open_dataset(spec.model_copy(update={"skip_list": str(skip)}))
        assert ds.manifest.skipped == ("b/truncated.jpg",)
        assert len(ds.manifest.split("all")) == len(full.split("all")) - 1
        assert ds.manifest.digest() != full.digest()
        assert check_images(ds) == []


# --- labeled lists -----------------------------------------------------------------------------


class TestLabeledLists:
    def test_four_per_class_is_deterministic(
        self, fake_specs: dict[str, DatasetSpec], tmp_path: Path
    ) -> None:
        m = open_dataset(fake_specs["cifar100"]).manifest
        sha = write_labeled_list(m, "train", per_class=4, seed=1, out=tmp_path / "a.txt")
        again = write_labeled_list(m, "train", per_class=4, seed=1, out=tmp_path / "b" / "a.txt")
        other = write_labeled_list(m, "train", per_class=4, seed=2, out=tmp_path / "c.txt")
        assert sha == again != other
        data = (tmp_path / "a.txt").read_bytes()
        assert data == (tmp_path / "b" / "a.txt").read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha
        assert data.endswith(b"\n") and b"\r" not in data
        ids = read_labeled_list(tmp_path / "a.txt", sha256=sha)
        assert len(ids) == 400
        indices = labeled_indices(m.split("train"), ids)
        assert indices.dtype == np.int64 and (np.diff(indices) > 0).all()  # manifest order
        assert np.bincount(m.split("train").labels()[indices], minlength=100).tolist() == [4] * 100

    def test_wrong_sha_names_both_digests(self, fake_specs: dict[str, DatasetSpec], tmp_path: Path) -> None:
        m = open_dataset(fake_specs["cifar10"]).manifest
        sha = write_labeled_list(m, "train", per_class=2, seed=0, out=tmp_path / "l.txt")
        wrong = "0" * 64
        with pytest.raises(DatasetError) as excinfo:
            read_labeled_list(tmp_path / "l.txt", sha256=wrong)
        _one_line_error(excinfo, str(tmp_path / "l.txt"), sha, wrong)
        with pytest.raises(DatasetError, match="not found"):
            read_labeled_list(tmp_path / "missing.txt")

    def test_too_few_samples_in_a_class(self, fake_specs: dict[str, DatasetSpec], tmp_path: Path) -> None:
        m = open_dataset(fake_specs["cifar100"]).manifest
        with pytest.raises(DatasetError) as excinfo:
            write_labeled_list(m, "train", per_class=6, seed=0, out=tmp_path / "l.txt")
        _one_line_error(excinfo, "class 0 'apple'", "per_class = 6")
        assert not (tmp_path / "l.txt").exists()

    def test_imagenet_style_bare_file_names(self, fake_specs: dict[str, DatasetSpec], tmp_path: Path) -> None:
        spec = fake_specs["imagenet"]
        out = fakedata.write_imagenet_subset_list(Path(spec.root), tmp_path / "1percent.txt", per_class=1)
        names = read_labeled_list(out)
        assert all("/" not in n for n in names)
        train = open_dataset(spec).manifest.split("train")
        indices = labeled_indices(train, names)
        assert [train.samples[i].id.rsplit("/", 1)[1] for i in indices] == list(names)
        assert sorted(train.labels()[indices].tolist()) == [0, 1, 2, 3, 4]

    def test_unknown_ambiguous_and_repeated_ids(self, fake_specs: dict[str, DatasetSpec]) -> None:
        split = open_dataset(fake_specs["image_folder"]).manifest.split("all")
        with pytest.raises(DatasetError) as excinfo:
            labeled_indices(split, ["cat/00001.jpg", "nope1.jpg", "nope2.jpg"])
        _one_line_error(excinfo, "2 labeled id(s)", "'nope1.jpg'", "'nope2.jpg'")
        with pytest.raises(DatasetError, match="several samples"):
            labeled_indices(split, ["00001.jpg"])  # cat/00001.jpg and dog/00001.jpg
        with pytest.raises(DatasetError, match="more than once"):
            labeled_indices(split, ["cat/00001.jpg", "cat/00001.jpg"])
        assert labeled_indices(split, ["dog/00002.jpg", "cat/00001.jpg"]).tolist() == [3, 0]


# --- bad input ---------------------------------------------------------------------------------


class TestBadInput:
    @pytest.mark.parametrize("kind", KINDS)
    def test_missing_root(self, kind: str, tmp_path: Path) -> None:
        root = tmp_path / "nowhere"
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind=kind, root=str(root), lists=("x.txt",)))  # type: ignore[arg-type]
        message = _one_line_error(excinfo, str(root), "CUSTOMKD_DATA_ROOT", "expected layout")
        assert message.startswith(f"dataset root not found: {root} (set dataset.root or CUSTOMKD_DATA_ROOT")

    def test_relative_root_resolves_against_data_root(self, tmp_data_root: Path) -> None:
        fakedata.write_image_folder(tmp_data_root / "images", per_class=1)
        ds = open_dataset(DatasetSpec(kind="image_folder"))  # default root "images"
        assert ds.root == (tmp_data_root / "images").absolute()
        assert len(ds.manifest.split("all")) == 3

    def test_relative_skip_and_list_files_resolve_against_data_root(self, tmp_data_root: Path) -> None:
        lst = fakedata.write_list_file(tmp_data_root / "mine", name="val", num_classes=2, per_class=1)
        (tmp_data_root / "skip.txt").write_text("images/class 1/img 000.jpg\n")
        spec = DatasetSpec(kind="list_file", root="mine", lists=("mine/val.txt",), skip_list="skip.txt")
        m = open_dataset(spec).manifest
        assert lst.exists() and m.split("val").ids() == ("images/class 0/img 000.jpg",)
        assert m.skipped == ("images/class 1/img 000.jpg",)

    def test_skip_list_problems(self, fake_specs: dict[str, DatasetSpec], tmp_path: Path) -> None:
        spec = fake_specs["image_folder"]
        with pytest.raises(DatasetError, match="skip_list file not found"):
            open_dataset(spec.model_copy(update={"skip_list": str(tmp_path / "none.txt")}))
        (tmp_path / "skip.txt").write_text("cat/00001.jpg\ncat/99999.jpg\n")
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(spec.model_copy(update={"skip_list": str(tmp_path / "skip.txt")}))
        _one_line_error(excinfo, str(tmp_path / "skip.txt"), "'cat/99999.jpg'")

    def test_root_without_any_split(self, tmp_path: Path) -> None:
        (tmp_path / "empty").mkdir()
        for kind in ("officehome", "domainnet", "imagenet", "image_folder"):
            with pytest.raises(DatasetError) as excinfo:
                open_dataset(DatasetSpec(kind=kind, root=str(tmp_path / "empty")))  # type: ignore[arg-type]
            _one_line_error(excinfo, str(tmp_path / "empty"))

    def test_missing_cifar_file(self, tmp_path: Path) -> None:
        root = fakedata.write_cifar10(tmp_path / "c10", n_train=10, n_test=5)
        (root / "cifar-10-batches-py" / "data_batch_3").unlink()
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="cifar10", root=str(root)))
        _one_line_error(excinfo, "data_batch_3")


class TestNothingDroppedOrUnbounded:
    """Input that used to crash, exhaust memory or vanish silently: each is one DatasetError line."""

    def _folder(self, tmp_path: Path) -> Path:
        return fakedata.write_image_folder(tmp_path / "folder", per_class=1)

    def test_a_dangling_image_link_is_named(self, tmp_path: Path) -> None:
        root = self._folder(tmp_path)
        (root / "cat" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="image_folder", root=str(root)))
        _one_line_error(excinfo, "gone.jpg", "dangling")

    def test_a_looping_class_folder_link_is_named(self, tmp_path: Path) -> None:
        root = self._folder(tmp_path)
        (root / "loop").symlink_to(root / "loop")
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="image_folder", root=str(root)))
        _one_line_error(excinfo, "loop", "loop")

    def test_an_unreadable_class_folder_is_named(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        root = self._folder(tmp_path)
        real = os.scandir

        def scandir(path: typing.Any) -> typing.Any:
            if Path(path).name == "dog":
                raise PermissionError(13, "Permission denied")
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="image_folder", root=str(root)))
        _one_line_error(excinfo, "dog", "Permission denied")

    def test_an_empty_class_folder_is_named(self, tmp_path: Path) -> None:
        root = self._folder(tmp_path)
        (root / "empty").mkdir()
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="image_folder", root=str(root)))
        _one_line_error(excinfo, "empty", "no images")

    def test_a_huge_list_label_is_refused_before_it_sizes_the_classes(self, tmp_path: Path) -> None:
        lists = fakedata.write_list_file(tmp_path / "listed", num_classes=2, per_class=1)
        text = lists.read_text().splitlines()
        lists.write_text("\n".join([*text[:-1], text[-1].rsplit(" ", 1)[0] + " 999999999999"]) + "\n")
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="list_file", root=str(lists.parent), lists=(str(lists),)))
        _one_line_error(excinfo, f"{lists}:2", "999999999999")

    def test_an_image_listed_twice_names_both_lines(self, tmp_path: Path) -> None:
        lists = fakedata.write_list_file(tmp_path / "listed", num_classes=2, per_class=1)
        text = lists.read_text().splitlines()
        lists.write_text("\n".join([*text, text[0].rsplit(" ", 1)[0] + " 1"]) + "\n")
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="list_file", root=str(lists.parent), lists=(str(lists),)))
        _one_line_error(excinfo, f"{lists}:3", "line 1")

    def test_a_nul_byte_in_a_list_entry(self, tmp_path: Path) -> None:
        lists = fakedata.write_list_file(tmp_path / "listed", num_classes=2, per_class=1)
        lists.write_text(lists.read_text().replace("img 000", "img\x00000", 1))
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="list_file", root=str(lists.parent), lists=(str(lists),)))
        _one_line_error(excinfo, f"{lists}:1", "NUL")

    def test_a_linked_sub_folder_is_followed_and_a_loop_refused(self, tmp_path: Path) -> None:
        root = self._folder(tmp_path)
        before = open_dataset(DatasetSpec(kind="image_folder", root=str(root))).manifest.split("all")
        extra = tmp_path / "elsewhere"
        extra.mkdir()
        Image.new("RGB", (8, 8), "red").save(extra / "x.png")
        (root / "cat" / "more").symlink_to(extra, target_is_directory=True)
        after = open_dataset(DatasetSpec(kind="image_folder", root=str(root))).manifest.split("all")
        assert len(after) == len(before) + 1 and "cat/more/x.png" in after.ids()
        (extra / "back").symlink_to(root / "cat", target_is_directory=True)
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="image_folder", root=str(root)))
        _one_line_error(excinfo, "back", "loop")

    def test_an_image_over_the_pixel_limit_is_refused_before_decoding(self, tmp_path: Path) -> None:
        root = self._folder(tmp_path)
        small = Image.open(next((root / "cat").iterdir()))
        limit = small.width * small.height - 1
        ds = open_dataset(DatasetSpec(kind="image_folder", root=str(root), max_pixels=limit))
        for read in (ds.load_image, ds.image_size):
            with pytest.raises(DatasetError) as excinfo:
                read("all", 0)
            _one_line_error(excinfo, "cat", "dataset.max_pixels")

    def test_a_decompression_bomb_warning_is_an_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        root = self._folder(tmp_path)
        small = Image.open(next((root / "cat").iterdir()))
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", small.width * small.height - 1)
        path = next((root / "cat").iterdir())
        with pytest.raises(DatasetError) as excinfo:  # without dataset.max_pixels, Pillow's bound holds
            decode_image(path, name=str(path))
        message = _one_line_error(excinfo, "cat", "decompression bomb", "raise dataset.max_pixels")
        assert "re-download" not in message

    def test_max_pixels_can_be_raised_past_pillows_bound(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        root = self._folder(tmp_path)
        small = Image.open(next((root / "cat").iterdir()))
        pixels = small.width * small.height
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels // 3)  # stands for Pillow's 89 MP
        ds = open_dataset(DatasetSpec(kind="image_folder", root=str(root), max_pixels=pixels))
        assert ds.load_image("all", 0).size == small.size
        assert ds.image_size("all", 0) == small.size
        tight = open_dataset(DatasetSpec(kind="image_folder", root=str(root), max_pixels=pixels - 1))
        for read in (tight.load_image, tight.image_size):
            with pytest.raises(DatasetError) as excinfo:
                read("all", 0)
            assert "re-download" not in _one_line_error(excinfo, "cat", "raise dataset.max_pixels")

    @pytest.mark.parametrize("case", ["bad_args", "huge_shape", "ndarray_call"])
    def test_hostile_cifar_arrays_are_refused_before_allocating(self, tmp_path: Path, case: str) -> None:
        root = fakedata.write_cifar10(tmp_path / "c10", n_train=10, n_test=5)
        reconstruct = np.ndarray((0,)).__reduce__()[0]
        args: dict[str, tuple[typing.Any, tuple[typing.Any, ...]]] = {
            "bad_args": (reconstruct, ("x",)),
            "huge_shape": (reconstruct, (np.ndarray, (10**13,), b"B")),
            "ndarray_call": (np.ndarray, ((10**13,),)),
        }

        class Hostile:
            def __reduce__(self) -> tuple[typing.Any, tuple[typing.Any, ...]]:
                return args[case]

        with (root / "cifar-10-batches-py" / "test_batch").open("wb") as f:
            pickle.dump({b"data": Hostile(), b"labels": [0]}, f, protocol=2)
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="cifar10", root=str(root)))
        _one_line_error(excinfo, "test_batch")

    def test_a_nested_label_list_is_refused_without_expanding_it(self, tmp_path: Path) -> None:
        import tracemalloc

        root = fakedata.write_cifar10(tmp_path / "c10", n_train=10, n_test=5)
        nested: list[typing.Any] = [0]
        for _ in range(22):  # a few hundred pickle bytes; 4 M labels once expanded
            nested = [nested, nested]
        with (root / "cifar-10-batches-py" / "test_batch").open("wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": nested}, f)
        tracemalloc.start()
        try:
            with pytest.raises(DatasetError) as excinfo:
                open_dataset(DatasetSpec(kind="cifar10", root=str(root)))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        _one_line_error(excinfo, "test_batch", "labels")
        assert peak < 8 << 20

    @pytest.mark.parametrize("labels", [["a", "b"], 7])
    def test_a_malformed_cifar_batch(self, tmp_path: Path, labels: typing.Any) -> None:
        root = fakedata.write_cifar10(tmp_path / "c10", n_train=10, n_test=5)
        with (root / "cifar-10-batches-py" / "test_batch").open("wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, f)
        with pytest.raises(DatasetError) as excinfo:
            open_dataset(DatasetSpec(kind="cifar10", root=str(root)))
        _one_line_error(excinfo, "test_batch")

    def test_labels_out_that_is_a_directory_and_a_negative_seed(
        self, fake_specs: dict[str, DatasetSpec], tmp_path: Path
    ) -> None:
        manifest = open_dataset(fake_specs["image_folder"]).manifest
        with pytest.raises(DatasetError) as excinfo:
            write_labeled_list(manifest, "all", per_class=1, seed=0, out=tmp_path)
        _one_line_error(excinfo, str(tmp_path), "directory")
        with pytest.raises(DatasetError) as excinfo:
            write_labeled_list(manifest, "all", per_class=1, seed=-1, out=tmp_path / "l.txt")
        _one_line_error(excinfo, "--seed -1")
