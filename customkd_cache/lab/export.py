"""Export the trained edge student of a run directory as ONNX (or TorchScript), and measure it.

``export_student(run_dir)`` loads the run's student (``student_best.pth`` or ``student_last.pth``,
the timm model alone), writes it with a dynamic batch dimension, and checks it against torch on the
run's own evaluation images (view 0 of every evaluation row, rendered as in training; all of them
unless ``max_images``): max |Δlogit|, top-1 agreement and the accuracy of both. It also records
parameters, MACs at the student's input size (torch's FLOP counter, MACs = FLOPs / 2), the file size
and CPU latency at batch 1 (onnxruntime, or torch for TorchScript) with one thread and with every
core this process may use: p50/p90 over ``latency_runs`` runs after ``warmup_runs``.
``quantize="int8"`` adds onnxruntime static quantization (QDQ, per-channel int8 weights, uint8
activations calibrated on training images, never on the evaluation rows) with the same checks.
Everything goes to ``export.json`` beside the file.

Every file is written with ``customkd_cache.files`` (a new temporary file renamed into place): a link
planted at ``export/`` or at a file's path is refused or replaced, never written through, and the
quantizer's intermediate files live in a scratch directory removed on exit and on SIGTERM.

Refused with ``ExportError`` (exit 2): a run directory without a finished student, a checkpoint that
is not a state dict of tensors, a student that cannot be traced, bad options (``--images < 0``,
``--runs < 1``, ``--out`` a directory), int8 for TorchScript, or onnxruntime missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from customkd_cache import specs
from customkd_cache.errors import CustomKDError, OutputError, first_line
from customkd_cache.files import ensure_dir, scratch_dir, write_atomic
from customkd_cache.optional import onnx_session, require

Format = Literal["onnx", "torchscript"]
Checkpoint = Literal["best", "last"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
OPSET = 17
EXPORT_FILE = "export.json"
BATCH = 64


class ExportError(CustomKDError, ValueError):
    """A run directory cannot be exported as asked (no finished student, untraceable, bad option)."""


@dataclass(frozen=True)
class EvalImages:
    """The run's evaluation images as the student sees them, and training images for calibration."""

    pixels: torch.Tensor  # (N, 3, s, s) float32, view 0, normalized with the student's mean/std
    labels: np.ndarray  # (N,) int64
    calibration: torch.Tensor  # (M, 3, s, s) float32, view 0 of training rows
    splits: tuple[str, ...]


