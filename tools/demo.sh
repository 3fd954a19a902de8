#!/usr/bin/env bash
# The whole pipeline on the built-in shapes data, on CPU: `make demo` runs this inside .venv.
#   make_shapes -> SiMo+EqCo pretraining -> linear eval -> convert --verify
#   -> Faster R-CNN fine-tune from SiMo and from random init (same schedule) -> report
# Usage: tools/demo.sh [OUT_DIR]   (default output/demo). Re-running resumes finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/demo}
PY=${PY:-.venv/bin/python}
export DETECTRON2_DATASETS=${DETECTRON2_DATASETS:-datasets}
DATA=$DETECTRON2_DATASETS/shapes
mkdir -p "$OUT"
start=$(date +%s)
stage() { printf '\n==== [%s] %s (%ds elapsed)\n' "$(date +%H:%M:%S)" "$1" $(( $(date +%s) - start )); }

stage "1/6 built-in dataset -> $DATA"
if [ -f "$DATA/annotations/instances_val.json" ]; then
  echo "exists, reusing (delete $DATA to regenerate)"
else
  $PY tools/make_shapes.py --out "$DATA" --num-train 400 --num-val 100 --size 128 --seed 0 >/dev/null
  echo "wrote $DATA (400 train / 100 val images, 5 classes)"
fi

stage "2/6 SiMo + EqCo pretraining"
$PY tools/pretrain.py --config-file configs/pretrain/simo_shapes_cpu.yaml --resume \
  DATASETS.ROOT "$DATA/imagefolder" OUTPUT_DIR "$OUT/pretrain_simo"

stage "3/6 linear evaluation (cached features)"
$PY tools/lincls.py --config-file configs/lincls/shapes_cpu.yaml --cached-features \
  MODEL.WEIGHTS "$OUT/pretrain_simo/model_final.pth" DATASETS.ROOT "$DATA/imagefolder" \
  OUTPUT_DIR "$OUT/lincls_simo"

stage "4/6 convert to detectron2 weights, verified against the original backbone"
$PY tools/convert.py "$OUT/pretrain_simo/model_final.pth" "$OUT/simo.pkl" --verify --force \
  --lincls-dir "$OUT/lincls_simo"

stage "5/6 Faster R-CNN fine-tune: from SiMo, then from random init (same schedule)"
DET_ARCH=(MODEL.RESNETS.DEPTH "${DEMO_DEPTH:-18}" MODEL.RESNETS.RES2_OUT_CHANNELS 64)
$PY tools/train_det.py --config configs/shapes_fpn_cpu.yaml --resume "${DET_ARCH[@]}" \
  MODEL.WEIGHTS "$OUT/simo.pkl" OUTPUT_DIR "$OUT/det_simo"
$PY tools/train_det.py --config configs/shapes_fpn_cpu.yaml --resume "${DET_ARCH[@]}" \
  OUTPUT_DIR "$OUT/det_random_init"

stage "6/6 report"
$PY tools/report.py "$OUT" --out "$OUT/report"
echo
echo "demo finished in $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s; everything is in $OUT"
