"""Numeric precision of stage two (``run.precision``): bf16 autocast or fp32.

Under bf16, ``torch.autocast`` runs the forward passes (student, projectors, customizer, probe) in
bfloat16 where that is safe and keeps the rest in float32; every loss in ``losses.py`` casts its
inputs up to float32 (softmax, log, KL and squared differences lose too much in bf16), as timm's
training script runs model and loss under one autocast context. bf16 has float32's exponent range,
so no loss scaling (``GradScaler``) is needed. Backward passes run outside the context, as PyTorch
recommends. The choice is part of the run's spec (spec.json), not of the store's identity.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch

from customkd_cache.errors import SpecError

if TYPE_CHECKING:
    from customkd_cache.stage_two.state import Run


def resolve_precision(name: str, device: torch.device) -> str:
    """``run.precision`` on ``device`` as ``"fp32"`` or ``"bf16"``.

    ``auto``: bf16 on a CUDA device that supports it (Ampere and newer), else fp32 (CPU included:
    bf16 autocast there helps only on CPUs with bf16 instructions). Raises SpecError for ``bf16`` on
    a device that cannot run it.
    """
    if name == "fp32":
        return "fp32"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16"
        if name == "bf16":
            raise SpecError(
                f"run.precision = 'bf16': {device} does not support bfloat16; use 'fp32' or 'auto'"
            )
        return "fp32"
    if name == "bf16":
        if device.type != "cpu":
            raise SpecError(f"run.precision = 'bf16': no bf16 autocast on {device}; use 'fp32' or 'auto'")
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> AbstractContextManager[object]:
    """The autocast context of ``precision`` (``resolve_precision``'s value) on ``device``; a no-op
    for fp32."""
    if precision != "bf16":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def run_precision(run: Run) -> str:
    """The run's resolved precision (``run.precision`` on its device)."""
    return resolve_precision(run.spec.run.precision, run.device)


def run_autocast(run: Run) -> AbstractContextManager[object]:
    """The run's autocast context (see ``autocast``)."""
    return autocast(run.device, run_precision(run))
