"""Optional dependencies (onnx, onnxruntime): imported when a command needs them, one message when
they are missing, and the one way an onnxruntime session is built."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from customkd_cache.errors import CustomKDError


def require(module: str, *, error: type[CustomKDError], fix: str) -> Any:
    """``import module``; raise ``error`` naming the missing package and ``fix`` (what to install)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise error(f"this needs the Python package '{module}', which is not installed; run: {fix}") from None


def onnx_session(model: Path | bytes, *, threads: int, error: type[CustomKDError], fix: str) -> Any:
    """An onnxruntime CPU session for a model file or serialized model: ``threads`` intra-op
    threads, one inter-op thread, warnings silenced."""
    ort = require("onnxruntime", error=error, fix=fix)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
