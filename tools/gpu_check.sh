#!/usr/bin/env bash
# For a lent GPU machine (its own python3 with torch): CUDA training with the loss, ONNX export,
# ONNX Runtime (CUDA provider where installed), and the overhead benchmark on CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-tools/results}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python3 tools/gpu_check.py --steps "${STEPS:-150}" --out "$OUT/gpu_check.json"
# the step overhead of the loss (three settings) and the fused-vs-eager parity tests on CUDA
OUT=$OUT PYTHON=python3 bash tools/gpu_overhead.sh
