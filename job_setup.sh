# Shared set-up of train.sh, inference.sh and eval.sh, sourced by each after it has found REPO:
#   source "$REPO/job_setup.sh" <script name> "$@"
# Sets the path defaults, checks the virtual environment, takes `-r NAME` / `--reservation NAME` off the arguments
# (sbatch reads its options before the script name only, so `sbatch train.sh -r aihero-gpu` hands them to the
# script) with one warning line, leaves the rest in the array `args`, and activates the environment.
job_script=$1
shift
WORKSPACE=${WORKSPACE:-$REPO}
DATA=${DATA:-$WORKSPACE/data}
VENV=${VENV:-$REPO/.venv}
RUN_DIR=${RUN_DIR:-$WORKSPACE/runs/default}
PRED_DIR=${PRED_DIR:-$WORKSPACE/pred}
[ -f "$VENV/bin/activate" ] || { echo "error: no virtual environment $VENV: run make install or set VENV" >&2; exit 2; }

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
    "apply it with: sbatch --reservation=$reservation $job_script" >&2
fi

export CUDA_CACHE_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source "$VENV/bin/activate"
