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
WORKSPACE=${WORKSPACE:-$REPO}
DATA=${DATA:-$WORKSPACE/data}
VENV=${VENV:-$REPO/.venv}
RUN_DIR=${RUN_DIR:-$WORKSPACE/runs/default}
CHECKPOINT=${CHECKPOINT:-$RUN_DIR/checkpoints/best.ckpt}
SPLIT=${SPLIT:-val}
PRED_DIR=${PRED_DIR:-$WORKSPACE/pred}
[ -f "$REPO/inference.py" ] || { echo "error: no inference.py in $REPO: submit from it or set REPO" >&2; exit 2; }
[ -f "$VENV/bin/activate" ] || { echo "error: no virtual environment $VENV: run make install or set VENV" >&2; exit 2; }

# sbatch reads its options before the script name only; `sbatch inference.sh -r aihero-gpu` hands "-r ..." to us.
args=() reservation=
while [ $# -gt 0 ]; do
  case $1 in
    -r | --reservation) reservation=${2:-}; shift $(($# > 1 ? 2 : 1)) ;;
    --reservation=*) reservation=${1#*=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "$reservation" ] && [ "${SLURM_JOB_RESERVATION:-}" != "$reservation" ]; then
  echo "warning: reservation $reservation was NOT applied (sbatch reads no option after the script name);" \
    "apply it with: sbatch --reservation=$reservation inference.sh" >&2
fi

export CUDA_CACHE_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source "$VENV/bin/activate"
python "$REPO/inference.py" --root_dir "$DATA" --split "$SPLIT" --from_checkpoint "$CHECKPOINT" \
  --pred_dir "$PRED_DIR" "${args[@]}"
