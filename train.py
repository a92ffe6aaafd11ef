"""Train the border-core U-Net.

    python train.py --root_dir /path/to/data_root                       # the baseline's recipe: 100 epochs, batch 16, 512 px
    python train.py --root_dir data --num_epochs 5 --out_dir runs/try   # a short run
    python train.py --root_dir data --out_dir runs/try --resume         # continue runs/try from its last checkpoint
    srun python train.py --root_dir data                                 # in an sbatch job: one DDP process per task

A run folder (--out_dir) holds metrics.csv (per epoch: a row of train and a row of val metrics), hparams.yaml and checkpoints/last.ckpt and
checkpoints/best.ckpt (highest val_instance_dice).

Under SLURM (srun), Lightning's SLURMEnvironment takes ranks and nodes from the job; devices and nodes default to the
job's --ntasks-per-node and --nodes. On the job's warning signal before its time limit (SIGUSR1, `#SBATCH
--signal=USR1@...`) the run saves checkpoints/requeue.ckpt and requeues the job; the requeued job (SLURM_RESTART_COUNT
> 0) resumes by itself from whichever of last.ckpt and requeue.ckpt is further into training.

`kill <pid>` (SIGTERM) stops a single-process run at once, exit status 143; its checkpoints are those of the last
complete epoch. Checkpoints are only ever read weights-only (unet.load_checkpoint): a planted file cannot run code.
"""
import argparse
import csv
import glob
import os
import signal
import subprocess
import sys
import time

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only

from augment import median_cell_width
from data_files import DataError, error_line, read_mask
from dataset import CellDataModule
from energy import POWERCAP_ROOT, Counter, EnergyMeter, Reading, format_report
from unet import (DEFAULT_WIDTHS, SCALE_TOLERANCE, UNet, choose_min_area_fraction, export_weights, load_checkpoint,
                  load_model, record_hparams)

say = rank_zero_only(print)  # lines said before the Trainer exists, by every DDP process alike: once is enough


# The flags' defaults of each recipe. 'faithful' is the baseline's (SPEC §4); 'patches' is what works on real
# microscopy (README: measured figures): the frames' own scale, patches, augmentation, a minimum of steps.
RECIPES = {
    "faithful": dict(num_epochs=100, batch_size=16, input_size=512, patch_size=0, patches_per_epoch=0, tile_size=512,
                     intensity="baseline", min_steps=0, min_area_fraction="0"),
    "patches": dict(num_epochs=15, batch_size=8, input_size=512, patch_size=128, patches_per_epoch=128,
                    tile_size=512, intensity="percentile", min_steps=200, min_area_fraction="auto"),
}


