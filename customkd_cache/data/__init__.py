"""Datasets: one registry of dataset kinds, adapters by on-disk layout, manifests, decoding and views.

Modules: ``registry`` (the dataset kinds), ``layouts/`` (one adapter per on-disk layout: class
folders, list files, arrays), ``manifest`` (samples, splits and their digests), ``datasets``
(``open_dataset`` and ``Dataset``), ``decode`` (image bytes -> RGB), ``labels`` (labeled lists and id
files) and ``views`` (augmented views). The names below are what the rest of the package imports.
"""

from customkd_cache.data.datasets import Dataset, check_images, open_dataset
from customkd_cache.data.decode import decode_image
from customkd_cache.data.labels import labeled_indices, read_labeled_list, write_labeled_list
from customkd_cache.data.layouts.arrays import CIFAR10_TRAIN_BATCHES, FASHION_MNIST_CLASSES
from customkd_cache.data.layouts.base import IMAGE_EXTENSIONS
from customkd_cache.data.layouts.folders import OFFICEHOME_CLASSES, OFFICEHOME_DOMAINS
from customkd_cache.data.layouts.lists import DOMAINNET_DOMAINS
from customkd_cache.data.manifest import Manifest, Sample, SplitManifest
from customkd_cache.data.registry import KIND_NAMES, KINDS

__all__ = [
    "CIFAR10_TRAIN_BATCHES",
    "DOMAINNET_DOMAINS",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "KINDS",
    "KIND_NAMES",
    "OFFICEHOME_CLASSES",
    "OFFICEHOME_DOMAINS",
    "Dataset",
    "Manifest",
    "Sample",
    "SplitManifest",
    "check_images",
    "decode_image",
    "labeled_indices",
    "open_dataset",
    "read_labeled_list",
    "write_labeled_list",
]
