"""A run folder (train.py --out_dir): metrics.csv, recipe.yaml, hparams.yaml and checkpoints/ (last.ckpt at the end
of every epoch, best.ckpt of the highest val_instance_dice, requeue.ckpt on SLURM's warning signal). Which checkpoint
a run continues from, and the log it keeps across a resume."""
import csv
import glob
import os

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from data_files import DataError
from unet import CheckpointError, load_checkpoint


def newest_checkpoint(out_dir: str) -> str | None:
    """The checkpoint of the run furthest into training: checkpoints/last.ckpt (written at the end of each epoch) or
    checkpoints/requeue.ckpt (written on SLURM's warning signal, in the middle of an epoch)."""
    paths = [path for name in ("last.ckpt", "requeue.ckpt")
             if os.path.isfile(path := os.path.join(out_dir, "checkpoints", name))]
    steps = lambda path: load_checkpoint(path)["global_step"]
    return max(paths, key=lambda path: (steps(path), os.path.getmtime(path)), default=None)


def completed_epochs(checkpoint: dict, path: str) -> int:
    """Epochs a checkpoint holds in full: requeue.ckpt is taken in the middle of an epoch."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(path, "no record of the epochs it holds (loops.fit_loop)") from None


def metrics_to_keep(out_dir: str, checkpoint_path: str | None) -> list[tuple[dict, int]]:
    """(values, step) of the rows of the run's metrics.csv that the checkpoint holds, read and checked before the
    run goes on: Lightning's CSV writer deletes an existing metrics.csv when a run restarts in the same folder, so
    these are handed back to it (restore_metrics) and the resumed run keeps one complete log."""
    metrics_file = os.path.join(out_dir, "metrics.csv")
    if checkpoint_path is None or not os.path.isfile(metrics_file):
        return []
    epochs = completed_epochs(load_checkpoint(checkpoint_path), checkpoint_path)
    try:
        with open(metrics_file, newline="") as file:
            rows = list(csv.DictReader(file))
        kept = []
        for row in rows:
            if row.get("epoch") and int(float(row["epoch"])) < epochs:
                kept.append(({k: int(float(v)) if k == "epoch" else float(v)
                              for k, v in row.items() if v not in ("", None) and k not in ("step", None)},
                             int(float(row["step"]))))
    except (ValueError, TypeError, KeyError, csv.Error, UnicodeDecodeError) as error:
        raise DataError(f"{metrics_file}: not a metrics log of train.py ({type(error).__name__}: {error}); move it "
                        f"away to resume without it") from None
    return kept


@rank_zero_only  # the logger writes on rank 0 only
def restore_metrics(logger: CSVLogger, rows: list[tuple[dict, int]]):
    for values, step in rows:
        logger.log_metrics(values, step=step)


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


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose saved state names its files by their names in the run's checkpoint folder,
    not by absolute paths: a run folder that was copied or moved resumes into itself, never writing into the
    original, and best.ckpt stays the best of this run (no best-v1.ckpt beside a stale one). Checkpoints saved with
    absolute paths are taken by their file names too."""

    def state_dict(self):
        state = super().state_dict()
        name = lambda path: os.path.basename(path) if path else path
        return dict(state, dirpath=".", best_model_path=name(state["best_model_path"]),
                    kth_best_model_path=name(state["kth_best_model_path"]),
                    last_model_path=name(state["last_model_path"]),
                    best_k_models={name(path): score for path, score in state["best_k_models"].items()})

    def load_state_dict(self, state_dict):
        here = lambda path: os.path.join(self.dirpath, os.path.basename(path)) if path else path
        super().load_state_dict(dict(
            state_dict, dirpath=self.dirpath, best_model_path=here(state_dict.get("best_model_path", "")),
            kth_best_model_path=here(state_dict.get("kth_best_model_path", "")),
            last_model_path=here(state_dict.get("last_model_path", "")),
            best_k_models={here(path): score for path, score in state_dict.get("best_k_models", {}).items()}))


class StartingModelAsBest(Callback):
    """A fine-tuning run's first candidate for best.ckpt: the starting model itself, with its validation score and
    size filter (unet.validation_score). An epoch replaces it only by scoring higher, so fine-tuning on too few or too
    unlike frames never hands back a model that does worse on the validation frames than the one it started from."""

    def __init__(self, best: RunCheckpoint, score: float, min_area_fraction: float):
        self.best, self.score, self.min_area_fraction = best, score, min_area_fraction

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step:  # resumed: best.ckpt and the best's state came back from the checkpoint
            return
        path = os.path.join(self.best.dirpath, self.best.filename + self.best.FILE_EXTENSION)
        score = torch.tensor(self.score, dtype=torch.float64)  # float(best_model_score) is the score given
        self.best.best_k_models = {path: score}
        self.best.kth_best_model_path = self.best.best_model_path = path
        self.best.kth_value = self.best.best_model_score = score
        pl_module.hparams.min_area_fraction = self.min_area_fraction
        trainer.save_checkpoint(path)
