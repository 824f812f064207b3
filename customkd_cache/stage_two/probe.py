"""The teacher probe: a linear classifier on frozen, cached teacher features (docs/method.md).

It gives the teacher's own accuracy, the logits for the logit-based baselines (kd, dkd) and
pseudo-labels. It is trained once per run from the cache in seconds and is not part of CustomKD's
losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from customkd_cache.specs import ProbeSpec
from customkd_cache.stage_two.losses import standardize
from customkd_cache.stage_two.precision import autocast

_EVAL_ROWS = 8192  # rows per forward pass when scoring: bounds memory for (N, C) logits


@dataclass
class Probe:
    """A multinomial logistic regression ``linear((f - mean) / std)`` over teacher features.

    ``linear`` is ``nn.Linear`` (D -> C); ``mean``/``std`` (D,) float32 are the standardization it
    was trained with, applied inside ``logits``, so callers pass features in the same representation
    the probe was trained on (raw cached features, or the already standardized ones: then mean is
    about 0 and std about 1).
    """

    linear: nn.Linear
    mean: Tensor
    std: Tensor

    @torch.no_grad()
    def logits(self, f_t: Tensor) -> Tensor:
        """Logits (B, C) float32 for features ``f_t`` (B, D) of any float dtype; no autograd graph.

        Computed on the probe's device (move it once with ``to``) and returned on ``f_t``'s device.
        """
        device = self.linear.weight.device
        out = self.linear(standardize(f_t.to(device), self.mean.to(device), self.std.to(device)))
        return out.to(f_t.device)

    def to(self, device: torch.device | str) -> Probe:
        """A copy on ``device`` (e.g. the student's GPU); the original stays where it is."""
        linear = nn.Linear(self.linear.in_features, self.linear.out_features, device=device)
        linear.load_state_dict(self.linear.state_dict())
        return Probe(linear.eval(), self.mean.to(device), self.std.to(device))


def train_probe(
    features: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    spec: ProbeSpec,
    seed: int,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> Probe:
    """Fit a probe on ``features`` (N, D) float (e.g. every cached view of the labeled images,
    flattened) and ``labels`` (N,) int64 in ``[0, num_classes)``.

    Softmax cross-entropy, AdamW (``spec.lr``, ``spec.weight_decay``), ``spec.epochs`` passes in
    shuffled mini-batches of ``spec.batch_size``. Standardization uses ``mean``/``std`` (D,) when
    given (e.g. the cache's statistics), else those of ``features``. The weights start at zero and
    the shuffling draws from a ``torch.Generator`` seeded with ``seed``, so the result depends only
    on the inputs and ``seed`` (on a given device and thread count), never on the global RNG.
    ``precision = "bf16"`` runs each forward pass and loss under bf16 autocast (the loss in float32).
    Returns the probe on ``device``, in eval mode.
    """
    _check_inputs(features, labels, num_classes)
    if mean is None:
        mean = features.float().mean(dim=0)
    if std is None:
        std = features.float().std(dim=0, correction=0)
    x = standardize(features, mean, std).to(device)
    y = labels.to(device=device, dtype=torch.long)
    linear = nn.Linear(x.shape[1], num_classes, device=device)
    # Zero init: the problem is convex, so no random start is needed and none can differ across runs.
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    opt = torch.optim.AdamW(linear.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, foreach=True)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(spec.epochs):
        train_probe_epoch(
            linear, opt, x, y, batch_size=spec.batch_size, generator=generator, precision=precision
        )
    return Probe(linear.eval(), mean.float().to(device), std.float().to(device))


def train_probe_epoch(
    linear: nn.Linear,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    precision: str = "fp32",
) -> None:
    """One shuffled pass over standardized ``x`` (N, D) float32 and ``y`` (N,) int64; the forward pass
    and loss under ``precision``'s autocast (the loss in float32), the backward pass outside it."""
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    for start in range(0, x.shape[0], batch_size):
        idx = order[start : start + batch_size]
        with autocast(x.device, precision):
            loss = F.cross_entropy(linear(x[idx]).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def probe_accuracy(probe: Probe, features: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in [0, 1] of ``probe`` on ``features`` (N, D) with ``labels`` (N,) int64."""
    if features.shape[0] == 0 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probe_accuracy: need N > 0 rows and N labels, got {features.shape[0]} and {labels.shape[0]}"
        )
    correct = 0
    for start in range(0, features.shape[0], _EVAL_ROWS):
        pred = probe.logits(features[start : start + _EVAL_ROWS]).argmax(dim=1).cpu()
        correct += int((pred == labels[start : start + _EVAL_ROWS].cpu()).sum())
    return correct / features.shape[0]


def _check_inputs(features: Tensor, labels: Tensor, num_classes: int) -> None:
    if features.ndim != 2 or labels.shape != (features.shape[0],) or features.shape[0] == 0:
        raise ValueError(
            f"train_probe: need features (N, D) and labels (N,) with N > 0, "
            f"got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"train_probe: labels must lie in [0, {num_classes}), "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )
