"""Collectives under a process group whose device is not the CPU (nccl on CUDA), on a CPU machine;
the device each process resolves (one GPU per torchrun rank; no silent fall-back to the CPU).

A fake process group stands in for nccl: it refuses a tensor on any device but the group's, as nccl
refuses CPU tensors ("No backend type associated with device type cpu"). The group's device is
``meta`` (no data, available everywhere), so a collective that builds its tensor on the CPU fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as tdist
from torch import nn

from customkd_cache import distributed
from customkd_cache.distributed import Dist, resolve_device
from customkd_cache.errors import SpecError
from customkd_cache.specs import load_cache_spec
from customkd_cache.stage_one import extract
from customkd_cache.testing import fakedata

SMOKE_CACHE = Path(__file__).resolve().parents[1] / "cache_specs" / "smoke" / "officehome.toml"

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


# --- devices -----------------------------------------------------------------------------------


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with two usable GPUs, as far as device resolution can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_each_torchrun_rank_gets_its_own_gpu(two_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(SpecError, match="LOCAL_RANK=2.*2 CUDA device"):
        resolve_device("auto")


def test_one_process_keeps_the_current_gpu(two_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda")


def test_stage_one_builds_each_ranks_teacher_on_its_gpu(
    two_gpus: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Under torchrun rank 1's teacher is built directly on cuda:1 (not on cuda:0, nor on the CPU)."""
    built: list[torch.device] = []

    def create_teacher(spec: Any, *, spec_dir: Any = None, device: Any = "cpu") -> None:
        built.append(torch.device(device))
        raise _Reached

    root = fakedata.write_officehome(tmp_path / "oh", per_class=1)
    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(tmp_path / "caches"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(extract, "create_teacher", create_teacher)
    spec = load_cache_spec(SMOKE_CACHE, [f"dataset.root={root}", "run.device=auto"])
    with pytest.raises(_Reached):
        extract.run_cache(spec, spec_path=SMOKE_CACHE, shard=extract.Shard(), progress=False)
    assert built == [torch.device("cuda", 1)]


@pytest.mark.parametrize("asked", ["auto", "cuda"])
def test_an_unusable_visible_gpu_is_refused(asked: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent fall-back to the CPU when the GPU is there but this torch cannot use it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "visible_gpu", lambda: "/dev/nvidia0")
    with pytest.raises(SpecError, match=r"GPU is visible \(/dev/nvidia0\).*install a torch build"):
        resolve_device(asked)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(distributed, "visible_gpu", lambda: "")
    assert resolve_device("auto") == torch.device("cpu")


def test_hidden_gpus_are_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert distributed.visible_gpu() == ""
    assert distributed.describe_device(torch.device("cpu")) == "cpu"
