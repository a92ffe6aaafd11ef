"""Train the border-core U-Net.

    python train.py --root_dir DATA                                      # the recommended recipe, recipes/patches.yaml
    python train.py --root_dir DATA --config recipes/faithful.yaml       # the original baseline's recipe
    python train.py --root_dir DATA --init_from models/bacteria_generalist.pt --out_dir runs/mine   # fine-tune
    python train.py --root_dir DATA --out_dir runs/mine --resume         # continue a run from its newest checkpoint
    python train.py --config recipes/faithful.yaml --print_config        # the resolved recipe, then exit
    srun python train.py --root_dir DATA                                 # in an sbatch job: one DDP process per task

The recipe (a YAML file of recipe.Recipe's keys, recipes/*.yaml; --set KEY=VALUE changes one) decides how the model
is trained; the options decide what it trains on, where and for how long. The run folder (--out_dir) holds
recipe.yaml (the resolved recipe), metrics.csv (per epoch a row of train and a row of val metrics), hparams.yaml and
checkpoints/last.ckpt (every epoch) and checkpoints/best.ckpt (highest val_instance_dice; its size filter chosen on
the validation frames is in its hyperparameters).

`kill <pid>` (SIGTERM) stops a single-process run at once, exit status 143; its checkpoints are those of the last
complete epoch. Under SLURM the job's warning signal saves checkpoints/requeue.ckpt and requeues the job, which
resumes by itself (slurm.py). Checkpoints are only ever read weights-only (unet.load_checkpoint).
"""
import argparse
import contextlib
import os
import re
import signal
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

import data_files
from callbacks import EnergyCallback, EpochLine, WarmedEMA
from precision import trainer_precision
from checkpoint_io import AtomicCheckpointIO
from cli_types import HelpFormatter, non_negative_int, positive_float, positive_int
from data_files import DataError, atomic_write, default_sequences, error_line
from dataset import CellDataModule, labelled_frames, training_sets
from recipe import DEFAULT_RECIPE, RecipeError, load_recipe, recipe_yaml
from folder_lock import lock_folder
from run_folder import RunCheckpoint, StartingModelAsBest, checkpoint_to_resume, metrics_to_keep, restore_metrics
from slurm import RequeueOnSignal, Terminated, slurm_settings, stop_on_sigterm
from unet import UNet, export_weights, load_model, validation_score

say = rank_zero_only(print)  # lines said before the Trainer exists, by every DDP process alike: once is enough
KNOWN_CELLS_DICE = 0.5  # fine_tune_lr "auto": a starting model scoring this much already knows cells of this kind


def wall_time(text: str) -> str:
    if not re.fullmatch(r"\d+:\d\d:\d\d:\d\d", text):
        raise argparse.ArgumentTypeError(f"DD:HH:MM:SS expected, got {text!r}")
    return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--root_dir", help="data root, challenge or CTC layout (required unless --print_config)")
    add("--train_seqs", help="comma-separated sequences to train on (default: a,b; 01,02 in CTC layout)")
    add("--val_seqs", help="comma-separated sequences that choose the best checkpoint (default: c; 03 in CTC layout)")
    add("--out_dir", default="runs/default", help="run folder (default: %(default)s)")
    add("--config", default=os.path.relpath(DEFAULT_RECIPE), metavar="RECIPE.yaml",
        help="the recipe: recipes/patches.yaml (recommended) or recipes/faithful.yaml (the original baseline's); "
             "default: %(default)s")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="change one key of the recipe (repeatable)")
    add("--print_config", action="store_true", help="print the resolved recipe and exit")
    add("--init_from", help="start from this model's weights (fine-tuning), e.g. models/bacteria_generalist.pt")
    add("--num_epochs", type=positive_int, help="epochs (default: the recipe's)")
    add("--batch_size", type=positive_int, help="batch size (default: the recipe's)")
    add("--model_cell_width", type=positive_float,
        help="tiled view: rescale the training frames so that cells are this wide, px (default: the frames' own "
             "width, or the --init_from model's where it differs by more than the scale tolerance)")
    add("--resume", action="store_true",
        help="continue the run in --out_dir from its newest checkpoint (automatic in a requeued SLURM job)")
    add("--seed", type=int, default=42, help="random seed")
    add("--num_workers", type=non_negative_int, default=min(8, os.cpu_count() or 1), help="loader processes")
    add("--devices", help="devices (processes) per node (default: the job's tasks per node under SLURM, else auto)")
    add("--precision", help="Lightning precision (default: 16-mixed on CUDA; on a CPU bf16-mixed where it has bf16 "
                            "units, else 32-true: precision.py)")
    add("--export_to", help="after training, write the best checkpoint's weights (float16) here, as the bundled model")
    add("--max_time", type=wall_time, help="stop after this wall time, DD:HH:MM:SS, with whole checkpoints")
    add("--max_pixels", type=positive_int, default=data_files.MAX_PIXELS,
        help="refuse frames larger than this many pixels (checked before they are decoded)")
    args = parser.parse_args(argv)
    if not args.root_dir and not args.print_config:
        parser.error("--root_dir is required")
    data_files.MAX_PIXELS = args.max_pixels  # loader workers are forked: they inherit it
    args.set += [f"{name}={getattr(args, name)}" for name in ("num_epochs", "batch_size") if getattr(args, name)]
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.set)
    except RecipeError as error:
        sys.exit(f"error: {error}")
    if args.print_config:
        print(recipe_yaml(recipe), end="")
        return None
    try:
        return train(args, recipe)
    except (DataError, OSError) as error:
        sys.exit(error_line(error))


