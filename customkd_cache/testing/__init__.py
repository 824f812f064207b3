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
