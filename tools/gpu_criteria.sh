#!/usr/bin/env bash
# For a lent GPU machine: the criteria benchmark (tools/bench_criteria.py) at the full budget, with
# the base models, fine-tunes and recoveries trained on CUDA (float32) and WORKERS processes sharing
# one cache (--worker K/N) for the CPU side (pruning, compensation, ONNX Runtime top-1). Rows are
# cached as they finish, so a run cut short by DEADLINE keeps what it measured and a later run (on
# this machine or the CPU) resumes it. Results: $OUT_DIR/criteria.json and criteria.md.
#
#     MODELS=resnet_cifar20 WORKERS=12 DEADLINE=500 bash tools/gpu_criteria.sh
#
# Settings (environment): MODELS, WORKERS, DEADLINE (seconds), DEVICE (default cuda), CACHE,
# OUT_DIR, PYTHON, and EXTRA
# (more bench_criteria options; the defaults below are the recipes' defaults at the full budget).
set -uo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-resnet_cifar20}
WORKERS=${WORKERS:-12}
DEADLINE=${DEADLINE:-500}
CACHE=${CACHE:-runs/bench_criteria_full_auto}
OUT_DIR=${OUT_DIR:-runs/criteria_full_auto_out}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
read -r -a extra <<<"${EXTRA:-}"
args=(--models "$MODELS" --criteria icnn-cluster,icnn-cluster@plain,l1,l2 --kd-teacher auto
  --refit-teacher auto --compensation on --bases 2 --seeds 2 --finetune-epochs 3 --masked-epochs 1
  --latency-repeats 0 --threads 1 --device "${DEVICE:-cuda}" --cache "$CACHE" "${extra[@]}")
mkdir -p "$CACHE" "$OUT_DIR"
for ((k = 0; k < WORKERS; k++)); do
  timeout "$DEADLINE" "$PY" tools/bench_criteria.py "${args[@]}" --worker "$k/$WORKERS" \
    --out-dir "$CACHE/partial_w$k" >"$CACHE/log_w$k.txt" 2>&1 &
done
wait
tail -n 2 "$CACHE"/log_w*.txt
"$PY" tools/bench_criteria.py "${args[@]}" --write-only --out-dir "$OUT_DIR"