# Fine-tuning's learning rate: 1e-4 where the starting model already scores this much on the validation frames
# before training, 1e-3 where it does not (the bundled model so measured: trpL 0.80, Usiigaci 0.07).
KNOWN_CELLS_DICE = 0.5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root_dir", required=True, help="data root, challenge or CTC layout")
    parser.add_argument("--train_seqs", default=None, help="comma-separated (default a,b; 01,02 in CTC layout)")
    parser.add_argument("--val_seqs", default=None, help="comma-separated (default c; 03 in CTC layout)")
    parser.add_argument("--recipe", default="patches", choices=sorted(RECIPES),
                        help="defaults of the flags below: 'patches' (random augmented patches at the frames' own "
                             "scale, tiled validation) or 'faithful' (the baseline's SPEC §4: whole frames resized to "
                             "512, 100 epochs, batch 16); any flag given explicitly wins")
    parser.add_argument("--num_epochs", type=int, default=None, help="epochs; also the cosine schedule's T_max")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--input_size", type=int, default=None,
                        help="faithful recipe: frames are resized to this square size")
    parser.add_argument("--patch_size", type=int, default=None,
                        help="patch recipe: side of the random training patches (0: the faithful whole-frame view)")
    parser.add_argument("--patches_per_epoch", type=int, default=None, help="patch recipe: patches in one epoch")
    parser.add_argument("--tile_size", type=int, default=None,
                        help="patch recipe: tile side for validation and inference on whole frames")
    parser.add_argument("--intensity", default=None, choices=["percentile", "baseline"],
                        help="normalisation rule: percentile (every dtype stretched per frame) or baseline (uint8 "
                             "as is)")
    parser.add_argument("--no_augment", action="store_true", help="patch recipe: plain crops, no augmentation")
    parser.add_argument("--fixed_orientation", action="store_true",
                        help="patch recipe: no rotations or mirrors in the augmentation, for masks that sit at a fixed "
                             "offset from the cells (e.g. drawn on another channel) or frames whose look has a "
                             "direction; scale, intensity, blur and noise stay")
    parser.add_argument("--contact_weight", type=float, default=0,
                        help="patch recipe: extra loss weight of the pixels where touching cells meet (within 2 px "
                             "of two cells), the ones that decide whether they come apart, as the U-Net paper's "
                             "weight map does (0: every pixel counts the same)")
    parser.add_argument("--elastic", type=float, default=0,
                        help="patch recipe: elastic deformation of each patch, random displacements of about this "
                             "many px (standard deviation at control points at most 64 px apart, smooth between), "
                             "bending and stretching cells into new shapes, for few annotated frames (0: none)")
    parser.add_argument("--no_intensity_augment", action="store_true",
                        help="patch recipe: no gamma, contrast, brightness, blur or noise in the augmentation "
                             "(scale, rotations and mirrors stay), for frames that all come from one microscope "
                             "and one setting, where the shifts of grey value it imitates do not occur")
    parser.add_argument("--model_cell_width", type=float, default=None,
                        help="patch recipe: rescale the training frames so that cells are this wide (px), the "
                             "model's scale; default: the frames' own scale, or the --init_from model's")
    parser.add_argument("--min_area_fraction", default=None,
                        help="postprocessing: instances of at most this fraction of the frame's typical cell area "
                             "(the area-weighted median) are dropped; 'auto' (patch recipe): chosen after training "
                             "on the validation frames among 0 and 1/32 .. 1/2, recorded in best.ckpt (faithful "
                             "recipe: 0)")
    parser.add_argument("--widths", default=None,
                        help="channels of the U-Net's levels, e.g. 32,64,128,256,512 (one level more: twice the "
                             "field of view, for large cells); default 32,64,128,256, the baseline's, or the "
                             "--init_from model's (which cannot be changed)")
    parser.add_argument("--init_from", default=None,
                        help="start from this checkpoint's weights (fine-tuning), e.g. the bundled model")
    parser.add_argument("--export_to", default=None,
                        help="after training, write the best checkpoint's weights (float16, with its hyperparameters) "
                             "to this file: how the bundled model is made")
    parser.add_argument("--min_steps", type=int, default=None,
                        help="early stopping never ends a run before this many optimiser steps")
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam's learning rate, annealed to 0 by a cosine over --num_epochs; default 1e-3; with "
                             "--init_from, 1e-4 where the starting model already segments the validation frames "
                             f"(Instance Dice >= {KNOWN_CELLS_DICE} before training: cells of a kind it knows; trpL: "
                             "0.928 on the test frames with every seed tried, against 0.856-0.934 at 1e-3), else 1e-3 "
                             "(another kind of cells; bacteria model on mammalian cells: 0.551 at 1e-3, 0.505 at "
                             "1e-4)")
    parser.add_argument("--ema_decay", type=float, default=0,
                        help="keep an exponential moving average of the weights, updated every step (Lightning's "
                             "EMAWeightAveraging): validation, checkpoints and --export_to use the averaged weights, "
                             "which jump less between epochs (0: off; 0.98 averages over about 50 steps)")
    parser.add_argument("--accelerator", default="auto", help="auto, gpu, cpu")
    parser.add_argument("--devices", default=None,
                        help="devices (processes) per node; default: --ntasks-per-node under SLURM, else auto")
    parser.add_argument("--num_nodes", type=int, default=None,
                        help="nodes; default: the job's nodes under SLURM, else 1")
    parser.add_argument("--precision", default=None,
                        help="default: 16-mixed on CUDA, 32-true on CPU (any Lightning precision string)")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out_dir", default="runs/default", help="run folder: metrics, checkpoints")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out_dir from its newest checkpoint (automatic in a requeued job)")
    parser.add_argument("--max_time", default=None,
                        help="stop training after this wall time, DD:HH:MM:SS (Lightning's max_time), e.g. to end "
                             "inside a job's time slot; the checkpoints and the size filter's choice are made as after "
                             "a full run (the learning-rate schedule is still set by --num_epochs)")
    parser.add_argument("--early_stopping_patience", type=int, default=0,
                        help="stop when val_instance_dice has not improved for this many epochs (0: never)")
    parser.add_argument("--progress_bar", default="auto", choices=["auto", "on", "off"],
                        help="Lightning's progress bar: auto shows it when the console is a terminal")
    args = parser.parse_args(argv)
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lr is None and not args.init_from:
        args.lr = 1e-3  # with --init_from: chosen in train(), from the starting model's validation score
    if args.min_area_fraction != "auto":
        try:
            args.min_area_fraction = float(args.min_area_fraction)
        except ValueError:
            parser.error(f"--min_area_fraction: 'auto' or a number, got {args.min_area_fraction!r}")
    elif not args.patch_size:
        parser.error("--min_area_fraction auto needs the patch recipe (whole validation frames at the model's scale)")
    if args.widths:
        try:
            widths = tuple(int(w) for w in args.widths.split(","))
        except ValueError:
            widths = ()
        if len(widths) < 2 or min(widths) <= 0:
            parser.error(f"--widths: two or more positive integers separated by commas, got {args.widths!r}")
        args.widths = widths
    multiple = 2 ** (len(args.widths or DEFAULT_WIDTHS) - 1)
    for name in ("input_size", "patch_size", "tile_size"):
        if getattr(args, name) % multiple:
            parser.error(f"--{name} must be a multiple of {multiple} (one 2x2 pooling per level below the first), "
                         f"got {getattr(args, name)}")
    return args


