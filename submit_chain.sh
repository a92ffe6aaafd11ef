#!/bin/bash
# Submit training, inference and evaluation at once: each job starts when the one before it has ended successfully
# (--dependency=afterok), and is cancelled if that one failed (--kill-on-invalid-dep). A requeued training job counts
# as ended only when its last start ends.
#
#   bash submit_chain.sh                                                   # train.sh -> inference.sh -> eval.sh
#   GPU_RESERVATION=aihero-gpu CPU_RESERVATION=aihero bash submit_chain.sh # in the event's reservations
#   TRAIN_SBATCH="--nodes=2" TRAIN_ARGS="--num_epochs 30" bash submit_chain.sh
#   bash submit_chain.sh --account=my_project                              # arguments: sbatch options for all three
#   TRACK=1 bash submit_chain.sh                                           # and track.sh after inference
#
# Environment: what the scripts read (REPO, WORKSPACE, DATA, VENV, RUN_DIR, CHECKPOINT, SPLIT, PRED_DIR, TRACK_DIR,
# SEQS; the jobs get this shell's environment), GPU_RESERVATION (train and inference) and CPU_RESERVATION (eval and
# track), TRACK=1 to link the predictions into tracks after inference (beside eval), and per job extra sbatch options
# (TRAIN_SBATCH, INFERENCE_SBATCH, EVAL_SBATCH, TRACK_SBATCH) and script arguments (TRAIN_ARGS, INFERENCE_ARGS,
# EVAL_ARGS, TRACK_ARGS), split at spaces. When a submission fails, nothing after it is submitted: one `error:` line
# names it and the jobs already submitted, and the exit status is 1.
set -euo pipefail
export REPO=${REPO:-$(cd "$(dirname "$0")" && pwd)}  # the jobs find the repository wherever this is run from
gpu=(${GPU_RESERVATION:+--reservation=$GPU_RESERVATION})
cpu=(${CPU_RESERVATION:+--reservation=$CPU_RESERVATION})
submitted=() ids=()  # the jobs submitted so far, for the message when a later submission fails

# submit NAME SBATCH-ARGS...: sets $job to the new job's id, or stops the chain with one line when sbatch fails
submit() {
  local name=$1 output status=0
  shift
  output=$(sbatch --parsable --kill-on-invalid-dep=yes "$@") || status=$?
  job=${output%%;*}  # "id;cluster"
  if [ "$status" != 0 ] || ! [[ "$job" =~ ^[0-9]+$ ]]; then
    local done="" why="sbatch exit status $status"
    [ "$status" != 0 ] || why="sbatch printed no job id${output:+: $output}"
    [ ${#ids[@]} = 0 ] || done="; already submitted: $(printf '%s, ' "${submitted[@]}")"
    echo "error: submitting $name failed ($why); nothing after it was" \
      "submitted${done%, }${done:+ (scancel ${ids[*]} if the chain is not wanted)}" >&2
    exit 1
  fi
  submitted+=("$name job $job") ids+=("$job")
}

submit train.sh "$@" "${gpu[@]}" ${TRAIN_SBATCH:-} "$REPO/train.sh" ${TRAIN_ARGS:-}
train=$job
submit inference.sh "$@" "${gpu[@]}" --dependency=afterok:"$train" ${INFERENCE_SBATCH:-} \
  "$REPO/inference.sh" ${INFERENCE_ARGS:-}
inference=$job
submit eval.sh "$@" "${cpu[@]}" --dependency=afterok:"$inference" ${EVAL_SBATCH:-} "$REPO/eval.sh" ${EVAL_ARGS:-}
evaluation=$job
echo "train: job $train"
echo "inference: job $inference (after $train)"
echo "eval: job $evaluation (after $inference)"
if [ "${TRACK:-0}" = 1 ]; then
  submit track.sh "$@" "${cpu[@]}" --dependency=afterok:"$inference" ${TRACK_SBATCH:-} "$REPO/track.sh" ${TRACK_ARGS:-}
  echo "track: job $job (after $inference)"
fi
