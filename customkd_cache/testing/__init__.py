"""Test support shipped with the package (as ``zarr.testing`` is): ``fakedata`` writes tiny datasets in
the real on-disk layouts (OfficeHome, DomainNet, CIFAR, ImageNet, Fashion-MNIST, image folders, list
files) for tests, benchmarks and smoke runs. Nothing in the pipeline imports it."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m customkd_cache ARGS`` in a fresh process; with ``check``, a non-zero exit raises
    AssertionError carrying both output streams."""
    proc = subprocess.run(
        [sys.executable, "-m", "customkd_cache", *args], env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def run_gloo_ranks(
    script: str, args: list[str], env: dict[str, str], *, world: int = 2, timeout: float = 300
) -> list[tuple[int, str, str]]:
    """``python SCRIPT ARGS`` as ``world`` ranks of one job on this machine (RANK, LOCAL_RANK,
    WORLD_SIZE and a free MASTER_PORT set, as torchrun sets them): each rank's exit code, stdout and
    stderr. Every rank is killed once the first ``timeout`` seconds of waiting are over."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = env | {"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [
        subprocess.Popen(
            [sys.executable, script, *args],
            env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]
