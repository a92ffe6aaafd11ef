#!/bin/bash
# GPU figures of both recipes on real frames: training images/s and Wh per epoch, inference frames/s and Wh per frame
# (energy from NVML's counter: energy.py). Short runs, a few minutes on one GPU; the table is printed last and written
# to $OUT/gpu_figures.md.
#
#   bash benchmark_gpu.sh DATA_ROOT OUT_DIR [CELL_WIDTH]
#
# DATA_ROOT: sequences a (training frames, with a_GT) and b (validation frames, with b_GT), e.g. the Usiigaci split of
# benchmark_real.py (runs/benchmark_real/data/usiigaci). The faithful recipe trains on a's frames repeated 8 times (so
# that an epoch holds several batches), the patch recipe on 4096 patches of 256 px per epoch in batches of 32; each runs
# a few epochs and the table gives the median over the epochs after the first. Inference predicts a's and b's frames,
# repeated to 88 frames, once with each recipe's model; the patch model is told the cells' width (CELL_WIDTH, px;
# default: measured on a's masks), so no estimate of the scale is timed. Inference uses the models the two short runs
# trained unless FAITHFUL_MODEL and PATCH_MODEL name others: a barely trained model finds fragments everywhere, and
# its postprocessing is slower than a trained model's.
set -euo pipefail
DATA=${1:?usage: bash benchmark_gpu.sh DATA_ROOT OUT_DIR [CELL_WIDTH]}
OUT=${2:?usage: bash benchmark_gpu.sh DATA_ROOT OUT_DIR [CELL_WIDTH]}
PY=${PYTHON:-python3}
WORKERS=${WORKERS:-12}
# smaller values make a quick check of the script itself (on a CPU; tests/test_benchmark.py)
TRAIN_REPEAT=${TRAIN_REPEAT:-8} INFER_REPEAT=${INFER_REPEAT:-4} PATCHES=${PATCHES:-4096}
FAITHFUL_EPOCHS=${FAITHFUL_EPOCHS:-5} PATCH_EPOCHS=${PATCH_EPOCHS:-4}
INPUT_SIZE=${INPUT_SIZE:-512} PATCH_SIZE=${PATCH_SIZE:-256} BATCH_SIZE=${BATCH_SIZE:-32}
cd "$(dirname "$0")"
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# the same frames under more names: symbolic links, no copies
repeat_sequence() {  # repeat_sequence NAME TIMES SEQ...
  local name=$1 times=$2 i=0; shift 2
  mkdir -p "$WORK/data/$name" "$WORK/data/${name}_GT"
  for _ in $(seq "$times"); do
    for seq in "$@"; do
      for image in "$DATA/$seq"/t*.tif; do
        local number=${image##*/t}; number=${number%.tif}
        ln -s "$(realpath "$image")" "$WORK/data/$name/$(printf 't%04d.tif' $i)"
        ln -s "$(realpath "$DATA/${seq}_GT/man_seg$number.tif")" "$WORK/data/${name}_GT/$(printf 'man_seg%04d.tif' $i)"
        i=$((i + 1))
      done
    done
  done
}
repeat_sequence train "$TRAIN_REPEAT" a
repeat_sequence val 1 b
repeat_sequence infer "$INFER_REPEAT" a b
CELL_WIDTH=${3:-$($PY -c "
from scale import median_cell_width; from data_files import list_frames, read_mask
print(f'{median_cell_width(read_mask(f.mask_path) for f in list_frames(\"$DATA\", \"a\", True)):.2f}')")}

common=(--root_dir "$WORK/data" --train_seqs train --val_seqs val --num_workers "$WORKERS")
$PY train.py "${common[@]}" --config recipes/faithful.yaml --num_epochs "$FAITHFUL_EPOCHS" --set input_size="$INPUT_SIZE" \
  --out_dir "$OUT/faithful" 2>&1 | tee "$OUT/faithful.log"
$PY train.py "${common[@]}" --config recipes/patches.yaml --num_epochs "$PATCH_EPOCHS" --set patch_size="$PATCH_SIZE" \
  --batch_size "$BATCH_SIZE" --set patches_per_epoch="$PATCHES" --set size_filter=false --out_dir "$OUT/patches" 2>&1 |
  tee "$OUT/patches.log"
FAITHFUL_MODEL=${FAITHFUL_MODEL:-$OUT/faithful/checkpoints/best.ckpt}
PATCH_MODEL=${PATCH_MODEL:-$OUT/patches/checkpoints/best.ckpt}
$PY inference.py --root_dir "$WORK/data" --seqs infer --model "$FAITHFUL_MODEL" \
  --pred_dir "$WORK/pred_faithful" 2>&1 | tee "$OUT/infer_faithful.log"
$PY inference.py --root_dir "$WORK/data" --seqs infer --model "$PATCH_MODEL" \
  --pred_dir "$WORK/pred_patches" --cell_width "$CELL_WIDTH" 2>&1 | tee "$OUT/infer_patches.log"
$PY inference.py --root_dir "$WORK/data" --seqs infer --model "$PATCH_MODEL" \
  --pred_dir "$WORK/pred_native" --cell_width "$CELL_WIDTH" --native 2>&1 | tee "$OUT/infer_native.log"

FRAMES=$(ls "$WORK/data/train" | wc -l)
$PY - "$OUT" "$FAITHFUL_MODEL" "$PATCH_MODEL" "$FRAMES frames resized to $INPUT_SIZE px, batch 16" \
  "$PATCHES patches of $PATCH_SIZE px, batch $BATCH_SIZE" <<'EOF'
import re, sys
import pandas as pd
import torch
out, faithful_model, patch_model, faithful_epoch, patch_epoch = sys.argv[1:6]
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU)"
rows = [f"GPU: {gpu}", "", "| recipe | training images/s | s per epoch | Wh per epoch | images per epoch |",
        "| --- | --- | --- | --- | --- |"]
for recipe in ("faithful", "patches"):
    epochs = pd.read_csv(f"{out}/{recipe}/metrics.csv").dropna(subset=["train_loss"]).iloc[1:]
    wh = epochs["energy_wh"].median() if "energy_wh" in epochs else float("nan")
    images = faithful_epoch if recipe == "faithful" else patch_epoch
    rows.append(f"| {recipe} | {epochs['train_images_per_second'].median():.1f} | {epochs['epoch_seconds'].median():.2f}"
                f" | {wh:.4f} | {images} |")
rows += ["", "| inference | frames/s | Wh per frame | line |", "| --- | --- | --- | --- |"]
for name, what in (("faithful", f"faithful ({faithful_model}), whole frame resized, 256 output"),
                   ("patches", f"patches ({patch_model}), tiled, 256 output"),
                   ("native", f"patches ({patch_model}), tiled, 256 and native output")):
    line = [l for l in open(f"{out}/infer_{name}.log") if "frames on" in l][-1].strip()
    frames, seconds = re.search(r"(\d+) frames in ([\d.]+) s", line).groups()
    per_frame = re.search(r"([\d.e+-]+) Wh/frame", line)
    rows.append(f"| {what} | {int(frames) / float(seconds):.1f} | {per_frame.group(1) if per_frame else 'n/a'} | "
                f"{line} |")
open(f"{out}/gpu_figures.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
