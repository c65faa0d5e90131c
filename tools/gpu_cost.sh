#!/usr/bin/env bash
# For a lent GPU machine: the loss-cost benchmark (tools/bench_icnn_cost.py) at its full budget
# (bases of 6 epochs x 60 000 Fashion-MNIST images, fine-tune epochs of 60 000 images, the 10 000
# test images), float32 on CUDA, one process per (model, base) and one synthetic-parts process per
# model, all at once. Rows are cached in $CACHE as they finish, so a run cut short keeps what it
# measured and a second run resumes. Results: $OUT/icnn_cost_gpu.{json,md}.
#
#     BASES=3 DEADLINE=420 bash tools/gpu_cost.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-tools/results}
CACHE=${CACHE:-runs/bench_icnn_cost_gpu}
BASES=${BASES:-3}
DEADLINE=${DEADLINE:-420}  # seconds for the training processes; rows finished by then are kept
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
mkdir -p "$CACHE" "$OUT"
# most informative first: each process runs its variants in this order
VARIANTS=plain@e1,top1@e1,plain@e2,top1+unmask-ce@e2,top1+unmask-kd@e2,top1-b2+unmask-ce@e2
RESNET_EXTRA=inner@e1,inner+unmask-ce@e2
LATE=plain@e3,top1+unmask-ce@e3,mask-only@e1,loss-only@e1
# EXTRA: more options for every process (a later option wins), e.g. a tiny budget for a dry run
# on the CPU: EXTRA="--device cpu --base-epochs 1 --base-images 256 --ft-images 128 ..."
read -r -a extra <<<"${EXTRA:-}"
common=(--device cuda --threads 2 --bases "$BASES" --cache "$CACHE" "${extra[@]}")
part=(--out-dir "$CACHE/partial")  # each worker's own summary; the merged one goes to $OUT
for m in vgg_small resnet_cifar20; do
  v=$VARIANTS
  [ "$m" = resnet_cifar20 ] && v=$v,$RESNET_EXTRA
  v=$v,$LATE
  for ((b = 0; b < BASES; b++)); do
    timeout "$DEADLINE" "$PY" tools/bench_icnn_cost.py "${common[@]}" "${part[@]}" --models "$m" --variants "$v" \
      --part fashion --base-index "$b" >"$CACHE/log_${m}_b$b.txt" 2>&1 &
  done
  timeout "$DEADLINE" "$PY" tools/bench_icnn_cost.py "${common[@]}" "${part[@]}" --models "$m" --variants "$v" \
    --part synthetic >"$CACHE/log_${m}_synthetic.txt" 2>&1 &
done
wait
tail -n 3 "$CACHE"/log_*.txt
"$PY" tools/bench_icnn_cost.py "${common[@]}" --write-only --name icnn_cost_gpu --out-dir "$OUT"
