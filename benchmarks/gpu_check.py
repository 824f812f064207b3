"""The GPU check (``benchmarks/gpu_check.sh``): what one accelerator gives the two stages.

- stage one: a ViT-L/14 teacher (``vit_large_patch14_dinov2``, random init: throughput and the bf16
  error do not need trained weights) at 224 px in each ``teacher.precision`` (fp32 with TF32 off,
  tf32, bf16 autocast; and what ``auto`` resolves to): views/s, and the mean and minimum cosine of
  the tf32 and bf16 features to the fp32 ones of the same images;
- stage two: a MobileNetV3-Large student at 224 px, one optimizer step (forward, CE, backward, SGD)
  with and without bf16 autocast: milliseconds per step and images/s;
- stage two's input: items/s of one CPU worker decoding (``run.decode = "cpu"``) against the batched
  device decode (``run.decode = "gpu"``), on photo-like JPEGs;
- ``--dist`` (run under ``torchrun --nproc-per-node=1``): LOCAL_RANK -> device mapping of
  ``Dist.from_env`` and a process group initialised with nccl (gloo on CPU) that all-reduces.

``GPU_CHECK_CPU=1``: the same code path on the CPU with tiny sizes (a test ViT and MobileNetV3-Small
at 32 px, batches of 4), so the check itself is tested where no GPU is. Results are printed and
written to ``OUT_DIR/gpu_check.json`` (``--dist``: ``gpu_check_dist.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

CPU = os.environ.get("GPU_CHECK_CPU", "") == "1"
SIZES: dict[str, Any] = (
    {
        "teacher": "test_vit",
        "teacher_px": 32,
        "teacher_batch": 4,
        "student": "mobilenetv3_small_050",
        "student_px": 32,
        "student_batch": 4,
        "steps": 1,
        "warmup": 1,
        "classes": 10,
    }
    if CPU
    else {
        "teacher": "vit_large_patch14_dinov2",
        "teacher_px": 224,
        "teacher_batch": 64,
        "student": "mobilenetv3_large_100",
        "student_px": 224,
        "student_batch": 128,
        "steps": 20,
        "warmup": 2,
        "classes": 65,
    }
)


def _device() -> torch.device:
    if CPU:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (set GPU_CHECK_CPU=1 for the CPU dry mode)")
    return torch.device("cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls, after ``SIZES["warmup"]`` warm-up calls."""
    for _ in range(SIZES["warmup"]):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def stage_one(device: torch.device) -> dict[str, Any]:
    """ViT-L/14 views/s through the project's teacher for each ``teacher.precision`` (fp32, tf32, bf16,
    and what ``auto`` resolves to here), and the cosine of tf32 and bf16 features to fp32."""
    from customkd_cache.models.teachers import create_teacher, fidelity_cosine
    from customkd_cache.specs import TeacherSpec

    size, batch = SIZES["teacher_px"], SIZES["teacher_batch"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    out: dict[str, Any] = {"teacher": SIZES["teacher"], "px": size, "batch": batch}
    for precision in ("fp32", "tf32", "bf16", "auto"):
        spec = TeacherSpec(
            name=SIZES["teacher"], weights="random", input_size=size, feature="cls", precision=precision
        )
        teacher = create_teacher(spec, device=device)
        out[f"{precision}_resolves_to"] = teacher.precision
        if precision != "auto":
            sec = _timed(lambda t=teacher: t.features(x), SIZES["steps"], device)
            out[f"{precision}_views_per_s"] = round(batch / sec, 1)
            if precision != "fp32":  # the same float32 weights, run in fp32: what stage one records
                cosine = fidelity_cosine(teacher, x, batch_size=batch)
                out[f"{precision}_cosine_mean"] = round(cosine["mean"], 6)
                out[f"{precision}_cosine_min"] = round(cosine["min"], 6)
        del teacher
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def stage_two(device: torch.device) -> dict[str, Any]:
    """MobileNetV3-L step time at 224 px, fp32 and under bf16 autocast."""
    from customkd_cache.models.students import create_student
    from customkd_cache.specs import StudentSpec

    size, batch = SIZES["student_px"], SIZES["student_batch"]
    student = create_student(
        StudentSpec(name=SIZES["student"], input_size=size), num_classes=SIZES["classes"]
    ).to(device)
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, SIZES["classes"], (batch,), generator=gen).to(device)
    out: dict[str, Any] = {"student": SIZES["student"], "px": size, "batch": batch}
    for name, autocast in (("fp32", False), ("bf16_autocast", True)):

        def step(autocast: bool = autocast) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits, _, _ = student.forward_parts(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        sec = _timed(step, SIZES["steps"], device)
        out[f"{name}_ms_per_step"] = round(1000 * sec, 2)
        out[f"{name}_images_per_s"] = round(batch / sec, 1)
    return out


def decode(device: torch.device) -> dict[str, Any]:
    """Stage two's input at the student's size: items/s of one CPU worker (``run.decode = "cpu"``, the
    reduced JPEG decode) against the batched device decode (``run.decode = "gpu"``: the worker reads
    the bytes, ``ReplayDataset.to_device`` decodes, crops and resizes on ``device``), on photo-like
    JPEGs in ``benchmarks/bench_loader.py``'s size mix."""
    import tempfile

    from benchmarks.bench_loader import image_sizes, replay
    from customkd_cache.specs import ViewsSpec
    from customkd_cache.testing.fakedata import photo_views_store

    size = SIZES["student_px"]
    sizes = [(320, 240), (240, 320), (300, 300), (640, 480)] if CPU else image_sizes(32, seed=0)
    views = ViewsSpec.model_validate({"num_views": 4, "seed": 0})
    out: dict[str, Any] = {"images": len(sizes), "views": views.num_views, "px": size}
    with tempfile.TemporaryDirectory(prefix="gpu_check_decode_") as tmp:
        dataset, store = photo_views_store(Path(tmp), sizes, views)
        cpu = replay(dataset, store, size, "bilinear", reduced=True)
        gpu = replay(dataset, store, size, "bilinear", reduced=True, decode="gpu")
        n = len(cpu)
        t0 = time.perf_counter()
        for k in range(n):
            _ = cpu[k]  # the rendered view, as a worker makes it
        out["cpu_worker_items_per_s"] = round(n / (time.perf_counter() - t0), 1)
        t0 = time.perf_counter()
        items = [gpu[k] for k in range(n)]  # the bytes and boxes to_device decodes below
        out["gpu_worker_items_per_s"] = round(n / (time.perf_counter() - t0), 1)
        batch = gpu.collate(items)
        out["gpu_items_decoded_on_device"] = len(batch.get("jpeg", []))
        sec = _timed(lambda: gpu.to_device(batch, device), SIZES["steps"], device)
        out["gpu_to_device_items_per_s"] = round(n / sec, 1)
    return out


def dist_check() -> dict[str, Any]:
    """Under torchrun: Dist.from_env's device for LOCAL_RANK, and an all-reduce over nccl (gloo)."""
    import torch.distributed as tdist

    from customkd_cache.distributed import Dist

    local = int(os.environ["LOCAL_RANK"])
    dist = Dist.from_env("cpu" if CPU else "auto")
    want = torch.device("cpu") if CPU else torch.device(f"cuda:{local}")
    backend = "gloo" if CPU else "nccl"
    t0 = time.perf_counter()
    if not tdist.is_initialized():
        tdist.init_process_group(backend)
    t = torch.ones(4, device=dist.device) * (dist.rank + 1)
    tdist.all_reduce(t)
    world = tdist.get_world_size()
    ok = float(t[0]) == world * (world + 1) / 2
    tdist.destroy_process_group()
    return {
        "local_rank": local,
        "device": str(dist.device),
        "device_ok": dist.device == want,
        "backend": backend,
        "init_and_all_reduce_s": round(time.perf_counter() - t0, 3),
        "all_reduce_ok": ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", action="store_true", help="the torchrun part only")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT_DIR", "runs/gpu_check")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dist:
        result: dict[str, Any] = {"dist": dist_check()}
        name = "gpu_check_dist.json"
    else:
        device = _device()
        torch.manual_seed(0)
        result = {
            "mode": "cpu-dry" if CPU else "gpu",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__,
        }
        for key, fn in (("stage_one", stage_one), ("stage_two", stage_two), ("decode", decode)):
            t0 = time.perf_counter()
            result[key] = fn(device)
            result[key]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"{key}: {json.dumps(result[key])}", flush=True)
        name = "gpu_check.json"
    if args.dist:
        print(f"dist: {json.dumps(result['dist'])}", flush=True)
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
