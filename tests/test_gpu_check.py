"""benchmarks/gpu_check.sh in its CPU dry mode: the same code path as on a GPU, tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_mode_measures_every_part(tmp_path: Path) -> None:
    env = dict(
        os.environ, GPU_CHECK_CPU="1", OUT_DIR=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1"
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OUT"):
        env.pop(key, None)
    proc = subprocess.run(
        [str(REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    main = json.loads((tmp_path / "gpu_check.json").read_text())
    assert main["mode"] == "cpu-dry"
    one, two = main["stage_one"], main["stage_two"]
    assert one["fp32_views_per_s"] > 0 and one["bf16_views_per_s"] > 0
    assert 0.99 < one["bf16_cosine_min"] <= one["bf16_cosine_mean"] <= 1.0
    assert one["bf16_resolves_to"] == "bf16-autocast"
    assert one["auto_resolves_to"] == one["tf32_resolves_to"] == "fp32"  # on the CPU
    assert two["fp32_ms_per_step"] > 0 and two["bf16_autocast_ms_per_step"] > 0
    dec = main["decode"]
    assert dec["cpu_worker_items_per_s"] > 0 and dec["gpu_to_device_items_per_s"] > 0
    assert (
        dec["gpu_items_decoded_on_device"] == dec["images"] * dec["views"]
    )  # every JPEG took the device path
    dist = json.loads((tmp_path / "gpu_check_dist.json").read_text())["dist"]
    assert dist == dist | {"local_rank": 0, "device": "cpu", "device_ok": True, "all_reduce_ok": True}
