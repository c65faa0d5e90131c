#!/usr/bin/env bash
# For a lent GPU machine: what the filter loss adds to a CUDA training step (step ratio, host time
# per part of the step, kernels, host synchronisations) on vgg_small at batch 64 and 256
# (launch-bound) and on resnet18 at 224 px (compute-bound); then the fused-vs-eager parity tests
# on CUDA. Each step is bounded by a timeout so that one slow compile cannot eat the machine's
# time; results: $OUT/icnn_overhead_cuda*.json.
#
#     bash tools/gpu_overhead.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-tools/results}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
bench=("$PY" tools/bench_icnn_overhead.py --device cuda --threads 2)
run() {  # seconds, then the command
  local s=$1
  shift
  echo "== $*"
  timeout "$s" "$@" 2>&1 | grep -v '^USDT' | tail -n 8
}
run 110 "${bench[@]}" --repeats 60 --out "$OUT/icnn_overhead_cuda.json"
run 200 "$PY" -m pytest -q -p no:cacheprovider tests/icnn/test_fused.py
run 80 "${bench[@]}" --repeats 30 --model resnet18 --input-size 224 --in-channels 3 \
  --out "$OUT/icnn_overhead_cuda_resnet18.json"
run 60 "${bench[@]}" --repeats 40 --batch 256 --out "$OUT/icnn_overhead_cuda_b256.json"
