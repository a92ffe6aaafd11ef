#!/bin/bash
#SBATCH --job-name=aihero-train
#SBATCH --partition=accelerated
#SBATCH --nodes=1
#SBATCH --gres=gpu:4
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=38
#SBATCH --time=20:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# Train the U-Net: one DDP process (SLURM task) per GPU, 4 per node, the node's 152 cores shared among them.
# 3 minutes before the time limit SLURM sends SIGUSR1 to the processes: train.py saves checkpoints/requeue.ckpt in the
# run folder and requeues the job, which resumes from it by itself (--requeue lets it be requeued, and
# --open-mode=append keeps the log of every start in one file).
#
#   sbatch --reservation=aihero-gpu train.sh     # in the event's reservation (`sbatch train.sh -r aihero-gpu` is NOT)
#   sbatch --nodes=2 train.sh                    # 2 nodes x 4 GPUs
#   sbatch train.sh --num_epochs 30              # arguments after the script go to train.py
#   RECIPE=recipes/faithful.yaml sbatch train.sh # the original baseline's recipe
#   DATA=demo_data bash train.sh --num_epochs 2  # without SLURM, on the machine at hand
#
# Environment: REPO (the repository; default: where sbatch was run, else this file's folder), WORKSPACE (default
# $REPO), DATA (data root, default $WORKSPACE/data), VENV (default $REPO/.venv), RUN_DIR (run folder, default
# $WORKSPACE/runs/default).
set -euo pipefail

# Under sbatch this file runs from a copy in SLURM's spool folder, so its own path does not lead to the repository.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")" && pwd)}}
[ -f "$REPO/train.py" ] || { echo "error: no train.py in $REPO: submit from the repository or set REPO" >&2; exit 2; }
source "$REPO/job_setup.sh" train.sh "$@"  # paths, venv, -r warning, environment; leaves the arguments in args
launch=()
if [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "job $SLURM_JOB_ID (start $((${SLURM_RESTART_COUNT:-0} + 1))): ${SLURM_NNODES:-1} node(s) x" \
    "${SLURM_NTASKS_PER_NODE:-1} task(s) on ${SLURM_JOB_NODELIST:-?}; data $DATA, run $RUN_DIR"
  # one process per task; srun of SLURM 22.05 does not inherit the job's --cpus-per-task by itself
  launch=(srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
fi
# the recommended recipe unless RECIPE (a recipe file) or a --config among the arguments says otherwise
"${launch[@]}" python "$REPO/train.py" --config "${RECIPE:-$REPO/recipes/patches.yaml}" --root_dir "$DATA" \
  --out_dir "$RUN_DIR" "${args[@]}"
