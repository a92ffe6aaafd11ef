#!/bin/bash
# GPU figures in one run, written to OUT_DIR/gpu_figures.json and OUT_DIR/gpu_figures.md (the table is printed last):
#   - inference of the bundled model, the old path (one frame per batch, 4 tiles per forward pass, fp16) against the
#     new one (INFER_BATCH frames per batch, their tiles together, bf16): an 800-frame 512 x 512 simulated sequence and
#     200 frames of 1022 x 1024; frames/s end to end, model only and postprocessing only, Wh per frame, the FLOPs of a
#     frame's forward passes and the share of the chip's dense bf16 peak they reach (benchmark.py --only inference);
#   - training patches: sampling and augmentation one at a time on the CPU (augment.py, what a loader worker does)
#     against a batch on the GPU (augment_torch.py), patches/s;
#   - both recipes' training on real frames: images (patches) per second and Wh per epoch;
#   - inference.py with the two trained models: frames/s and Wh per frame.
# Energy comes from NVML's counter (energy.py).
#
#   bash benchmark_gpu.sh DATA_ROOT OUT_DIR [CELL_WIDTH]
#   SMOKE=1 bash benchmark_gpu.sh DATA_ROOT OUT_DIR        # tiny sizes: the script itself checked on a CPU
#
# DATA_ROOT: sequences a (training frames, with a_GT) and b (validation frames, with b_GT), e.g. the Usiigaci split of
# benchmark_real.py (runs/benchmark_real/data/usiigaci), or "simulated" (two simulated sequences, written by
# simulate.py). The faithful recipe trains on a's frames repeated 8 times (so that an epoch holds several batches),
# the patch recipe on 4096 patches of 256 px per epoch in batches of 32; each runs a few epochs and the table gives the
# median over the epochs after the first. inference.py predicts a's and b's frames, repeated to 88 frames, once with
# each recipe's model; the patch model is told the cells' width (CELL_WIDTH, px; default: measured on a's masks), so
# no estimate of the scale is timed. It uses the models the two short runs trained unless FAITHFUL_MODEL and
# PATCH_MODEL name others: a barely trained model finds fragments everywhere, and its postprocessing is slower than a
# trained model's. Every size below can be set in the environment; PEAK: BENCHMARK_PEAK_TFLOPS for an unlisted GPU.
set -euo pipefail
DATA=${1:?usage: bash benchmark_gpu.sh DATA_ROOT OUT_DIR [CELL_WIDTH]}
OUT=${2:?usage: bash benchmark_gpu.sh DATA_ROOT OUT_DIR [CELL_WIDTH]}
PY=${PYTHON:-python3}
if [ "${SMOKE:-0}" = 1 ]; then  # tiny sizes, a minute on a CPU (tests/test_benchmark_gpu.py)
  : "${WORKERS:=0}" "${TRAIN_REPEAT:=2}" "${INFER_REPEAT:=1}" "${PATCHES:=8}" "${FAITHFUL_EPOCHS:=2}"
  : "${PATCH_EPOCHS:=2}" "${INPUT_SIZE:=64}" "${PATCH_SIZE:=64}" "${BATCH_SIZE:=4}" "${SIM_FRAMES:=3}" "${SIM_SIZE:=96}"
  : "${SEQUENCE_FRAMES:=3}" "${SEQUENCE_SIZE:=96}" "${LARGE_FRAMES:=2}" "${LARGE_SIZE:=72x300}" "${INFER_BATCH:=2}"
fi
WORKERS=${WORKERS:-12}
TRAIN_REPEAT=${TRAIN_REPEAT:-8} INFER_REPEAT=${INFER_REPEAT:-4} PATCHES=${PATCHES:-4096}
FAITHFUL_EPOCHS=${FAITHFUL_EPOCHS:-5} PATCH_EPOCHS=${PATCH_EPOCHS:-4}
INPUT_SIZE=${INPUT_SIZE:-512} PATCH_SIZE=${PATCH_SIZE:-256} BATCH_SIZE=${BATCH_SIZE:-32}
SEQUENCE_FRAMES=${SEQUENCE_FRAMES:-800} SEQUENCE_SIZE=${SEQUENCE_SIZE:-512}   # the old-vs-new inference sequences
LARGE_FRAMES=${LARGE_FRAMES:-200} LARGE_SIZE=${LARGE_SIZE:-1022x1024} INFER_BATCH=${INFER_BATCH:-32}
SIM_FRAMES=${SIM_FRAMES:-30} SIM_SIZE=${SIM_SIZE:-512}                          # DATA_ROOT=simulated
cd "$(dirname "$0")"
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "$DATA" = simulated ]; then
  $PY simulate.py --root_dir "$WORK/simulated" --num_sequences 2 --without_gt 0 --num_frames "$SIM_FRAMES" \
    --size "$SIM_SIZE" > "$OUT/simulate.log"
  DATA=$WORK/simulated
fi

# 1. inference, old path against new, the bundled model on simulated frames
$PY benchmark.py --only inference --num_frames "$SEQUENCE_FRAMES" --size "$SEQUENCE_SIZE" --batch_size "$INFER_BATCH" \
  --num_workers "$WORKERS" --json "$OUT/inference_sequence.json" 2>&1 | tee "$OUT/inference_sequence.log"
$PY benchmark.py --only inference --num_frames "$LARGE_FRAMES" --size "$LARGE_SIZE" --batch_size "$INFER_BATCH" \
  --num_workers "$WORKERS" --json "$OUT/inference_large.json" 2>&1 | tee "$OUT/inference_large.log"

