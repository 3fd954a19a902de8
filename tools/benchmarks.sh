#!/usr/bin/env bash
# The transfer benchmarks at CPU size, on the built-in shapes data: `make benchmarks` runs this after
# the demo (whose SiMo pretraining, linear evals and converted weights it reuses):
#   VOC07+12 Faster R-CNN C4, COCO Mask R-CNN C4 1x and FPN 1x (tools/benchmark.py --size shapes)
#   from the demo's SiMo ResNet-18 and from random init, each over SEEDS, then one report.
# Usage: tools/benchmarks.sh [DEMO_DIR]   (default output/demo). Finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/demo}
PY=${PY:-.venv/bin/python}
export DETECTRON2_DATASETS=${DETECTRON2_DATASETS:-datasets}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}   # one process of 2 threads, as the demo
SEEDS=${SEEDS:-0 1 2}
SUITE=${SUITE:-voc,coco_c4_1x,coco_fpn_1x}
DATA=$DETECTRON2_DATASETS/shapes
DET_ARCH=(MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64)
start=$(date +%s)

if [ ! -f "$OUT/simo.pkl" ] || [ ! -f "$OUT/lincls_simo/results.json" ]; then
  echo "no $OUT/simo.pkl or linear eval: run make demo first (the benchmarks fine-tune its SiMo backbone)"
  exit 2
fi
if [ ! -f "$DATA/VOC2007/ImageSets/Main/test.txt" ] || ! grep -q '"segmentation"' "$DATA/annotations/instances_val.json"; then
  # data drawn before masks and the VOC copy existed: the same images, boxes and seed as the demo's
  $PY tools/make_shapes.py --out "$DATA" --force --num-train 400 --num-val 100 \
    --num-train-objects 2000 --num-val-objects 1000 --size 128 --seed 0 >/dev/null
  echo "redrew $DATA with instance masks and its VOC copy (same images and boxes)"
fi

for who in simo random_init; do
  if [ "$who" = simo ]; then weights=(--weights "$OUT/simo.pkl"); else weights=(--pretraining random_init); fi
  printf '\n==== [%s] %s: %s, seeds %s (%ds elapsed)\n' "$(date +%H:%M:%S)" "$who" "$SUITE" "$SEEDS" $(( $(date +%s) - start ))
  log="$OUT/logs/benchmarks_$who.log"
  mkdir -p "$OUT/logs"
  echo "(full output: $log)"
  # shellcheck disable=SC2086
  if ! $PY tools/benchmark.py "${weights[@]}" --suite "$SUITE" --size shapes --seeds $SEEDS \
      --out "$OUT/benchmarks_$who" "${DET_ARCH[@]}" < /dev/null 2>&1 | tee -a "$log" \
      | { grep --line-buffered -E '^\[[0-9]+/[0-9]+\]|copypaste: [0-9]|error|Error|runs in' || true; }; then
    echo "FAILED; the end of $log:"; tail -n 30 "$log"; exit 1
  fi
done

printf '\n==== [%s] report\n' "$(date +%H:%M:%S)"
$PY tools/report.py "$OUT" --out "$OUT/report"
echo
echo "benchmarks finished in $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s; table in $OUT/report/report.md"