def build(args, recipe, init: UNet | None) -> tuple[CellDataModule, UNet]:
    """The data module and the model, every frame read and checked before anything is written."""
    split = lambda value, role: value.split(",") if value else default_sequences(args.root_dir, role)
    train_frames = labelled_frames(args.root_dir, split(args.train_seqs, "train"))
    val_frames = labelled_frames(args.root_dir, split(args.val_seqs, "val"))
    train_set, val_set, cell_width = training_sets(train_frames, val_frames, recipe, args.model_cell_width,
                                                   init.hparams.cell_width if init is not None else None)
    if cell_width is not None:
        scales = train_set.scales.values()
        say(f"model's scale {cell_width:.1f} px (sequences rescaled by {min(scales):.2f}..{max(scales):.2f})")
    data = CellDataModule(train_set, val_set, recipe.batch_size, recipe.batch_size if recipe.view == "resized" else 1,
                          args.num_workers)
    # a fine-tuned model keeps the architecture and thresholds of the one it starts from
    kept = {k: init.hparams[k] for k in ("widths", "small_center_threshold", "isolated_border_threshold")} \
        if init is not None else {"widths": recipe.widths}
    if init is not None and tuple(init.hparams.widths) != tuple(recipe.widths):
        say(f"{args.init_from}: keeps its widths {tuple(init.hparams.widths)} (the recipe's are {recipe.widths})")
    model = UNet(lr=recipe.lr, num_epochs=recipe.num_epochs, view=recipe.view, input_size=recipe.input_size,
                 tile_size=recipe.tile_size, cell_width=cell_width, intensity=recipe.intensity,
                 choose_size_filter=recipe.size_filter, dice_weight=recipe.dice_weight,
                 test_flips=recipe.test_flips, **kept)
    if init is not None:
        model.load_state_dict(init.state_dict())
    return data, model


def starting_model_score(model: UNet, data: CellDataModule, cuda: bool) -> tuple[float, float]:
    """The Instance Dice of a fine-tuning run's starting model on the validation frames, and its size filter."""
    # each DDP process on its own GPU, as Lightning will place it (LOCAL_RANK, or SLURM_LOCALID under srun)
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    score, fraction = validation_score(model, data.val_set,
                                       f"cuda:{local_rank % torch.cuda.device_count()}" if cuda else "cpu")
    model.to("cpu").train()  # Lightning keeps the modes it finds: BatchNorm must not start training in eval mode
    say(f"--init_from model before training: val instance dice {score:.3f}")
    return score, fraction


def fine_tuning_lr(recipe, start_score: float) -> float:
    """A fine-tuning run's learning rate: a tenth of 1e-3 keeps what a model knows of cells of its own kind, while
    cells of another kind need the larger steps. "auto" tells them apart by the starting model's validation score."""
    if recipe.fine_tune_lr != "auto":
        return float(recipe.fine_tune_lr)
    lr = 1e-4 if start_score >= KNOWN_CELLS_DICE else 1e-3
    say(f"fine-tuning learning rate {lr:g} (starting score {'>=' if lr == 1e-4 else '<'} {KNOWN_CELLS_DICE})")
    return lr