class Logits(nn.Module):
    """The exported graph: pixels (B, 3, s, s) float32 -> logits (B, num_classes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(pixels)
        return out


def export_student(
    run_dir: Path,
    *,
    fmt: Format = "onnx",
    quantize: Literal["int8"] | None = None,
    checkpoint: Checkpoint = "best",
    out: Path | None = None,
    max_images: int = 0,
    latency_runs: int = 100,
    warmup_runs: int = 10,
    calibration_images: int = 64,
) -> dict[str, Any]:
    """Export and measure the student of ``run_dir``; return what ``export.json`` holds.

    Raises:
        ExportError: see the module docstring; DatasetError/StoreError when the run's dataset or
            cache cannot be found (they are needed for the evaluation images).
    """
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: unknown; choose one of {', '.join(FORMATS)}")
    if quantize is not None and (quantize != "int8" or fmt != "onnx"):
        raise ExportError(f"--quantize {quantize}: only int8, and only with --format onnx")
    _check_counts(max_images=max_images, latency_runs=latency_runs, warmup_runs=warmup_runs)
    from customkd_cache.data import open_dataset

    spec = load_run_spec(run_dir)
    path = Path(out) if out else run_dir / "export" / ("student.onnx" if fmt == "onnx" else "student.pt")
    _check_out(path, run_dir=None if out else run_dir)
    ckpt = student_checkpoint(run_dir, checkpoint)
    dataset = open_dataset(spec.dataset)
    student = load_student(spec, ckpt, num_classes=len(dataset.manifest.classes))
    images = eval_images(
        run_dir, spec, dataset, student, max_images=max_images, calibration=calibration_images
    )
    model = Logits(student).eval()
    size = spec.student.input_size
    with torch.no_grad():
        reference = predict(model, images.pixels)
    write = write_onnx if fmt == "onnx" else write_torchscript
    write(model, path, size=size, name=spec.student.name)
    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "student": spec.student.name,
        "checkpoint": ckpt.name,
        "input_size": size,
        "num_images": int(len(images.labels)),
        "eval_splits": list(images.splits),
        "torch_accuracy": _accuracy(reference, images.labels),
        "params": sum(p.numel() for p in model.parameters()),
        "macs": count_macs(model, size),
        "threads_all": _cores(),
        "latency_runs": latency_runs,
        "formats": {fmt: measure(path, fmt, images, reference, runs=latency_runs, warmup=warmup_runs)},
    }
    if quantize:
        qpath = path.with_name(path.stem + ".int8.onnx")
        quantize_int8(path, qpath, images.calibration)
        report["formats"]["onnx_int8"] = measure(
            qpath, "onnx", images, reference, runs=latency_runs, warmup=warmup_runs
        )
    write_atomic(path.parent / EXPORT_FILE, json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def _check_counts(*, max_images: int, latency_runs: int, warmup_runs: int) -> None:
    if max_images < 0:
        raise ExportError(f"--images {max_images}: give 0 (every evaluation image) or a positive count")
    if latency_runs < 1:
        raise ExportError(f"--runs {latency_runs}: give at least 1 timed run per latency figure")
    if warmup_runs < 0:
        raise ExportError(f"warmup_runs {warmup_runs}: give 0 or more")


def _check_out(path: Path, *, run_dir: Path | None) -> None:
    """Refuse an output path that is a directory, and create its folder (below ``run_dir`` no link
    is accepted: ``RUN_DIR/export`` may be shared) before any time goes into loading and tracing."""
    if path.is_dir():
        raise ExportError(
            f"--out {path}: is a directory; give the model file to write, e.g. --out {path / 'student.onnx'}"
        )
    ensure_dir(path.parent, within=run_dir, what="--out" if run_dir is None else "")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out {path}: directory {path.parent} is not writable; choose another --out")


# --- the run's student and images --------------------------------------------------------------


def load_run_spec(run_dir: Path) -> specs.TrainSpec:
    """The resolved train spec of a finished run (``spec.json`` and ``results.json`` present)."""
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run directory; give the --out directory of a train run")
    if not (run_dir / "results.json").exists():
        raise ExportError(
            f"{run_dir}: no finished student (results.json missing); finish the run with "
            "`customkd-cache train --resume` first"
        )
    path = run_dir / "spec.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot read the run's spec ({e}); the run directory is damaged") from None
    return specs.validate(specs.TrainSpec, data, str(path))


def student_checkpoint(run_dir: Path, which: Checkpoint) -> Path:
    """``student_best.pth`` or ``student_last.pth`` of the run."""
    path = run_dir / f"student_{which}.pth"
    if not path.is_file():
        other = "last" if which == "best" else "best"
        raise ExportError(
            f"{path}: no {which} student checkpoint in this run; pass --checkpoint {other} or rerun training"
        )
    return path


def load_student(spec: specs.TrainSpec, checkpoint: Path, *, num_classes: int) -> nn.Module:
    """The run's timm model (``student.name``, ``num_classes``) with the checkpoint's weights."""
    from customkd_cache.models.students import create_student

    student = create_student(spec.student.model_copy(update={"weights": ""}), num_classes=num_classes)
    model = student.timm_model()
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ExportError(
            f"{checkpoint}: holds objects other than tensors and plain containers, refused unloaded "
            "(loading them could run code); export a run whose student checkpoint this tool wrote"
        ) from None
    except Exception as e:  # truncated or foreign file: torch raises several types
        raise ExportError(f"{checkpoint}: not a loadable student checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(
            f"{checkpoint}: holds a {type(state).__name__}, not a state dict of tensors; export a run whose "
            "student checkpoint this tool wrote"
        )
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ExportError(
            f"{checkpoint}: does not fit student.name '{spec.student.name}' ({first_line(e)})"
        ) from None
    return model


def eval_images(
    run_dir: Path, spec: specs.TrainSpec, dataset: Any, model: nn.Module, *, max_images: int, calibration: int
) -> EvalImages:
    """View 0 of the run's evaluation rows (the first ``max_images``; 0 = all) and of the first
    ``calibration`` training rows, rendered as the run's evaluation renders them for ``model``."""
    from customkd_cache.models.students import data_config
    from customkd_cache.stage_two.replay import ReplayDataset, Row
    from customkd_cache.stage_two.train import build_protocol

    store_path = _run_store(run_dir)
    protocol = build_protocol(spec, dataset)
    sizes = {s.name: len(s.samples) for s in dataset.manifest.splits}
    rows = [Row(s, r, False) for s in protocol.eval_splits for r in protocol.eval_indices(s, sizes[s])]
    rows = rows[:max_images] if max_images else rows
    train_rows = [*protocol.labeled, *protocol.unlabeled][:calibration]
    cfg = data_config(model)
    replay = ReplayDataset(
        dataset=dataset,
        store_path=store_path,
        features=None,
        student_size=spec.student.input_size,
        student_mean=cfg["mean"],
        student_std=cfg["std"],
        interpolation=cfg.get("interpolation", "bilinear"),
        seed=spec.seed,
    )
    pixels, labels = _render(replay, rows, spec)
    calib, _ = _render(replay, [Row(r.split, r.row, False) for r in train_rows], spec)
    return EvalImages(pixels, labels, calib, tuple(protocol.eval_splits))