class EnergyCallback(Callback):
    """Logs energy and time per training epoch and for the whole fit.

    Per epoch (the row of train_loss in metrics.csv; the epoch includes its validation):
        epoch_seconds, epoch_cpu_seconds                      always
        energy_wh, power_w                                    where any counter is readable
        energy_gpu_wh / energy_cpu_wh                         where that kind is readable
    Run totals, from fit start to train end, one extra row without `epoch` (so a --resume does not restore them; after
    a resume they cover the resumed part): run_seconds, run_cpu_seconds, and where readable run_energy_wh,
    run_power_w, run_energy_gpu_wh, run_energy_cpu_wh.

    It prints "energy: ..." at the start (what is measured, or "energy: not measurable here (why)") and the run's
    line at the end. Under DDP every rank reads its own GPU and local rank 0 of each node the RAPL counters; energies
    and CPU seconds are summed over ranks, power_w is the sum of the ranks' average powers, epoch_seconds is the
    slowest rank's and run_seconds rank 0's.
    counters: use these in every process instead of discovering (tests).
    """

    def __init__(self, powercap_root: str = POWERCAP_ROOT, poll_seconds: float | None = 30.0,
                 counters: list[Counter] | None = None):
        self.powercap_root, self.poll_seconds, self.counters = powercap_root, poll_seconds, counters
        self.meter = None

    def _sum_over_ranks(self, trainer, pl_module, values: list[float]) -> list[float]:
        dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64  # MPS has no float64
        tensor = torch.tensor(values, dtype=dtype, device=pl_module.device)
        return trainer.strategy.reduce(tensor, reduce_op="sum").tolist()

    def on_fit_start(self, trainer, pl_module):
        # after the strategy's set-up, so the model is on its device and the process group exists
        device = pl_module.device
        self.meter = EnergyMeter(gpus=[device.index or 0] if device.type == "cuda" else [],
                                 rapl=trainer.local_rank == 0, powercap_root=self.powercap_root,
                                 poll_seconds=self.poll_seconds, counters=self.counters).start()
        # every rank must log the same columns: a kind counts if any rank reads it
        gpu_count, cpu_count = self._sum_over_ranks(trainer, pl_module,
                                                    [self.meter.has("gpu"), self.meter.has("cpu")])
        self.kinds = [kind for kind, count in (("gpu", gpu_count), ("cpu", cpu_count)) if count > 0]
        # a run resumed in the middle of an epoch (SLURM requeue checkpoint) gets no on_train_epoch_start for it
        self.epoch_start = self.meter.read()
        if trainer.is_global_zero:
            why = f" ({'; '.join(self.meter.problems)})" if self.meter.problems else ""
            if self.kinds:
                print(f"energy: measuring {' and '.join(k.upper() for k in self.kinds)} counters "
                      f"(rank 0: {', '.join(c.name for c in self.meter.counters)}){why}")
            else:
                print(f"energy: not measurable here{why}; logging epoch_seconds and epoch_cpu_seconds instead")

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start = self.meter.read()

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = self.meter.read() - self.epoch_start
        values = {"epoch_seconds": (epoch.seconds, "max"), "epoch_cpu_seconds": (epoch.cpu_seconds, "sum")}
        if self.kinds:
            values["energy_wh"] = (epoch.energy_wh or 0.0, "sum")
            values["power_w"] = (epoch.power_w or 0.0, "sum")
        for kind in self.kinds:
            values[f"energy_{kind}_wh"] = ((epoch.gpu_wh if kind == "gpu" else epoch.cpu_wh) or 0.0, "sum")
        for name, (value, reduce_fx) in values.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx=reduce_fx)

    def on_train_end(self, trainer, pl_module):
        run = self.meter.stop()
        summed = self._sum_over_ranks(trainer, pl_module, [run.gpu_wh or 0.0, run.cpu_wh or 0.0, run.cpu_seconds])
        total = Reading(run.seconds, summed[2], summed[0] if "gpu" in self.kinds else None,
                        summed[1] if "cpu" in self.kinds else None)
        metrics = {"run_seconds": total.seconds, "run_cpu_seconds": total.cpu_seconds}
        if total.measured:
            metrics.update(run_energy_wh=total.energy_wh, run_power_w=total.power_w or 0.0)
        for kind in self.kinds:
            metrics[f"run_energy_{kind}_wh"] = total.gpu_wh if kind == "gpu" else total.cpu_wh
        for logger in trainer.loggers:  # loggers write on rank 0 only
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            print(f"{format_report(total)} (whole fit)")


