#!/usr/bin/env bash
# The GPU check: stage one ViT-L/14 in teacher.precision fp32 / tf32 / bf16 (views/s, cosine to fp32),
# stage two MobileNetV3-L step time with and without autocast, CPU vs GPU decode (run.decode),
# and LOCAL_RANK + nccl under a single-process torchrun. Under 8 minutes on one H100.
# Results: $OUT_DIR/gpu_check*.json (default runs/gpu_check, or $OUT/gpu_check when $OUT is set).
#   benchmarks/gpu_check.sh                   # on a GPU machine
#   GPU_CHECK_CPU=1 benchmarks/gpu_check.sh   # the same path on the CPU, tiny sizes (tested)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -z "${OUT_DIR:-}" ]; then
  if [ -n "${OUT:-}" ]; then OUT_DIR=$OUT/gpu_check; else OUT_DIR=runs/gpu_check; fi
fi
export OUT_DIR HF_HUB_OFFLINE=1
start=$(date +%s)
"$PY" -m benchmarks.gpu_check --out "$OUT_DIR"
"$PY" -m torch.distributed.run --standalone --nproc-per-node=1 -m benchmarks.gpu_check --dist --out "$OUT_DIR"
echo "gpu_check: done in $(( $(date +%s) - start )) s; results in $OUT_DIR"
