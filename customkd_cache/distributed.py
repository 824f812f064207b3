"""Data parallelism for stage two under ``torchrun`` (PyTorch's own launcher).

``torchrun --nproc-per-node=N -m customkd_cache train ...`` sets ``RANK``/``WORLD_SIZE``; each rank
computes the loss on its share of every batch, gradients are averaged across ranks with one
all-reduce per step (the arithmetic of ``DistributedDataParallel``, without its bucketing and
overlap, which keeps optional modules such as projectors out of DDP's unused-parameter checks), and
rank 0 evaluates and writes. BatchNorm running statistics are taken from rank 0 before each
evaluation. Backend: nccl on CUDA, gloo on CPU. A single process needs none of this: ``Dist`` is
then a no-op.
"""

from __future__ import annotations

import os
from types import TracebackType

import torch
import torch.distributed as tdist
from torch import nn


class Dist:
    """This process's place in the job; a context manager that tears the process group down."""

    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device) -> None:
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device

    @classmethod
    def from_env(cls, device: str) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device != "cpu"
        dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if world > 1 and not tdist.is_initialized():
            tdist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(rank, world, local, dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __enter__(self) -> Dist:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.world > 1 and tdist.is_initialized():
            tdist.destroy_process_group()

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum every gradient across ranks and divide by the world size (one flat all-reduce)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            if p.grad is None:
                p.grad = flat[offset : offset + n].view_as(p).clone()
            else:
                p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    def mean_over_ranks(self, sums: dict[str, float], count: int) -> dict[str, float]:
        """Per-key mean of values summed over ``count`` steps on every rank."""
        keys = sorted(sums)
        if self.world > 1:
            t = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64)
            tdist.all_reduce(t)
            sums, count = dict(zip(keys, t[:-1].tolist(), strict=True)), int(t[-1])
        return {k: sums[k] / max(count, 1) for k in keys}

    def sync_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
        if self.world == 1:
            return
        for b in module.buffers():
            tdist.broadcast(b, src=0)
