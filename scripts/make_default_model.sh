#!/usr/bin/env bash
# Reproduce the packaged default model (scorer/models/default.onnx) and MODEL_CARD.md's numbers.
#
#   scripts/make_default_model.sh [WORK]      # WORK defaults to /tmp/fxscore-default
#
# Steps: lay out the real X-rays, audit them, make a leak-free split (fixed seed), train ResNet18
# from random init with full fine-tuning on the CPU within a fixed time budget, export with
# parity (fp32 + int8 when it passes the accuracy check), evaluate on the leak-free test split,
# and copy the chosen model into the package. Needs `pip install -e ".[train]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data/fracture-multi-region}"
WORK="${1:-/tmp/fxscore-default}"
# The shipped model was trained under a 35-minute wall-clock budget on 2 CPU cores
# (--max-minutes 35), which stopped it after epoch 16. A time budget depends on the machine, so
# the recipe fixes the epoch count instead: same data + seed + epochs -> same history on a CPU.
EPOCHS="${EPOCHS:-16}"
SIZE="${SIZE:-128}"          # input size: 128 px keeps full fine-tuning affordable on a CPU
# The shipped model stretches each image to the square input (--fit stretch); `fxscore train`
# now pads by default, so the recipe says so explicitly.
mkdir -p "$WORK"

[ -d "$WORK/raw" ] || "$DATA/materialize" "$WORK/raw"
fxscore audit "$WORK/raw" --out "$WORK/audit-raw" > "$WORK/audit-raw.txt" || true
# exit 3: the 8 unreadable (truncated) files are left out and listed
[ -d "$WORK/clean" ] || fxscore split "$WORK/raw" --out "$WORK/clean" --val 0.1 --test 0.2 --seed 0 || [ $? -eq 3 ]
fxscore audit "$WORK/clean" --out "$WORK/audit-clean" --fail-on-leak > "$WORK/audit-clean.txt"

fxscore train "$WORK/clean" --out "$WORK/run" --pretrained none --freeze none \
  --image-size "$SIZE" --fit stretch --epochs "$EPOCHS" --batch-size 32 --lr 1e-3 --weight-decay 1e-4 \
  --scheduler plateau --patience 6 --seed 0 || [ $? -eq 3 ]

fxscore export "$WORK/run/best.pt" --out "$WORK/model.onnx" --verify "$WORK/clean/val" \
  --int8 --calibration "$WORK/clean/train" --model-name fxscore-resnet18-default \
  --model-version 1 || true   # a refused int8 model leaves the fp32 one; checked below
[ -f "$WORK/model.onnx" ] || { echo "export failed: see $WORK/model.export.json" >&2; exit 1; }
model="$WORK/model.onnx"
[ -f "$WORK/model.int8.onnx" ] && model="$WORK/model.int8.onnx"

# The bootstrap resamples whole near-duplicate groups (from the split's manifest).
python scripts/split_groups.py "$WORK/clean" test > "$WORK/test-groups.csv"
fxscore eval "$WORK/clean/test" --model "$model" --groups "$WORK/test-groups.csv" \
  --target-sensitivity 0.95 --report "$WORK/eval" | tee "$WORK/eval.txt" || [ "${PIPESTATUS[0]}" -eq 3 ]

cp "$model" scorer/models/default.onnx
echo "default model <- $model; card numbers in $WORK/eval/metrics.json" >&2
