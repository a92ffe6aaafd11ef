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
[ -f "$REPO/eval.py" ] || { echo "error: no eval.py in $REPO: submit from the repository or set REPO" >&2; exit 2; }
source "$REPO/job_setup.sh" eval.sh "$@"  # paths, venv, -r warning, environment; leaves the arguments in args
python "$REPO/eval.py" --pred_dir "$PRED_DIR" --root_dir "$DATA" "${args[@]}"
