#!/usr/bin/env bash
# For a lent GPU machine: the loss-cost benchmark (tools/bench_icnn_cost.py) at its full budget
# (bases of 6 epochs x 60 000 Fashion-MNIST images, fine-tune epochs of 60 000 images, the 10 000
# test images), float32 on CUDA, one process per (model, base, variant group) and one
# synthetic-parts process per model, all at once; processes on one base wait for the one that
# trains it. Rows are cached in $CACHE as they finish, so a run cut short keeps what it measured
# and a second run resumes. Results: $OUT/icnn_cost_gpu.{json,md}.
#
#     BASES=3 DEADLINE=420 bash tools/gpu_cost.sh
#
# Settings (environment): MODELS (comma-separated), BASES (how many), FIRST_BASE (the first base's
# index and training seed: 3 adds bases 3, 4, ... to a table made of bases 0-2), VARIANT_GROUPS (variant
# groups separated by ';', each run by its own process per base; default: the lists below, one
# group), SYNTHETIC=0 (no location-instability rows), SYN_SEEDS (synthetic-parts bases, e.g. 0,1,2),
# SYN_VARIANTS (the synthetic processes' variants; default: every group's), DEADLINE (seconds),
# CACHE, OUT, NAME (results file stem), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-tools/results}
CACHE=${CACHE:-runs/bench_icnn_cost_gpu}
MODELS=${MODELS:-vgg_small,resnet_cifar20}
BASES=${BASES:-3}
FIRST_BASE=${FIRST_BASE:-0}
SYNTHETIC=${SYNTHETIC:-1}
SYN_SEEDS=${SYN_SEEDS:-0}  # synthetic-parts bases (seeds), one process each
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
common=(--device cuda --threads 2 --cache "$CACHE" "${extra[@]}")
part=(--out-dir "$CACHE/partial")  # each worker's own summary; the merged one goes to $OUT
IFS=, read -r -a models <<<"$MODELS"
for m in "${models[@]}"; do
  if [ -n "${VARIANT_GROUPS:-}" ]; then
    IFS=';' read -r -a groups <<<"$VARIANT_GROUPS"
  else
    v=$VARIANTS
    [ "$m" = resnet_cifar20 ] && v=$v,$RESNET_EXTRA
    groups=("$v,$LATE")
  fi
  for ((b = FIRST_BASE; b < FIRST_BASE + BASES; b++)); do
    for g in "${!groups[@]}"; do
      timeout "$DEADLINE" "$PY" tools/bench_icnn_cost.py "${common[@]}" "${part[@]}" --models "$m" \
        --variants "${groups[$g]}" --part fashion --base-index "$b" --worker "g$g" \
        >"$CACHE/log_${m}_b${b}_g$g.txt" 2>&1 &
    done
  done
  if [ "$SYNTHETIC" != 0 ]; then
    all=$(IFS=,; echo "${groups[*]//;/,}")
    for s in ${SYN_SEEDS//,/ }; do
      timeout "$DEADLINE" "$PY" tools/bench_icnn_cost.py "${common[@]}" "${part[@]}" --models "$m" \
        --variants "${SYN_VARIANTS:-$all}" --part synthetic --syn-seed "$s" --worker "s$s" \
        >"$CACHE/log_${m}_synthetic_s$s.txt" 2>&1 &
    done
  fi
done
wait
tail -n 3 "$CACHE"/log_*.txt
"$PY" tools/bench_icnn_cost.py "${common[@]}" --models "$MODELS" --bases $((FIRST_BASE + BASES)) \
  --write-only --name "${NAME:-icnn_cost_gpu}" --out-dir "$OUT"