def make_trainer(args, recipe, cuda: bool, start: tuple[float, float] | None = None
                 ) -> tuple[L.Trainer, RunCheckpoint, bool]:
    """The Trainer and its best.ckpt callback; `start` (a fine-tuning run's starting score and size filter) makes the
    starting model the first candidate for best.ckpt."""
    checkpoint_dir = os.path.join(args.out_dir, "checkpoints")
    best = RunCheckpoint(dirpath=checkpoint_dir, filename="best", monitor="val_instance_dice", mode="max",
                         save_top_k=1)
    # last.ckpt every epoch; not save_last=True above, which Lightning writes only in an epoch whose score improved
    last = RunCheckpoint(dirpath=checkpoint_dir, filename="last", enable_version_counter=False)
    callbacks = [best, last, EnergyCallback(), EpochLine()]
    if start is not None:
        callbacks.append(StartingModelAsBest(best, *start))
    if recipe.ema_decay:
        callbacks.append(WarmedEMA(recipe.ema_decay))
    if recipe.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val_instance_dice", mode="max", min_delta=0.002,
                                       patience=recipe.early_stopping_patience))
    slurm, plugins, devices, num_nodes = slurm_settings(args.devices)
    if slurm:
        callbacks.append(RequeueOnSignal(os.path.join(checkpoint_dir, "requeue.ckpt")))
    # default_root_dir: on SLURM Lightning resumes by itself from any hpc_ckpt_*.ckpt found there: the run's folder
    trainer = L.Trainer(
        max_epochs=recipe.num_epochs, min_steps=recipe.min_steps or None, max_time=args.max_time,
        check_val_every_n_epoch=recipe.val_every,
        accelerator=recipe.accelerator, devices=devices, num_nodes=num_nodes,
        precision=trainer_precision(args.precision, cuda), plugins=plugins + [AtomicCheckpointIO()],
        default_root_dir=args.out_dir, logger=CSVLogger(args.out_dir, name="", version=""), callbacks=callbacks,
        benchmark=cuda, log_every_n_steps=1, enable_progress_bar=sys.stderr.isatty(), deterministic=False)
    return trainer, best, slurm


def train(args, recipe):
    L.seed_everything(args.seed, workers=True)
    cuda = torch.cuda.is_available() and recipe.accelerator in ("auto", "gpu", "cuda")
    resume_from = checkpoint_to_resume(args.out_dir, args.resume)
    kept_metrics = metrics_to_keep(args.out_dir, resume_from)
    init = load_model(args.init_from) if args.init_from else None
    data, model = build(args, recipe, init)
    # channels_last: the layout oneDNN's CPU convolutions and a GPU's tensor cores prefer (tiling.arithmetic_of
    # lays out validation's tiles for it)
    model = model.to(memory_format=torch.channels_last)
    start = None
    if init is not None and not resume_from:  # a resumed run's optimiser state brings its rate back
        start = starting_model_score(model, data, cuda)
        model.hparams.lr = fine_tuning_lr(recipe, start[0])
    trainer, best, slurm = make_trainer(args, recipe, cuda, start)
    with contextlib.ExitStack() as held:
        if trainer.is_global_zero:  # one run per folder; the other DDP processes are this run's own
            held.enter_context(lock_folder(args.out_dir, "train.py"))
            atomic_write(os.path.join(args.out_dir, "recipe.yaml"),
                         lambda tmp: open(tmp, "w").write(recipe_yaml(recipe)), ".yaml.tmp")
        restore_metrics(trainer.logger, kept_metrics)
        fit(trainer, model, data, resume_from, own_sigterm=not slurm and trainer.world_size == 1)
        if trainer.is_global_zero:
            report(args, best, start[0] if start else None)
    return best


def report(args, best, start_score: float | None = None):
    print(f"best val_instance_dice: {best.best_model_score}; checkpoints in {best.dirpath}")
    if start_score is not None and best.best_model_score is not None and float(best.best_model_score) <= start_score:
        # too few or too unlike frames can unteach a model: best.ckpt is then the starting model (StartingModelAsBest)
        print(f"warning: no epoch beat the starting model on the validation frames (val instance dice "
              f"{start_score:.3f}): best.ckpt holds {args.init_from}'s weights; annotate more frames, or other ones",
              file=sys.stderr)
    if args.export_to and best.best_model_path:
        export_weights(best.best_model_path, args.export_to)
        print(f"wrote {args.export_to} ({os.path.getsize(args.export_to) / 2 ** 20:.1f} MiB)")


def fit(trainer: L.Trainer, model: UNet, data: CellDataModule, resume_from: str | None, own_sigterm: bool):
    """trainer.fit, stopped at once by SIGTERM in a single process (slurm.stop_on_sigterm)."""
    if own_sigterm:
        stop_on_sigterm()
    try:
        # weights_only: Lightning reads the checkpoint again (and under SLURM any hpc_ckpt_*.ckpt of the run folder)
        trainer.fit(model, datamodule=data, ckpt_path=resume_from, weights_only=True)
        if own_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # training is over: a SIGTERM now just ends the process
    except Terminated:
        last_path = os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
        print("stopped by SIGTERM; " + (f"{last_path} holds the last complete epoch, continue with --resume"
                                        if os.path.isfile(last_path) else "no epoch was complete, no checkpoint"),
              file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    # every process leaves the process group: a gloo group alive at interpreter shutdown can abort the process
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.strategy.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
