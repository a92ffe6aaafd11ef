#!/bin/bash
#SBATCH --job-name=aihero-inference
#SBATCH --partition=accelerated
#SBATCH --nodes=1
#SBATCH --gres=gpu:4
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=152
#SBATCH --time=20:00:00
#SBATCH --output=slurm-%x-%j.out
#
# Predict instance masks with the run's best checkpoint (on one GPU; the cores read frames and postprocess).
#
#   sbatch --reservation=aihero-gpu inference.sh   # in the event's reservation (`sbatch inference.sh -r ...` is NOT)
#   SPLIT=test sbatch inference.sh                 # the test sequences (d, e) instead of the val sequence (c)
#   sbatch inference.sh --batch_size 32            # arguments after the script go to inference.py
#   DATA=demo_data bash inference.sh               # without SLURM, on the machine at hand
#
# Environment: REPO (the repository; default: where sbatch was run, else this file's folder), WORKSPACE (default
# $REPO), DATA (data root, default $WORKSPACE/data), VENV (default $REPO/.venv), RUN_DIR (run folder, default
# $WORKSPACE/runs/default), CHECKPOINT (default $RUN_DIR/checkpoints/best.ckpt), SPLIT (val, test or train; default
# val, which eval.sh can score), PRED_DIR (default $WORKSPACE/pred).
set -euo pipefail

# Under sbatch this file runs from a copy in SLURM's spool folder, so its own path does not lead to the repository.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")" && pwd)}}
[ -f "$REPO/inference.py" ] || { echo "error: no inference.py in $REPO: submit from the repository or set REPO" >&2; exit 2; }
source "$REPO/job_setup.sh" inference.sh "$@"  # paths, venv, -r warning, environment; leaves the arguments in args
CHECKPOINT=${CHECKPOINT:-$RUN_DIR/checkpoints/best.ckpt}
SPLIT=${SPLIT:-val}
python "$REPO/inference.py" --root_dir "$DATA" --split "$SPLIT" --model "$CHECKPOINT" \
  --pred_dir "$PRED_DIR" "${args[@]}"
