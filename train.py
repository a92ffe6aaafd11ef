"""Train the border-core U-Net.

    python train.py --root_dir /path/to/data_root                       # the baseline's recipe: 100 epochs, batch 16, 512 px
    python train.py --root_dir data --num_epochs 5 --out_dir runs/try   # a short run
    python train.py --root_dir data --out_dir runs/try --resume         # continue runs/try from its last checkpoint

A run folder (--out_dir) holds metrics.csv (per epoch: a row of train and a row of val metrics), hparams.yaml and checkpoints/last.ckpt and
checkpoints/best.ckpt (highest val_instance_dice).
"""
import argparse
import csv
import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from dataset import CellDataModule, DataError
from energy import EnergyCallback
from unet import UNet


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root_dir", required=True, help="data root, challenge or CTC layout")
    parser.add_argument("--train_seqs", default=None, help="comma-separated (default a,b; 01,02 in CTC layout)")
    parser.add_argument("--val_seqs", default=None, help="comma-separated (default c; 03 in CTC layout)")
    parser.add_argument("--num_epochs", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--input_size", type=int, default=512, help="frames are resized to this square size")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--accelerator", default="auto", help="auto, gpu, cpu")
    parser.add_argument("--devices", default="auto", help="number of devices, or auto")
    parser.add_argument("--precision", default=None,
                        help="default: 16-mixed on CUDA, 32-true on CPU (any Lightning precision string)")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out_dir", default="runs/default", help="run folder: metrics, checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out_dir from checkpoints/last.ckpt")
    parser.add_argument("--early_stopping_patience", type=int, default=0,
                        help="stop when val_instance_dice has not improved for this many epochs (0: never)")
    parser.add_argument("--progress_bar", action="store_true", help="show Lightning's progress bar")
    args = parser.parse_args(argv)
    if args.input_size % 8:
        parser.error(f"--input_size must be a multiple of 8 (three 2x2 poolings), got {args.input_size}")
    return args


def restore_metrics(logger: CSVLogger, metrics_file: str, completed_epochs: int):
    """Lightning's CSV writer deletes an existing metrics.csv when a run restarts in the same folder; hand it the
    rows of the epochs the checkpoint holds, so the resumed run keeps one complete log."""
    with open(metrics_file, newline="") as file:
        for row in csv.DictReader(file):
            if row.get("epoch") and int(float(row["epoch"])) < completed_epochs:
                values = {k: int(float(v)) if k == "epoch" else float(v)
                          for k, v in row.items() if v not in ("", None) and k != "step"}
                logger.log_metrics(values, step=int(float(row["step"])))


def main(argv=None):
    args = parse_args(argv)
    L.seed_everything(args.seed, workers=True)
    cuda = torch.cuda.is_available() and args.accelerator in ("auto", "gpu", "cuda")
    precision = args.precision or ("16-mixed" if cuda else "32-true")

    checkpoint_dir = os.path.join(args.out_dir, "checkpoints")
    last_checkpoint = os.path.join(checkpoint_dir, "last.ckpt")
    if args.resume and not os.path.isfile(last_checkpoint):
        sys.exit(f"error: --resume, but {last_checkpoint} does not exist")
    if not args.resume and os.path.isfile(last_checkpoint):
        sys.exit(f"error: {args.out_dir} already holds a run; continue it with --resume or choose another --out_dir")

    split = lambda value: value.split(",") if value else None
    try:
        data = CellDataModule(args.root_dir, split(args.train_seqs), split(args.val_seqs), batch_size=args.batch_size,
                              input_size=args.input_size, num_workers=args.num_workers)
        data.frames("train", True), data.frames("val", True)  # fail on bad layout now, not after model set-up
    except DataError as error:
        sys.exit(f"error: {error}")
    model = UNet(lr=args.lr, num_epochs=args.num_epochs, input_size=args.input_size)

    logger = CSVLogger(args.out_dir, name="", version="")
    metrics_file = os.path.join(args.out_dir, "metrics.csv")
    if args.resume and os.path.isfile(metrics_file):
        completed = torch.load(last_checkpoint, map_location="cpu", weights_only=False)["epoch"] + 1
        restore_metrics(logger, metrics_file, completed)

    checkpoints = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor="val_instance_dice", mode="max",
                                  save_top_k=1, save_last=True)
    callbacks = [checkpoints, EnergyCallback()]
    if args.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val_instance_dice", mode="max", min_delta=0.002,
                                       patience=args.early_stopping_patience))
    trainer = L.Trainer(
        max_epochs=args.num_epochs, accelerator=args.accelerator, devices=args.devices, precision=precision,
        logger=logger, callbacks=callbacks, benchmark=cuda, log_every_n_steps=1,
        enable_progress_bar=args.progress_bar, deterministic=False,
    )
    trainer.fit(model, datamodule=data, ckpt_path=last_checkpoint if args.resume else None)
    print(f"best val_instance_dice: {checkpoints.best_model_score}; checkpoints in {checkpoint_dir}")
    return checkpoints


if __name__ == "__main__":
    main()
