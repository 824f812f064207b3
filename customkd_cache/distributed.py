"""Data parallelism for stage two under ``torchrun`` (PyTorch's own launcher).

``torchrun --nproc-per-node=N -m customkd_cache train ...`` sets ``RANK``/``WORLD_SIZE``; each rank
computes the loss on its own batches of ``optim.batch_size`` (per GPU), gradients are averaged across
ranks with one all-reduce per step (the arithmetic of ``DistributedDataParallel``, without its
bucketing and overlap, which keeps optional modules such as projectors out of DDP's unused-parameter
checks), rank 0 trains stage A and broadcasts it, evaluation is shared (counts summed), and rank 0
writes. BatchNorm running statistics are taken from rank 0 before each
evaluation. Backend: nccl on CUDA, gloo on CPU; every collective's tensor lives on the process
group's device (``Dist.device``), since nccl has no CPU tensors. A single process needs none of
this: ``Dist`` is then a no-op. ``resolve_device`` turns ``run.device`` into a torch device for
both stages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from types import TracebackType

import torch
import torch.distributed as tdist
from torch import nn

from customkd_cache.errors import SpecError


def resolve_device(name: str) -> torch.device:
    """``run.device`` as a torch device: ``"auto"`` -> ``cuda`` when available, else ``cpu``.

    ``cuda`` without an index (``"auto"`` included) is ``cuda:LOCAL_RANK`` under ``torchrun``, so
    each rank of a node gets its own GPU (``cuda`` alone would put every rank on GPU 0).

    Raises SpecError for a name that is not a device, a CUDA device this machine does not have, and
    when CUDA is unusable although a GPU is visible (``run.device = "auto"`` included: a silent fall
    back to the CPU would run orders of magnitude slower).
    """
    if name != "auto":
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise SpecError(
                f"run.device = {name!r}: not a device name; use auto, cpu, cuda or cuda:N"
            ) from None
        if dev.type != "cuda":
            return dev
    available = torch.cuda.is_available()
    if not available:
        gpu = visible_gpu()
        if gpu:
            raise SpecError(
                f"run.device = {name!r}: a GPU is visible ({gpu}) but CUDA cannot initialise with this "
                f"torch {torch.__version__} (built for CUDA {torch.version.cuda}); install a torch build "
                "matching the NVIDIA driver (see nvidia-smi), or set run.device = 'cpu'"
            )
        if name == "auto":
            return torch.device("cpu")
    count = torch.cuda.device_count() if available else 0
    index = torch.device(name).index if name != "auto" else None
    if index is None and "LOCAL_RANK" in os.environ:
        index = _env_int("LOCAL_RANK", os.environ["LOCAL_RANK"])
        if index < 0:
            raise SpecError(f"LOCAL_RANK={index}: must be >= 0; {_RANKS_FIX}")
        if count and index >= count:
            raise SpecError(
                f"LOCAL_RANK={index}: this machine has {count} CUDA device(s); start at most {count} "
                "processes per node (torchrun --nproc-per-node)"
            )
    if count == 0 or (index is not None and index >= count):
        raise SpecError(
            f"run.device = {name!r}: this machine has {count} CUDA device(s); "
            "use run.device = 'auto' or 'cpu'"
        )
    return torch.device("cuda", index) if index is not None else torch.device("cuda")


def ranks_from_env() -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` as ``torchrun`` sets them; ``(0, 1, 0)`` when unset.

    Raises SpecError naming the variable when one is not an integer, when ``WORLD_SIZE < 1``, or when
    ``RANK`` or ``LOCAL_RANK`` is outside ``0..WORLD_SIZE-1`` (a stale or mistyped environment would
    otherwise end in a traceback, or compute the wrong share).
    """
    texts = {k: os.environ.get(k, d) for k, d in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"))}
    rank, world, local = (_env_int(name, text) for name, text in texts.items())
    if world < 1:
        raise SpecError(
            f"WORLD_SIZE={texts['WORLD_SIZE']!r}: the number of processes must be >= 1; {_RANKS_FIX}"
        )
    # LOCAL_RANK is bounded by torchrun's LOCAL_WORLD_SIZE when set: a sweep under torchrun runs each
    # rank's points as one process (WORLD_SIZE=1) on the rank's own GPU (LOCAL_RANK kept)
    local_world = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    bound = ("LOCAL_WORLD_SIZE", local_world) if local_world else ("WORLD_SIZE", texts["WORLD_SIZE"])
    limits = {"RANK": world, "LOCAL_RANK": _env_int(*bound) if local_world else world}
    for name, value in (("RANK", rank), ("LOCAL_RANK", local)):
        key, text = ("WORLD_SIZE", texts["WORLD_SIZE"]) if name == "RANK" else bound
        if not 0 <= value < limits[name]:
            raise SpecError(
                f"{name}={texts[name]!r} with {key}={text!r}: need 0 <= {name} < {key}; {_RANKS_FIX}"
            )
    return rank, world, local


def _env_int(name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise SpecError(f"{name}={text!r}: not an integer; {_RANKS_FIX}") from None


_RANKS_FIX = "torchrun sets them; unset RANK, WORLD_SIZE and LOCAL_RANK to run as one process"


def _check_rendezvous(world: int) -> None:
    """Several ranks meet at ``MASTER_ADDR:MASTER_PORT`` (torchrun sets both); without them the
    process group would fail with a traceback."""
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise SpecError(
            f"WORLD_SIZE={world} without {' and '.join(missing)}: the ranks have nowhere to meet; start "
            f"the job with torchrun --nproc-per-node={world} -m customkd_cache ..., or unset RANK, "
            "WORLD_SIZE and LOCAL_RANK to run as one process"
        )


def visible_gpu() -> str:
    """A visible NVIDIA GPU (``/dev/nvidia0``, or what ``nvidia-smi -L`` lists), or ``""``.

    GPUs hidden on purpose (``CUDA_VISIBLE_DEVICES`` empty or ``-1``) count as not visible.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return ""
    if Path("/dev/nvidia0").exists():
        return "/dev/nvidia0"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ""
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    first = next((line for line in listed.splitlines() if line.startswith("GPU ")), "")
    return first.split(" (UUID")[0]


def describe_device(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``: the line the commands print before they compute."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


class Dist:
    """This process's place in the job; a context manager that tears the process group down."""

    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device) -> None:
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device

    @classmethod
    def from_env(cls, device: str, *, timeout_s: float = 1800.0) -> Dist:
        """This process's rank, world and device from torchrun's environment; the process group
        (several ranks) gets ``timeout_s`` for every collective, so a rank that waits on a dead or
        diverged peer fails with an error instead of hanging."""
        rank, world, local = ranks_from_env()
        if world > 1:
            _check_rendezvous(world)
        dev = resolve_device(device)  # cuda:LOCAL_RANK under torchrun
        use_cuda = dev.type == "cuda"
        if use_cuda and world > 1:
            dev = torch.device("cuda", local)  # one GPU per rank, whatever index run.device names
        if use_cuda:
            torch.cuda.set_device(dev)  # nccl's collectives and barriers use the current device
        if world > 1 and not tdist.is_initialized():
            tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
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

    def all_true(self, flag: torch.Tensor) -> bool:
        """Whether ``flag`` (a boolean scalar, on any device) holds on every rank: one all-reduce.

        Every rank must call it at the same point; all then take the same branch (a rank that raised
        alone would leave the others waiting in their next collective).
        """
        if self.world == 1:
            return bool(flag)
        t = flag.detach().reshape(1).to(device=self.device, dtype=torch.int32)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return bool(t.item())

    def min_over_ranks(self, value: torch.Tensor) -> int:
        """The smallest of an integer scalar (on any device) over every rank: one all-reduce, and the
        one host read of ``value``. Every rank must call it at the same point."""
        if self.world == 1:
            return int(value)
        t = (
            value.detach().reshape(1).to(device=self.device, dtype=torch.int64).clone()
        )  # never reduce in place
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return int(t.item())

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum every gradient across ranks and divide by the world size (one flat all-reduce)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
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
            values = [sums[k] for k in keys] + [float(count)]
            t = torch.tensor(values, dtype=torch.float64, device=self.device)
            tdist.all_reduce(t)
            reduced = t.cpu().tolist()
            sums, count = dict(zip(keys, reduced[:-1], strict=True)), int(reduced[-1])
        return {k: sums[k] / max(count, 1) for k in keys}

    def sum_over_ranks(self, values: list[int]) -> list[int]:
        """Element-wise sums of integer counts over every rank (one all-reduce)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        tdist.all_reduce(t)
        return [int(v) for v in t.cpu().tolist()]

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's (n_r, ...) tensor concatenated in rank order (n_r may differ), on every rank,
        on the CPU: one all-gather of the sizes, one of the rows (padded to the largest share)."""
        if self.world == 1:
            return t.cpu()
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        tdist.all_gather(sizes, n)
        counts = [int(x.item()) for x in sizes]
        padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[: t.shape[0]] = t.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        tdist.all_gather(parts, padded)
        return torch.cat([p[:c].cpu() for p, c in zip(parts, counts, strict=True)])

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers of ``module`` to every rank."""
        if self.world == 1:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                self._broadcast(t)

    def _broadcast(self, t: torch.Tensor) -> None:
        if t.device == self.device:
            tdist.broadcast(t, src=0)
        else:  # a tensor kept elsewhere travels through the group's device
            on_group = t.to(self.device)
            tdist.broadcast(on_group, src=0)
            t.copy_(on_group)

    def sync_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
        if self.world == 1:
            return
        for b in module.buffers():
            self._broadcast(b)