class EpochLine(Callback):
    """One line per epoch on the console: what a newcomer looks at while a run trains. It also logs
    train_images_per_second: images (patches or frames) of the epoch's training part over its wall time, validation
    left out, summed over the processes under DDP; the GPU figure of the README."""

    def on_fit_start(self, trainer, pl_module):
        self.start = self.train_end = None  # a run resumed in the middle of an epoch starts no epoch before its end
        self.images = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.start, self.train_end, self.images = time.perf_counter(), None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += len(batch[0])

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking and self.train_end is None:
            self.train_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):  # after the epoch's validation
        now = time.perf_counter()
        train_seconds = (self.train_end or now) - (self.start or now)
        rate = self.images / train_seconds if self.start and train_seconds > 0 else 0.0
        pl_module.log("train_images_per_second", rate, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="sum")
        if trainer.is_global_zero:
            metrics = trainer.callback_metrics
            values = "  ".join(f"{name} {float(metrics[name]):.4f}" for name in
                               ("train_loss", "val_loss", "val_instance_dice") if name in metrics)
            took = f"{now - self.start:.1f} s ({rate:.3g} images/s in training)" if self.start else ""
            print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {values}  {took}", flush=True)


class RequeueOnSignal(Callback):
    """SLURM's warning signal before the time limit: save a checkpoint, then `scontrol requeue` the job, which
    resumes from it. Lightning's own auto-requeue does both inside the signal handler, on each rank at whatever
    moment the signal lands; under DDP the handler's barrier can meet another rank's gradient all-reduce and both
    wait forever (Lightning issue #21406; 2 of 5 tries hung here). So the handler only takes note, and all ranks act
    on it together at the end of a training step."""

    def __init__(self, path: str):
        self.path, self.signalled = path, False
        # at once: until a handler is set, SIGUSR1 ends the process. Forked loader workers inherit it: harmless there.
        signal.signal(signal.SIGUSR1, lambda signum, frame: setattr(self, "signalled", True))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Not after an epoch's last batch: resumed from there, Lightning would end the epoch without its train_loss
        # (the epoch's mean is not in a checkpoint). The epoch's end writes last.ckpt; the next batch acts on it.
        if trainer.num_training_batches > 1 and batch_idx + 1 == trainer.num_training_batches:
            return
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):  # no rank got it
            return
        self.signalled = False
        trainer.save_checkpoint(self.path)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            job = os.environ["SLURM_JOB_ID"]
            print(f"warning signal: saved {self.path}, requeueing job {job}", flush=True)
            # SLURM then ends this start (SIGTERM); the job starts again with SLURM_RESTART_COUNT > 0
            if subprocess.run(["scontrol", "requeue", job]).returncode:
                print(f"warning: scontrol requeue {job} failed; continue later with --resume", flush=True)


