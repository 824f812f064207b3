"""The one registry of dataset kinds: name, on-disk layout, default root and the adapter that lists it.

A new kind is added here and nowhere else: ``specs.DatasetSpec.kind`` accepts exactly the names in
``KINDS``, its default root comes from here, and ``open_dataset`` finds the adapter here. The module
imports nothing of the package, so ``specs`` can read it without an import cycle; adapters are named
as ``module:function`` under ``customkd_cache.data.layouts`` and imported when a dataset is opened.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from customkd_cache.data.layouts.base import Listing
    from customkd_cache.specs import DatasetSpec


@dataclass(frozen=True)
class KindInfo:
    """One dataset kind.

    ``layout`` is the expected on-disk layout, quoted in errors; ``default_root`` is used when
    ``dataset.root`` is empty (relative roots resolve against CUSTOMKD_DATA_ROOT); ``adapter`` is
    ``"module:function"`` in ``customkd_cache.data.layouts``, a function ``(spec, root) -> Listing``.
    """

    name: str
    layout: str
    default_root: str
    adapter: str

    def lister(self) -> Callable[[DatasetSpec, Path], Listing]:
        module, function = self.adapter.split(":")
        found: Callable[[DatasetSpec, Path], Listing] = getattr(
            importlib.import_module(f"customkd_cache.data.layouts.{module}"), function
        )
        return found


_ALL = (
    KindInfo(
        "officehome",
        "ROOT/{Art,Clipart,Product,Real_World}/<65 class folders>/<images>",
        "officehome",
        "folders:list_officehome",
    ),
    KindInfo(
        "domainnet",
        "ROOT/<domain>_{train,test}.txt listing ROOT/<domain>/<class>/<image>",
        "domainnet",
        "lists:list_domainnet",
    ),
    KindInfo("cifar100", "ROOT/cifar-100-python/{train,test,meta}", "cifar100", "arrays:list_cifar"),
    KindInfo(
        "cifar10",
        "ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
        "cifar10",
        "arrays:list_cifar",
    ),
    KindInfo("imagenet", "ROOT/{train,val}/<wnid>/<image>.JPEG", "imagenet", "folders:list_imagenet"),
    KindInfo(
        "fashion_mnist",
        "ROOT/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
        "/usr/share/datasets/fashion-mnist",
        "arrays:list_fashion_mnist",
    ),
    KindInfo("image_folder", "ROOT/<class>/<image>", "images", "folders:list_image_folder"),
    KindInfo(
        "list_file",
        "dataset.lists files of `relative/path label` lines, paths relative to ROOT",
        ".",
        "lists:list_list_file",
    ),
)

KINDS: dict[str, KindInfo] = {k.name: k for k in _ALL}
KIND_NAMES: tuple[str, ...] = tuple(KINDS)


def kind_info(name: str) -> KindInfo:
    """The registered kind ``name`` (``KeyError`` if there is none: specs validate kinds first)."""
    return KINDS[name]


def layout(name: str) -> str:
    """The expected on-disk layout of kind ``name``, as errors quote it."""
    return KINDS[name].layout
