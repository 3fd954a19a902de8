#!/usr/bin/env bash
# The whole pipeline on the built-in shapes data, on CPU: `make demo` runs this inside .venv.
#   make_shapes -> SiMo+EqCo pretraining -> linear eval (SiMo and random init) -> convert --verify
#   -> Faster R-CNN fine-tune from SiMo and from random init (same schedule) -> report
# Usage: tools/demo.sh [OUT_DIR]   (default output/demo). Re-running resumes or reuses finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/demo}
PY=${PY:-.venv/bin/python}
export DETECTRON2_DATASETS=${DETECTRON2_DATASETS:-datasets}
# Every stage is one process of 2 torch threads and at most one data-loader worker (measured on the
# 2-core machine, 2026-12-03: Faster R-CNN 1.56 s/iteration with 2 threads + 1 worker vs 2.46 with
# 1 thread + 2 workers, inference 0.24 vs 0.40 s/image; pretraining 0.30 vs 0.44 s/iteration; the
# linear eval 29 vs 32 s, same numbers). More threads or workers than cores is what makes it slow.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
DATA=$DETECTRON2_DATASETS/shapes
# the demo's backbone: ResNet-18 (ResNet-50 pretraining takes ~2 s/iter here, too slow for ~20 min)
ARCH=resnet18
DET_ARCH=(MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64)
# PRETRAIN_SEEDS="0 1 2" make demo: pretraining and both linear evals once per SEED (random init:
# the SEED that draws its weights), for the report's seeds table (mean +- sd); seed 0's runs are the
# plain directories, the ones detection is fine-tuned from; finished runs are reused
PRETRAIN_SEEDS=${PRETRAIN_SEEDS:-0}
case " $PRETRAIN_SEEDS " in
  *" 0 "*) ;;
  *) echo "PRETRAIN_SEEDS='$PRETRAIN_SEEDS' must include 0: detection is fine-tuned from seed 0's backbone."; exit 2 ;;
esac
sfx() { if [ "$1" = 0 ]; then echo ""; else echo "_s$1"; fi; }
mkdir -p "$OUT"
start=$(date +%s)
stage() { printf '\n==== [%s] %s (%ds elapsed)\n' "$(date +%H:%M:%S)" "$1" $(( $(date +%s) - start )); }
# Each stage's whole output goes to $OUT/logs/<stage>.log; the terminal shows its progress lines
# (with ETA), results and errors. On a failure the end of the log is printed.
mkdir -p "$OUT/logs"
SHOW='eta: |error|Error|Traceback|kNN monitor|Linear eval of|Sanity check|verify|^wrote|copypaste: [0-9]|Resumed|diverged|skipped|converted'
quiet() {
  local log="$OUT/logs/$1.log"; shift
  echo "(full output: $log)"
  if ! "$@" < /dev/null 2>&1 | tee -a "$log" | { grep --line-buffered -E "$SHOW" || true; } \
      | while IFS= read -r line; do printf '%s\n' "${line:0:160}"; done
  then
    echo "FAILED; the end of $log:"; tail -n 30 "$log"; exit 1
  fi
}

stage "1/7 built-in dataset -> $DATA"
if [ -f "$DATA/imagefolder/val/star/000998.jpg" ] && grep -q '"style": "grey"' "$DATA/annotations/instances_val.json"; then
  echo "exists, reusing it (delete $DATA to regenerate)"
else
  # a missing, partial or older (colour-style) dataset is redrawn
  $PY tools/make_shapes.py --out "$DATA" --force --num-train 400 --num-val 100 \
    --num-train-objects 2000 --num-val-objects 1000 --size 128 --seed 0 >/dev/null
  echo "wrote $DATA: 400 train / 100 val scenes with 1-4 grey shapes of 5 classes (COCO json)"
  echo "  and 2000 train / 1000 val single-shape images (ImageFolder, for pretraining and lincls)"
