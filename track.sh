#!/bin/bash
#SBATCH --job-name=aihero-track
#SBATCH --partition=cpuonly
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=152
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
#
# Link the predicted instance maps of each sequence into tracks on a CPU node: $PRED_DIR/<seq>/t0000_256.tif ... ->
# $TRACK_DIR/<seq>_RES/ (mask000.tif ..., res_track.txt, tracks.csv; see docs/tracking.md).
#
#   sbatch --reservation=aihero track.sh           # in the event's CPU reservation (`sbatch track.sh -r aihero` is NOT)
#   sbatch track.sh --out_size 512 512             # arguments after the script go to track.py (every sequence)
#   PRED_DIR=pred bash track.sh                    # without SLURM, on the machine at hand
#
# Environment: REPO (the repository; default: where sbatch was run, else this file's folder), WORKSPACE (default
# $REPO), VENV (default $REPO/.venv), PRED_DIR (default $WORKSPACE/pred), TRACK_DIR (default $WORKSPACE/track),
# SEQS (space-separated sequences, default every sequence folder of $PRED_DIR).
set -euo pipefail

# Under sbatch this file runs from a copy in SLURM's spool folder, so its own path does not lead to the repository.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")" && pwd)}}
[ -f "$REPO/track.py" ] || { echo "error: no track.py in $REPO: submit from the repository or set REPO" >&2; exit 2; }
source "$REPO/job_setup.sh" track.sh "$@"  # paths, venv, -r warning, environment; leaves the arguments in args
TRACK_DIR=${TRACK_DIR:-$WORKSPACE/track}
[ -d "$PRED_DIR" ] || { echo "error: $PRED_DIR: prediction folder does not exist" >&2; exit 1; }
if [ -n "${SEQS:-}" ]; then
  read -r -a seqs <<< "$SEQS"  # space-separated names; a folder name with spaces: leave SEQS unset
else
  seqs=()
  shopt -s nullglob  # an empty folder gives no name, not a literal '*/'
  for folder in "$PRED_DIR"/*/; do folder=${folder%/}; seqs+=("${folder##*/}"); done
  shopt -u nullglob
fi
[ ${#seqs[@]} -gt 0 ] || { echo "error: $PRED_DIR: no sequence folder to track (expected $PRED_DIR/<seq>/t0000_256.tif ...)" >&2; exit 1; }
for seq in "${seqs[@]}"; do
  python "$REPO/track.py" --labels "$PRED_DIR/$seq" --out_dir "$TRACK_DIR/${seq}_RES" --overwrite "${args[@]}"
done