# 2. training patches: sampling and augmentation on the CPU, one at a time, against a batch on the device
$PY benchmark.py --only augmentation --num_frames 8 --size "$SEQUENCE_SIZE" --patch_size "$PATCH_SIZE" \
  --batch_size "$BATCH_SIZE" --json "$OUT/augmentation.json" 2>&1 | tee "$OUT/augmentation.log"

# 3. training both recipes on real frames, then inference.py with their models
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

# 4. one JSON and one table
FRAMES=$(ls "$WORK/data/train" | wc -l)
$PY - "$OUT" "$FAITHFUL_MODEL" "$PATCH_MODEL" "$FRAMES frames resized to $INPUT_SIZE px, batch 16" \
  "$PATCHES patches of $PATCH_SIZE px, batch $BATCH_SIZE" <<'EOF'
import json, re, sys
import pandas as pd
import torch
out, faithful_model, patch_model, faithful_epoch, patch_epoch = sys.argv[1:6]
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU)"
figures = {"device": gpu, "inference_old_and_new": {}, "training": {}, "inference_cli": {}}
number = lambda value, form: "n/m" if value is None else format(value, form)
rows = [f"GPU: {gpu}", "", "| frames | path | end to end frames/s | model frames/s | postprocessing frames/s | "
        "Wh/frame | GFLOP/frame | model TFLOP/s | share of bf16 peak |", "| --- | --- | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |"]
for name in ("sequence", "large"):
    result = json.load(open(f"{out}/inference_{name}.json"))
    figures["inference_old_and_new"][name] = result["inference"]
    paths = {key: value for key, value in result["inference"].items() if isinstance(value, dict)}
    for path, summary in paths.items():
        frames = f"{summary['frames']} of {summary['frame_shape'][0]} x {summary['frame_shape'][1]}"
        share = "n/m" if summary["share_of_peak"] is None else f"{100 * summary['share_of_peak']:.2f} %"
        rows.append(f"| {frames} | {path}, batch {summary['batch_size']} | "
                    f"{summary['end_to_end_frames_per_s']:.1f} | {summary['model_frames_per_s']:.1f} | "
                    f"{summary['postprocessing_frames_per_s']:.1f} | {number(summary['wh_per_frame'], '.2e')} | "
                    f"{summary['gflop_per_frame']:.1f} | {summary['model_tflop_per_s']:.2f} | {share} |")
    old, new = paths["frame by frame (old)"], paths["batched (new)"]
    ratio = new["end_to_end_frames_per_s"] / old["end_to_end_frames_per_s"]
    energy = (f", {old['wh_per_frame'] / new['wh_per_frame']:.1f}x less energy per frame"
              if old["wh_per_frame"] and new["wh_per_frame"] else "")
    rows.append(f"| {frames} | new / old | {ratio:.1f}x | | | {energy.lstrip(', ')} | | | |")
augmentation = json.load(open(f"{out}/augmentation.json"))["rows"]
figures["augmentation"] = augmentation
rows += ["", "| training patches | patches/s | speed-up | note |", "| --- | ---: | ---: | --- |"]
rows += [f"| {r['stage']} | {r['frames_per_s']:.1f} | {number(r['speedup'], '.1f')} | {r['note']} |"
         for r in augmentation]
rows += ["", "| recipe | training images/s | s per epoch | Wh per epoch | images per epoch |",
         "| --- | --- | --- | --- | --- |"]
for recipe in ("faithful", "patches"):
    epochs = pd.read_csv(f"{out}/{recipe}/metrics.csv").dropna(subset=["train_loss"]).iloc[1:]
    wh = epochs["energy_wh"].median() if "energy_wh" in epochs else float("nan")
    images = faithful_epoch if recipe == "faithful" else patch_epoch
    speed, seconds = epochs["train_images_per_second"].median(), epochs["epoch_seconds"].median()
    figures["training"][recipe] = {"images_per_s": speed, "epoch_s": seconds, "wh_per_epoch": wh, "epoch": images}
    rows.append(f"| {recipe} | {speed:.1f} | {seconds:.2f} | {wh:.4f} | {images} |")
rows += ["", "| inference.py | frames/s | Wh per frame | line |", "| --- | --- | --- | --- |"]
for name, what in (("faithful", f"faithful ({faithful_model}), whole frame resized, 256 output"),
                   ("patches", f"patches ({patch_model}), tiled, 256 output"),
                   ("native", f"patches ({patch_model}), tiled, 256 and native output")):
    line = [l for l in open(f"{out}/infer_{name}.log") if "frames on" in l][-1].strip()
    frames, seconds = re.search(r"(\d+) frames in ([\d.]+) s", line).groups()
    per_frame = re.search(r"([\d.e+-]+) Wh/frame", line)
    figures["inference_cli"][name] = {"frames_per_s": int(frames) / float(seconds), "line": line,
                                      "wh_per_frame": float(per_frame.group(1)) if per_frame else None}
    rows.append(f"| {what} | {int(frames) / float(seconds):.1f} | {per_frame.group(1) if per_frame else 'n/a'} | "
                f"{line} |")
if not torch.cuda.is_available():
    rows += ["", "No GPU here: the figures above are the CPU's (a check of the script, not a measurement)."]
json.dump(figures, open(f"{out}/gpu_figures.json", "w"), indent=2, default=float)
open(f"{out}/gpu_figures.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
