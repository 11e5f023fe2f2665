#!/usr/bin/env bash
# Reproduce the packaged default model (scorer/models/default.onnx) and MODEL_CARD.md's numbers.
#
#   scripts/make_default_model.sh [WORK]      # WORK defaults to /tmp/fxscore-default
#
# Steps: lay out the real X-rays, audit them, make a leak-free split from that audit (fixed
# seed), train ResNet18 from random init with full fine-tuning on the CPU for a fixed number of
# epochs, export (fp32) with parity, temperature scaling and a threshold chosen on validation,
# evaluate once on the leak-free test split, and copy the model into the package. Needs `pip install -e ".[train]"`.
# tests/test_default_model.py reads this file: the options below must stay the model's.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data/fracture-multi-region}"
WORK="${1:-/tmp/fxscore-default}"
# Training on a CPU is repeatable for a fixed epoch count (same data + seed + epochs -> same
# history); a wall-clock budget is not, so the recipe fixes epochs. MODEL_CARD.md records
# where and how long it ran.
EPOCHS="${EPOCHS:-16}"
SIZE="${SIZE:-128}"          # input side in pixels
mkdir -p "$WORK"

[ -d "$WORK/raw" ] || "$DATA/materialize" "$WORK/raw"
fxscore audit "$WORK/raw" --out "$WORK/audit-raw" > "$WORK/audit-raw.txt" || true
# exit 3: the 8 unreadable (truncated) files are left out and listed
[ -d "$WORK/clean" ] || fxscore split "$WORK/raw" --out "$WORK/clean" --val 0.1 --test 0.2 \
  --seed 0 --audit "$WORK/audit-raw" || [ $? -eq 3 ]
fxscore audit "$WORK/clean" --out "$WORK/audit-clean" --fail-on-leak > "$WORK/audit-clean.txt"

fxscore train "$WORK/clean" --out "$WORK/run" --pretrained none --freeze none \
  --image-size "$SIZE" --fit stretch --epochs "$EPOCHS" --batch-size 32 --lr 1e-3 --weight-decay 1e-4 \
  --scheduler plateau --patience 6 --seed 0 || [ $? -eq 3 ]

# Temperature scaling and the operating point are fit on validation only; the test split is
# scored once, below. Heatmap outputs, OOD statistics (fit on --calibration, the training
# images) and the training-data table are added by export itself. fp32, not --int8: this
# model's int8 graph passed the accuracy check but its probabilities were not identical across
# CPUs (up to 1.4e-3 apart on 6 of 472 images, VNNI vs qemu-x86_64 -cpu Haswell; MODEL_CARD.md).
fxscore export "$WORK/run/best.pt" --out "$WORK/model.onnx" --verify "$WORK/clean/val" \
  --calibration "$WORK/clean/train" --calibrate temperature \
  --threshold-for sensitivity:0.90 --model-name fxscore-resnet18-default --model-version 2
model="$WORK/model.onnx"

# The bootstrap resamples whole near-duplicate groups (from the split's manifest).
python scripts/split_groups.py "$WORK/clean" test > "$WORK/test-groups.csv"
fxscore eval "$WORK/clean/test" --model "$model" --groups "$WORK/test-groups.csv" \
  --target-sensitivity 0.95 --report "$WORK/eval" | tee "$WORK/eval.txt" || [ "${PIPESTATUS[0]}" -eq 3 ]

cp "$model" scorer/models/default.onnx
echo "default model <- $model; card numbers in $WORK/eval/metrics.json" >&2
