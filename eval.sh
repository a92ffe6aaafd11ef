#!/bin/bash
#SBATCH --job-name=aihero-eval
#SBATCH --partition=cpuonly
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=152
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
#
# Score the predictions with Instance Dice on a CPU node; prints one line per sequence and "Mean Instance Dice: ...".
#
#   sbatch --reservation=aihero eval.sh            # in the event's CPU reservation (`sbatch eval.sh -r aihero` is NOT)
#   sbatch eval.sh --seqs c                        # arguments after the script go to eval.py
#   DATA=demo_data bash eval.sh                    # without SLURM, on the machine at hand
#
# Environment: REPO (the repository; default: where sbatch was run, else this file's folder), WORKSPACE (default
# $REPO), DATA (data root with ground truth, default $WORKSPACE/data), VENV (default $REPO/.venv), PRED_DIR
# (default $WORKSPACE/pred).
set -euo pipefail

# Under sbatch this file runs from a copy in SLURM's spool folder, so its own path does not lead to the repository.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")" && pwd)}}
WORKSPACE=${WORKSPACE:-$REPO}
DATA=${DATA:-$WORKSPACE/data}
VENV=${VENV:-$REPO/.venv}
PRED_DIR=${PRED_DIR:-$WORKSPACE/pred}
[ -f "$REPO/eval.py" ] || { echo "error: no eval.py in $REPO: submit from the repository or set REPO" >&2; exit 2; }
[ -f "$VENV/bin/activate" ] || { echo "error: no virtual environment $VENV: run make install or set VENV" >&2; exit 2; }

# sbatch reads its options before the script name only; `sbatch eval.sh -r aihero` hands "-r aihero" to us.
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
    "apply it with: sbatch --reservation=$reservation eval.sh" >&2
fi

export CUDA_CACHE_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source "$VENV/bin/activate"
python "$REPO/eval.py" --pred_dir "$PRED_DIR" --gt_dir "$DATA" "${args[@]}"
