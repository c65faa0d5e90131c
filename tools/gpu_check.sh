#!/usr/bin/env bash
# For a lent GPU machine (its own python3 with torch): CUDA training with the loss, ONNX export,
# ONNX Runtime (CUDA provider where installed), and the overhead benchmark on CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-tools/results}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python3 tools/gpu_check.py --steps "${STEPS:-150}" --out "$OUT/gpu_check.json"
python3 tools/bench_icnn_overhead.py --device cuda --threads 2 --repeats 100 --out "$OUT/icnn_overhead_cuda.json"
# the fused and the op-by-op loss statistics give the same numbers on CUDA too
python3 -m pytest -q -p no:cacheprovider tests/icnn/test_fused.py
# a compute-bound step for comparison: resnet18 at 224x224, batch 64
python3 tools/bench_icnn_overhead.py --device cuda --threads 2 --repeats 30 --model resnet18 --input-size 224 \
  --in-channels 3 --out "$OUT/icnn_overhead_cuda_resnet18.json"
