"""CustomKD's training-only modules: the customizer ``P_t`` (with its RMS bound) and the projectors.

Nothing here is part of a deployed student: these modules exist while stage two trains and are
saved in its checkpoints only.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from customkd_cache.errors import SpecError


def create_projector(d_in: int, d_out: int, kind: Literal["linear", "mlp"]) -> nn.Module:
    """A training-only projector (CustomKD's ``P_t``, ``P_s``): float32 (B, d_in) -> (B, d_out).

    ``linear``: one ``nn.Linear``. ``mlp``: Linear-BatchNorm1d-ReLU-Linear with hidden width
    ``max(d_in, d_out)``, so the bottleneck is never narrower than either side.
    """
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp":
        hidden = max(d_in, d_out)
        return nn.Sequential(
            nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out)
        )
    raise SpecError(f"customkd.projector: unknown kind '{kind}'; valid: linear, mlp")


def bound_rms(z: Tensor, max_rms: Tensor) -> Tensor:
    """Scale each row of ``z`` (B, D) down so its RMS is at most ``max_rms`` (0-dim; inf = no bound).

    Rows already inside the bound are returned as they are; the scaling is differentiable, so a loss
    on the output can still change each row's direction once its norm is at the bound.
    """
    # No branch on the bound's value (reading it would cost a device sync per call): with inf, rms / inf
    # is 0, clamped to 1, and the clamp passes no gradient (0 * 1/inf = 0, never 0 * inf = NaN); the
    # tiny term keeps sqrt's gradient finite for an all-zero row.
    rms = (z.float().pow(2).mean(dim=1, keepdim=True) + 1e-24).sqrt()
    scale = 1.0 / torch.clamp(rms / max_rms.to(rms.dtype), min=1.0)
    return z * scale.to(z.dtype)


class Customizer(nn.Module):
    """CustomKD's ``P_t`` (d_t -> d_s) with a bound on the RMS of each output row.

    The bound is the buffer ``max_rms`` (0-dim float32, ``inf`` = none), set before each stage-A cycle
    from ``customkd.target_bound``; it is part of the state dict, so a resumed run uses the same one.
    """

    max_rms: Tensor

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj
        self.register_buffer("max_rms", torch.tensor(float("inf")))

    def forward(self, f_t: Tensor) -> Tensor:
        return bound_rms(self.proj(f_t), self.max_rms)