fi

stage "2/7 SiMo + EqCo pretraining ($ARCH, K=16, alpha=256, 1364 iterations, 5-18 min per seed depending on the CPU; seeds: $PRETRAIN_SEEDS)"
for seed in $PRETRAIN_SEEDS; do
  s=$(sfx "$seed")
  quiet "pretrain_simo$s" \
    $PY tools/pretrain.py --config-file configs/pretrain/simo_shapes_cpu.yaml --resume \
    MODEL.ARCH $ARCH DATASETS.ROOT "$DATA/imagefolder" NAME simo SEED "$seed" OUTPUT_DIR "$OUT/pretrain_simo$s"
done

stage "3/7 linear evaluation (cached features): SiMo, then a random-init $ARCH (seeds: $PRETRAIN_SEEDS)"
for seed in $PRETRAIN_SEEDS; do
  s=$(sfx "$seed")
  quiet "lincls_simo$s" $PY tools/lincls.py --config-file configs/lincls/shapes_cpu.yaml --cached-features \
    MODEL.ARCH $ARCH MODEL.WEIGHTS "$OUT/pretrain_simo$s/model_final.pth" DATASETS.ROOT "$DATA/imagefolder" \
    SEED "$seed" OUTPUT_DIR "$OUT/lincls_simo$s"
  $PY -c "import sys, torch, torchvision; torch.manual_seed(int(sys.argv[3])); \
torch.save(getattr(torchvision.models, sys.argv[1])().state_dict(), sys.argv[2])" $ARCH "$OUT/random_init$s.pth" "$seed"
  quiet "lincls_random_init$s" $PY tools/lincls.py --config-file configs/lincls/shapes_cpu.yaml \
    --cached-features MODEL.ARCH $ARCH MODEL.WEIGHTS "$OUT/random_init$s.pth" DATASETS.ROOT "$DATA/imagefolder" \
    NAME "random init" SEED "$seed" OUTPUT_DIR "$OUT/lincls_random_init$s"
done

stage "4/7 convert SiMo to detectron2 weights, verified against the original backbone"
quiet convert $PY tools/convert.py "$OUT/pretrain_simo/model_final.pth" "$OUT/simo.pkl" --verify --force \
  --lincls-dir "$OUT/lincls_simo" --config-file configs/shapes_fpn_cpu.yaml "${DET_ARCH[@]}"

# DET_SEEDS="0 1 2" make demo: each fine-tune once per detection SEED (the report adds their mean and
# sd); finished runs are reused, so after a plain make demo this adds only the new seeds' runs
DET_SEEDS=${DET_SEEDS:-0}
det_dir() { if [ "$2" = 0 ]; then echo "$OUT/det_$1"; else echo "$OUT/det_$1_s$2"; fi; }
stage "5/7 Faster R-CNN R18-FPN fine-tune from SiMo (detection seeds: $DET_SEEDS)"
for seed in $DET_SEEDS; do
  quiet "$(basename "$(det_dir simo "$seed")")" $PY tools/train_det.py --config configs/shapes_fpn_cpu.yaml --resume \
    "${DET_ARCH[@]}" MODEL.WEIGHTS "$OUT/simo.pkl" SEED "$seed" OUTPUT_DIR "$(det_dir simo "$seed")"
done

stage "6/7 the same fine-tune from random init (detection seeds: $DET_SEEDS)"
for seed in $DET_SEEDS; do
  quiet "$(basename "$(det_dir random_init "$seed")")" $PY tools/train_det.py --config configs/shapes_fpn_cpu.yaml --resume \
    "${DET_ARCH[@]}" SEED "$seed" OUTPUT_DIR "$(det_dir random_init "$seed")"
done

stage "7/7 report"
$PY tools/report.py "$OUT" --out "$OUT/report"
echo
echo "demo finished in $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s; outputs in $OUT, table and plots in $OUT/report"