def fine_tuning_lr(model: UNet, data: CellDataModule, device: str = "cpu", resumed: bool = False) -> float:
    """The learning rate of a run started from another model's weights, from how well those weights already segment
    the validation frames: a tenth of 1e-3 keeps what a model knows of cells of its own kind (on trpL steady across
    seeds where 1e-3 was not), while cells of another kind need the larger steps (Usiigaci from the bacteria model:
    0.551 at 1e-3, 0.505 at 1e-4). The faithful recipe (no tiled validation here) and a resumed run (its optimiser
    state brings its rate back) take 1e-4 without the measurement."""
    if not model.hparams.patch_size or resumed:
        return 1e-4
    _, scores = choose_min_area_fraction(model.to(device), data.val_set)
    model.to("cpu").train()  # Lightning keeps the modes it finds: BatchNorm must not start training in eval mode
    start = max(scores.values())
    lr = 1e-4 if start >= KNOWN_CELLS_DICE else 1e-3
    say(f"--init_from model before training: val instance dice {start:.3f} "
        f"({'at least' if start >= KNOWN_CELLS_DICE else 'below'} {KNOWN_CELLS_DICE}): learning rate {lr:g}")
    return lr


def sequence_scales(widths: dict, target: float | None, validation_only=()) -> dict:
    """Each sequence's rescaling factor, from its cells' width (px): with a target width, a sequence is brought to it
    (simulated sequences differ; one movie's frames share theirs); without one, frames keep their own scale.
    Validation sequences are seen as inference will see frames of their width: a factor within SCALE_TOLERANCE is
    taken as 1 (inference.predict_sequence), so that best.ckpt is chosen on what inference will make of them."""
    scales = {}
    for sequence, width in widths.items():
        scale = target / width if target and width > 0 else 1.0
        if sequence in validation_only and SCALE_TOLERANCE[0] <= scale <= SCALE_TOLERANCE[1]:
            scale = 1.0
        scales[sequence] = scale
    return scales


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


class Terminated(BaseException):
    """Raised by the SIGTERM handler wherever the main thread is; BaseException so that no `except Exception` in
    between swallows it."""


def stop_on_sigterm():
    """`kill <pid>` stops training at once. Lightning's own handler only sets a flag that the loop reads at the end of
    a step, a minute away on a CPU at the default size. This handler raises instead: Lightning tears the loaders down
    (their workers with them) and the checkpoints on disk stay those of the last complete epoch (Lightning writes a
    checkpoint to a temporary file and renames it, so an interrupted save leaves the old one). Single process only:
    under DDP (and SLURM, whose requeue path sends SIGTERM to every rank) ranks must stop together, at a step's end."""
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid:  # a forked loader worker: the parent stops it
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process outright
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)  # Lightning calls it after its own, from the handler it installs in fit


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except (DataError, OSError) as error:
        sys.exit(error_line(error))


