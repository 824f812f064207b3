"""Collectives under a process group whose device is not the CPU (nccl on CUDA), on a CPU machine.

A fake process group stands in for nccl: it refuses a tensor on any device but the group's, as nccl
refuses CPU tensors ("No backend type associated with device type cpu"). The group's device is
``meta`` (no data, available everywhere), so a collective that builds its tensor on the CPU fails.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as tdist
from torch import nn

from customkd_cache.distributed import Dist

GROUP_DEVICE = torch.device("meta")


class _Reached(Exception):
    """The collective got a tensor on the group's device (nothing further can run on ``meta``)."""


def _fake_collective(t: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    if t.device != GROUP_DEVICE:
        raise RuntimeError(f"No backend type associated with device type {t.device.type}")
    raise _Reached


@pytest.fixture
def dist(monkeypatch: pytest.MonkeyPatch) -> Dist:
    monkeypatch.setattr(tdist, "all_reduce", _fake_collective)
    monkeypatch.setattr(tdist, "broadcast", _fake_collective)
    return Dist(rank=0, world=2, local_rank=0, device=GROUP_DEVICE)


def test_mean_over_ranks_reduces_on_the_group_device(dist: Dist) -> None:
    with pytest.raises(_Reached):
        dist.mean_over_ranks({"loss": 1.0}, 2)


def test_average_gradients_reduces_on_the_group_device(dist: Dist) -> None:
    p = nn.Parameter(torch.zeros(3, device=GROUP_DEVICE))
    with pytest.raises(_Reached):
        dist.average_gradients([p])


def test_sync_buffers_broadcasts_on_the_group_device(dist: Dist) -> None:
    with pytest.raises(_Reached):
        dist.sync_buffers(nn.BatchNorm1d(3).to(GROUP_DEVICE))


def test_one_process_needs_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tdist, "all_reduce", _fake_collective)
    single = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    assert single.mean_over_ranks({"a": 4.0, "b": 2.0}, 2) == {"a": 2.0, "b": 1.0}


def test_all_true_reduces_on_the_group_device(dist: Dist) -> None:
    with pytest.raises(_Reached):
        dist.all_true(torch.tensor(True))


def test_all_true_of_one_process_is_its_flag() -> None:
    single = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    assert single.all_true(torch.tensor(True)) and not single.all_true(
        torch.isfinite(torch.tensor(float("nan")))
    )