def _render(replay: Any, rows: list[Any], spec: specs.TrainSpec) -> tuple[torch.Tensor, np.ndarray]:
    from customkd_cache.stage_two.replay import make_loader

    replay.set_items([(r, 0) for r in rows], 0)
    loader = make_loader(replay, batch_size=BATCH, batches=None, num_workers=0, seed=spec.seed)
    pixels, labels = [], []
    for batch in loader:
        pixels.append(replay.to_device(batch, "cpu")["pixels"])
        labels.append(batch["label"].numpy())
    size = spec.student.input_size
    if not pixels:
        return torch.empty(0, 3, size, size), np.empty(0, np.int64)
    return torch.cat(pixels), np.concatenate(labels).astype(np.int64)


def _run_store(run_dir: Path) -> Path:
    """The store the run read, from ``caches.json`` (relative paths: as recorded, else under the
    cache root)."""
    path = run_dir / "caches.json"
    try:
        caches = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot read which cache the run used ({e}); the run is damaged") from None
    for store, entry in caches.items():
        if isinstance(entry, dict) and entry.get("fingerprint"):
            p = Path(store)
            if p.exists():
                return p
            under_root = specs.cache_root() / p.name
            if under_root.exists():
                return under_root
            raise ExportError(
                f"{path}: the run's store {store} is gone; set CUSTOMKD_CACHE_ROOT to the cache root "
                "that holds it (its view boxes render the evaluation images)"
            )
    raise ExportError(f"{path}: names no store; the run directory is damaged")


# --- writing -----------------------------------------------------------------------------------


def write_onnx(model: nn.Module, path: Path, *, size: int, name: str) -> None:
    """ONNX with a dynamic batch axis, input ``pixels`` and output ``logits``.

    The TorchScript-based exporter (``dynamo=False``) is used: it needs only the ``onnx`` package,
    while the torch.export-based one also needs ``onnxscript``.
    """
    _require("onnx")
    example = torch.zeros(1, 3, size, size)

    def export(f: Any) -> None:
        try:
            with _quiet():
                torch.onnx.export(
                    model,
                    (example,),
                    f,
                    dynamo=False,
                    input_names=["pixels"],
                    output_names=["logits"],
                    dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                    opset_version=OPSET,
                )
        except OSError:
            raise  # a failed write, reported as such by write_atomic
        except Exception as e:  # the exporter raises many types for an untraceable graph
            raise ExportError(
                f"student '{name}' cannot be traced to ONNX ({type(e).__name__}: {first_line(e)}); "
                "try --format torchscript or another student.name"
            ) from None

    write_atomic(path, export)


def write_torchscript(model: nn.Module, path: Path, *, size: int, name: str) -> None:
    """TorchScript by tracing (the graph for one input shape, batch size free)."""
    try:
        with _quiet():
            traced = torch.jit.trace(model, torch.zeros(1, 3, size, size), check_trace=True)
    except Exception as e:  # tracing raises many types for a graph it cannot follow
        raise ExportError(
            f"student '{name}' cannot be traced to TorchScript ({type(e).__name__}: {first_line(e)}); "
            "try --format onnx or another student.name"
        ) from None
    write_atomic(path, lambda f: torch.jit.save(traced, f))


def quantize_int8(src: Path, dst: Path, calibration: torch.Tensor) -> None:
    """Static int8 quantization (QDQ, per-channel weights) calibrated on ``calibration`` images."""
    _require("onnxruntime")
    from onnxruntime import quantization as q

    if len(calibration) == 0:
        raise ExportError("--quantize int8: the run has no training rows to calibrate on")
    batches = [{"pixels": calibration[i : i + 1].numpy()} for i in range(len(calibration))]

    class Reader(q.CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    with scratch_dir(dst.parent) as scratch:  # the quantizer writes by name: only inside scratch
        pre, quantized = scratch / (dst.stem + ".pre.onnx"), scratch / dst.name
        with _quiet():
            q.quant_pre_process(str(src), str(pre))
            q.quantize_static(
                str(pre),
                str(quantized),
                Reader(),
                quant_format=q.QuantFormat.QDQ,
                per_channel=True,
                weight_type=q.QuantType.QInt8,
                activation_type=q.QuantType.QUInt8,
            )
        write_atomic(dst, quantized.read_bytes())


# --- measuring ---------------------------------------------------------------------------------


def measure(
    path: Path, fmt: Format, images: EvalImages, reference: torch.Tensor, *, runs: int, warmup: int
) -> dict[str, Any]:
    """Parity with torch, accuracy, file size and batch-1 latency of one exported file."""
    predict_file = _onnx_predictor if fmt == "onnx" else _script_predictor
    run_all = predict_file(path, threads=_cores())
    logits = _batched(run_all, images.pixels)
    diff = float((logits - reference).abs().max()) if len(reference) else 0.0
    agree = float((logits.argmax(1) == reference.argmax(1)).float().mean()) if len(reference) else 1.0
    size = images.pixels.shape[-1]
    one = images.pixels[:1] if len(images.pixels) else torch.zeros(1, 3, size, size)
    latency = {
        "1": latency_ms(predict_file(path, threads=1), one, runs=runs, warmup=warmup),
        "all": latency_ms(run_all, one, runs=runs, warmup=warmup),
    }
    return {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "max_abs_logit_diff": diff,
        "top1_agreement": agree,
        "accuracy": _accuracy(logits, images.labels),
        "latency_ms": latency,
    }


def latency_ms(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, runs: int, warmup: int
) -> dict[str, float]:
    """p50 and p90 wall time of ``run(x)`` in milliseconds over ``runs`` calls after ``warmup``."""
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    p50, p90 = np.percentile(np.asarray(times) * 1e3, [50, 90])
    return {"p50": float(p50), "p90": float(p90)}


def count_macs(model: nn.Module, size: int) -> int:
    """Multiply-accumulates of one image at ``size`` px (torch's FLOP counter: FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return int(counter.get_total_flops()) // 2


def predict(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return _batched(model, pixels)


def _batched(run: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    if len(pixels) == 0:
        return torch.empty(0, 0)
    return torch.cat([run(pixels[i : i + BATCH]) for i in range(0, len(pixels), BATCH)])


def _onnx_predictor(path: Path, *, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    session = onnx_session(path, threads=threads, error=ExportError, fix=_INSTALL)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["logits"], {"pixels": x.numpy()})[0])

    return run


def _script_predictor(path: Path, *, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with _torch_threads(threads), torch.no_grad():
            out: torch.Tensor = module(x)
            return out

    return run


# --- helpers -----------------------------------------------------------------------------------


def _accuracy(logits: torch.Tensor, labels: np.ndarray) -> float | None:
    if len(labels) == 0:
        return None
    return float((logits.argmax(1).numpy() == labels).mean())


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_INSTALL = "pip install 'customkd-cache[export]'"


def _require(module: str) -> Any:
    return require(module, error=ExportError, fix=_INSTALL)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' and the quantizer's warnings (deprecation notes, advice to pre-process)."""
    import warnings

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