def train(args):
    L.seed_everything(args.seed, workers=True)
    cuda = torch.cuda.is_available() and args.accelerator in ("auto", "gpu", "cuda")
    precision = args.precision or ("16-mixed" if cuda else "32-true")

    checkpoint_dir = os.path.join(args.out_dir, "checkpoints")
    checkpoint = newest_checkpoint(args.out_dir)
    # a job that SLURM requeued (time limit, preemption) continues its run without being told
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", 0)) > 0
    if args.resume and checkpoint is None:
        sys.exit(f"error: --resume, but {checkpoint_dir} holds no last.ckpt or requeue.ckpt")
    if checkpoint and not (args.resume or requeued):
        sys.exit(f"error: {args.out_dir} already holds a run; continue it with --resume or choose another --out_dir")
    resume_from = checkpoint if args.resume or requeued else None
    # under SLURM Lightning resumes by itself from any hpc_ckpt_*.ckpt of the run folder: those are checked too
    if SLURMEnvironment.detect():
        for path in sorted(glob.glob(os.path.join(args.out_dir, "hpc_ckpt_*.ckpt"))):
            load_checkpoint(path)

    split = lambda value: value.split(",") if value else None
    data = CellDataModule(args.root_dir, split(args.train_seqs), split(args.val_seqs), batch_size=args.batch_size,
                          input_size=args.input_size, num_workers=args.num_workers, patch_size=args.patch_size,
                          patches_per_epoch=args.patches_per_epoch, intensity=args.intensity,
                          augment=not args.no_augment, turn=not args.fixed_orientation,
                          contact_weight=args.contact_weight, elastic=args.elastic,
                          photometric=not args.no_intensity_augment)
    init = load_model(args.init_from) if args.init_from else None
    if init is not None and args.widths and tuple(args.widths) != tuple(init.hparams.widths):
        sys.exit(f"error: {args.init_from}: its U-Net has widths {tuple(init.hparams.widths)}, not --widths "
                 f"{args.widths}")
    cell_width = None
    if args.patch_size:  # the model's scale: the cells' width in the frames it trains on
        frames = data.frames("train") + data.frames("val")
        widths = {sequence: median_cell_width(read_mask(f.mask_path) for f in frames if f.sequence == sequence)
                  for sequence in dict.fromkeys(f.sequence for f in frames)}
        data_width = float(np.nanmedian(list(widths.values())))
        target = args.model_cell_width or (init.hparams.cell_width if init is not None else None)
        if not args.model_cell_width and target and SCALE_TOLERANCE[0] <= target / data_width <= SCALE_TOLERANCE[1]:
            # fine-tuning on cells about as wide as the model's: keep the frames' own pixels, as inference does
            # (its estimated scale is 1 in this range), and record the data's width as the model's from now on
            target = None
        cell_width = target or data_width
        data.scale = sequence_scales(widths, target, validation_only={f.sequence for f in data.frames("val")} -
                                     {f.sequence for f in data.frames("train")})
        say(f"cells {data_width:.1f} px wide in the training frames (median of sequences); model's scale "
            f"{cell_width:.1f} px (sequences rescaled by {min(data.scale.values()):.2f}.."
            f"{max(data.scale.values()):.2f})")
    data.load()  # every frame read and checked before the run folder or the Trainer exists
    # a fine-tuned model keeps the architecture and thresholds of the one it starts from
    kept = {k: init.hparams[k] for k in ("widths", "small_center_threshold", "isolated_border_threshold")} if init \
        else {"widths": args.widths or DEFAULT_WIDTHS}
    model = UNet(lr=args.lr, num_epochs=args.num_epochs, input_size=args.input_size, patch_size=args.patch_size,
                 tile_size=args.tile_size, cell_width=cell_width, intensity=args.intensity,
                 min_area_fraction=0 if args.min_area_fraction == "auto" else args.min_area_fraction, **kept)
    if init is not None:
        model.load_state_dict(init.state_dict())
    if args.lr is None:
        # each DDP process on its own GPU, as Lightning will place it (LOCAL_RANK from its launcher, SLURM_LOCALID
        # under srun), not all on GPU 0
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        device = f"cuda:{local_rank % torch.cuda.device_count()}" if cuda else "cpu"
        model.hparams.lr = args.lr = fine_tuning_lr(model, data, device, resumed=bool(resume_from))

    logger = CSVLogger(args.out_dir, name="", version="")
    metrics_file = os.path.join(args.out_dir, "metrics.csv")
    if resume_from and os.path.isfile(metrics_file):
        restore_metrics(logger, metrics_file, completed_epochs(load_checkpoint(resume_from)))

    checkpoints = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor="val_instance_dice", mode="max",
                                  save_top_k=1)
    # last.ckpt at the end of every epoch. Not save_last=True above: Lightning 2.6 writes that one only in an epoch
    # whose score improved, so a run (or a resume) would end on an older epoch.
    last = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", enable_version_counter=False)
    callbacks = [checkpoints, last, EnergyCallback(), EpochLine()]
    if args.ema_decay:
        callbacks.append(EMAWeightAveraging(decay=args.ema_decay))
    if args.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val_instance_dice", mode="max", min_delta=0.002,
                                       patience=args.early_stopping_patience))
    # Under srun, one process per task: Lightning's SLURMEnvironment reads ranks from the job (without CUDA the same
    # processes train on the CPU, DDP over gloo). Its auto-requeue is off: RequeueOnSignal does that.
    slurm = SLURMEnvironment.detect()
    plugins = [SLURMEnvironment(auto_requeue=False)] if slurm else []
    if slurm:
        callbacks.append(RequeueOnSignal(os.path.join(checkpoint_dir, "requeue.ckpt")))
    devices = args.devices or (os.environ.get("SLURM_NTASKS_PER_NODE", "1") if slurm else "auto")
    num_nodes = args.num_nodes or (int(os.environ.get("SLURM_NNODES", 1)) if slurm else 1)
    # default_root_dir: on SLURM Lightning resumes by itself from any hpc_ckpt_*.ckpt found there; the run's own
    # folder, never the folder the job was submitted from
    progress_bar = args.progress_bar == "on" or (args.progress_bar == "auto" and sys.stderr.isatty())
    trainer = L.Trainer(
        max_epochs=args.num_epochs, min_steps=args.min_steps or None, max_time=args.max_time,
        accelerator=args.accelerator, devices=devices, num_nodes=num_nodes,
        precision=precision, plugins=plugins, default_root_dir=args.out_dir, logger=logger, callbacks=callbacks,
        benchmark=cuda, log_every_n_steps=1, enable_progress_bar=progress_bar, deterministic=False,
    )
    own_sigterm = not slurm and trainer.world_size == 1
    if own_sigterm:
        stop_on_sigterm()
    try:
        # weights_only: Lightning reads the checkpoint again (and under SLURM any hpc_ckpt_*.ckpt of the run folder)
        trainer.fit(model, datamodule=data, ckpt_path=resume_from, weights_only=True)
        if own_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # training is over: a SIGTERM now just ends the process
    except Terminated:
        last_path = os.path.join(checkpoint_dir, "last.ckpt")
        print("stopped by SIGTERM; " + (f"{last_path} holds the last complete epoch, continue with --resume"
                                        if os.path.isfile(last_path) else "no epoch was complete, no checkpoint"),
              file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    # Every process leaves the process group once training is over: a gloo group still alive when the interpreter
    # shuts down can abort the process ("terminate called without an active exception"; once in CI, rank 1 of a
    # 2-task SLURM job after its last epoch, failing the job). Nothing below needs the group.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.strategy.barrier()
        torch.distributed.destroy_process_group()
    if trainer.is_global_zero:
        print(f"best val_instance_dice: {checkpoints.best_model_score}; checkpoints in {checkpoint_dir}")
        if args.min_area_fraction == "auto" and checkpoints.best_model_path:
            best = load_model(checkpoints.best_model_path, "cuda" if cuda else "cpu")
            fraction, scores = choose_min_area_fraction(best, data.val_set)
            record_hparams(checkpoints.best_model_path, min_area_fraction=fraction)
            print("min_area_fraction chosen on the validation frames (val instance dice: " +
                  ", ".join(f"{f:g} {v:.4f}" for f, v in scores.items()) + f"): {fraction:g}, in best.ckpt")
        if args.export_to:
            export_weights(checkpoints.best_model_path, args.export_to)
            print(f"wrote {args.export_to} ({os.path.getsize(args.export_to) / 2 ** 20:.1f} MiB)")
    return checkpoints


if __name__ == "__main__":
    main()
