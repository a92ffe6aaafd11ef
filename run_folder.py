"""A run folder (train.py --out_dir): metrics.csv, recipe.yaml, hparams.yaml and checkpoints/ (last.ckpt at the end
of every epoch, best.ckpt of the highest val_instance_dice, requeue.ckpt on SLURM's warning signal). Which checkpoint
a run continues from, and the log it keeps across a resume."""
import csv
import glob
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from data_files import DataError
from unet import load_checkpoint


def newest_checkpoint(out_dir: str) -> str | None:
    """The checkpoint of the run furthest into training: checkpoints/last.ckpt (written at the end of each epoch) or
    checkpoints/requeue.ckpt (written on SLURM's warning signal, in the middle of an epoch)."""
    paths = [path for name in ("last.ckpt", "requeue.ckpt")
             if os.path.isfile(path := os.path.join(out_dir, "checkpoints", name))]
    steps = lambda path: load_checkpoint(path)["global_step"]
    return max(paths, key=lambda path: (steps(path), os.path.getmtime(path)), default=None)


def completed_epochs(checkpoint: dict) -> int:
    """Epochs a checkpoint holds in full: requeue.ckpt is taken in the middle of an epoch."""
    return checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]


@rank_zero_only  # the logger writes on rank 0 only, and rewrites this file: other ranks must not read it meanwhile
def restore_metrics(logger: CSVLogger, metrics_file: str, completed_epochs: int):
    """Lightning's CSV writer deletes an existing metrics.csv when a run restarts in the same folder; hand it the
    rows of the epochs the checkpoint holds, so the resumed run keeps one complete log."""
    with open(metrics_file, newline="") as file:
        rows = list(csv.DictReader(file))  # all of them first: the logger may flush into this file while logging
    for row in rows:
        if row.get("epoch") and int(float(row["epoch"])) < completed_epochs:
            values = {k: int(float(v)) if k == "epoch" else float(v)
                      for k, v in row.items() if v not in ("", None) and k != "step"}
            logger.log_metrics(values, step=int(float(row["step"])))


def checkpoint_to_resume(out_dir: str, resume: bool) -> str | None:
    """The checkpoint a run continues from: with --resume or in a requeued SLURM job the run folder's newest one;
    None for a new run. A new run into a folder that already holds one is refused (DataError), as is --resume
    without one. Under SLURM, Lightning resumes by itself from any hpc_ckpt_*.ckpt of the folder: those are read
    (weights-only) here first, so a planted file is refused before Lightning sees it."""
    from slurm import SLURMEnvironment, requeued
    checkpoint = newest_checkpoint(out_dir)
    continuing = resume or requeued()
    if resume and checkpoint is None:
        raise DataError(f"{os.path.join(out_dir, 'checkpoints')}: --resume, but it holds no last.ckpt or requeue.ckpt")
    if checkpoint and not continuing:
        raise DataError(f"{out_dir}: already holds a run; continue it with --resume or choose another --out_dir")
    if SLURMEnvironment.detect():
        for path in sorted(glob.glob(os.path.join(out_dir, "hpc_ckpt_*.ckpt"))):
            load_checkpoint(path)
    return checkpoint if continuing else None
