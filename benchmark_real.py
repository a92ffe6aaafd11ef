"""Quality on real microscopy, recipes side by side: scores on frames used for neither training nor model selection.

    python benchmark_real.py                                   # every dataset, every recipe (hours on a 2-core CPU)
    python benchmark_real.py --datasets trpL --recipes ceiling,patches
    python benchmark_real.py --faithful_epochs 30              # a shorter faithful run, named as such in the table

Data (read from ../shared/real, never copied into the repository; written as sequences under --out_dir/data):
- trpL: the E. coli time-lapse, 20 frames of 727 x 1026 uint16 at their own size: frames 0-11 train (a), 12-14
  select the best checkpoint (b), 15-19 are the test frames (c).
- usiigaci: phase-contrast mammalian cells, 1022 x 1024: a's frames 0-17 and b's even frames train (30), a's 18-21
  select, b's 11 odd frames are the test (SPLITS says why); usiigaci_by_sequence: the first split, a's frames 0-17
  train, 18-21 select, b's 23 frames test.

Rows per dataset: the method's ceiling (ground truth -> border-core targets -> postprocessing), the faithful recipe
(SPEC §4), the patch recipe from scratch, and, where a checkpoint is given (--generalist), that model zero-shot and
fine-tuned. Instance Dice on the test frames at 256 x 256 (the challenge's) and at the frames' own size; the CPU-seconds
of each training (user + system of the training process and its children, from os.wait4) and its wall time, and the
size filter its best.ckpt chose on the validation frames (min_area_fraction). Writes the table as CSV and JSON into
--out_dir.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd

from augment import median_cell_width
from border_core import border_core_targets, instances_from_border_core, resize_nearest
from data_files import DataError, list_frames, read_mask, read_tiff_2d, write_sequence
from eval import evaluate
from metrics import instance_dice
from unet import load_checkpoint

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED_REAL = os.path.join(ROOT, "..", "shared", "real")

# name -> train (a), select (b) and test (c) sequences, each made of pieces: (source, frame range). A source is a path
# under ../shared/real: a sequence folder with its masks (challenge or CTC layout), or the stem of an image stack and
# its mask stack, <stem>_img.tif and <stem>_mask.tif (trpL).
# Usiigaci's frames are unrelated fields of view of two kinds: large cells (median area 2,700-4,300 px: a's frames
# 0-11, 16, 17, 20, 21 and b's 0-6) and small, crowded ones (1,000-1,600 px: a's 12-15, 18, 19 and b's 7-22). Split by
# sequence ("usiigaci_by_sequence", the first benchmark's split), training holds 4 crowded frames and the test 16;
# "usiigaci" interleaves b, so training and test frames come from the same mix, and b's odd frames stay unseen.
TRPL = "trpL/trpL_150310-11"
SPLITS = {
    "trpL": {"a": [(TRPL, slice(0, 12))], "b": [(TRPL, slice(12, 15))], "c": [(TRPL, slice(15, 20))]},
    "usiigaci": {"a": [("usiigaci/a", slice(0, 18)), ("usiigaci/b", slice(0, None, 2))],
                 "b": [("usiigaci/a", slice(18, 22))], "c": [("usiigaci/b", slice(1, None, 2))]},
    "usiigaci_by_sequence": {"a": [("usiigaci/a", slice(0, 18))], "b": [("usiigaci/a", slice(18, 22))],
                             "c": [("usiigaci/b", slice(0, None))]},
}


def source_frames(real_dir: str, source: str, frames: slice):
    """(image, mask) pairs of one piece of a real dataset."""
    path = os.path.join(real_dir, source)
    if os.path.isfile(path + "_img.tif"):
        import tifffile
        return list(zip(tifffile.imread(path + "_img.tif")[frames], tifffile.imread(path + "_mask.tif")[frames]))
    root, sequence = os.path.split(path)
    return [(read_tiff_2d(f.image_path), read_mask(f.mask_path)) for f in list_frames(root, sequence, True)[frames]]


def prepare(real_dir: str, dataset: str, data_root: str) -> str:
    root = os.path.join(data_root, dataset)
    for sequence, pieces in SPLITS[dataset].items():
        if not os.path.isdir(os.path.join(root, sequence)):
            write_sequence(root, sequence, [pair for source, frames in pieces
                                            for pair in source_frames(real_dir, source, frames)])
    return root


def ceiling(root: str, sequence: str = "c") -> dict:
    """Instance Dice of the ground truth passed through targets and postprocessing: what a perfect model scores."""
    native, small = [], []
    for frame in list_frames(root, sequence, with_masks=True):
        gt = read_mask(frame.mask_path)
        instances = instances_from_border_core(border_core_targets(gt))
        native.append(instance_dice(gt, instances))
        small.append(instance_dice(resize_nearest(gt, (256, 256)), resize_nearest(instances, (256, 256))))
    return {"dice_256": float(np.mean(small)), "dice_native": float(np.mean(native))}


def run_timed(command: list[str], log_path: str) -> tuple[float, float]:
    """Run a command to completion with its output in a log; (CPU-seconds of it and its children, wall seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: {log_path}: {' '.join(command[:2])} failed, see the log")
    return usage.ru_utime + usage.ru_stime, time.perf_counter() - start


def score(root: str, checkpoint: str, pred_dir: str, log_dir: str, extra=()) -> dict:
    """Predict the test sequence c with a checkpoint and score it at 256 and at native size."""
    os.makedirs(log_dir, exist_ok=True)
    run_timed([sys.executable, "inference.py", "--root_dir", root, "--seqs", "c", "--from_checkpoint", checkpoint,
               "--pred_dir", pred_dir, "--native", *extra], os.path.join(log_dir, "inference.log"))
    return {"dice_256": float(evaluate(pred_dir, root, ["c"])["score"].mean()),
            "dice_native": float(evaluate(pred_dir, root, ["c"], native=True)["score"].mean())}


def training_cell_width(root: str) -> float:
    """The cells' width in the training sequence a (px): what a user knows of their own data. A model trained here
    predicts the test frames with it (`inference.py --cell_width`); a weak model's own estimate of the scale can be
    far off (it finds fragments), and the test masks are not looked at."""
    return median_cell_width(read_mask(f.mask_path) for f in list_frames(root, "a", with_masks=True))


def train_and_score(root: str, run_dir: str, train_args: list[str]) -> dict:
    os.makedirs(run_dir, exist_ok=True)
    cpu, wall = run_timed([sys.executable, "train.py", "--root_dir", root, "--train_seqs", "a", "--val_seqs", "b",
                           "--out_dir", os.path.join(run_dir, "run"), "--progress_bar", "off", *train_args],
                          os.path.join(run_dir, "train.log"))
    best = os.path.join(run_dir, "run", "checkpoints", "best.ckpt")
    result = score(root, best, os.path.join(run_dir, "pred"), run_dir,
                   ["--cell_width", f"{training_cell_width(root):.2f}"])
    metrics = pd.read_csv(os.path.join(run_dir, "run", "metrics.csv"))
    result.update(cpu_seconds=cpu, wall_seconds=wall, epochs=int(metrics["epoch"].max() + 1),
                  best_val=float(metrics["val_instance_dice"].max()),
                  min_area_fraction=float(load_checkpoint(best)["hyper_parameters"].get("min_area_fraction", 0)))
    return result


def add_cost_to_beat_faithful(rows: list[dict], out_dir: str):
    """cpu_to_beat_faithful: the CPU-seconds a training spent until its validation score first reached the faithful
    recipe's best one (its epochs' epoch_cpu_seconds in metrics.csv, summed), on the same dataset."""
    for faithful in [row for row in rows if row["recipe"].startswith("faithful")]:
        for row in rows:
            folder = os.path.join(out_dir, row["dataset"], row["recipe"], "run", "metrics.csv")
            if row["dataset"] != faithful["dataset"] or not os.path.isfile(folder):
                continue
            epochs = pd.read_csv(folder).groupby("epoch").first()
            cost = epochs["epoch_cpu_seconds"].cumsum()
            reached = epochs.index[epochs["val_instance_dice"] >= faithful["best_val"]]
            row["cpu_to_beat_faithful"] = float(cost[reached[0]]) if len(reached) else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real_dir", default=SHARED_REAL, help="the real data (see its README)")
    parser.add_argument("--out_dir", default="runs/benchmark_real")
    parser.add_argument("--datasets", default="trpL,usiigaci")
    parser.add_argument("--recipes", default="ceiling,faithful,patches,zero_shot,fine_tuned")
    parser.add_argument("--faithful_epochs", type=int, default=100, help="SPEC §4: 100")
    parser.add_argument("--patch_args", default="", help="extra train.py arguments of the patch recipe")
    parser.add_argument("--generalist", default=None, help="a checkpoint for the zero-shot and fine-tuned rows")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.real_dir):
        sys.exit(f"error: {args.real_dir}: real data not found (see ../shared/real/README.md)")
    recipes = args.recipes.split(",")
    rows = []
    for dataset in args.datasets.split(","):
        try:
            root = prepare(args.real_dir, dataset, os.path.join(args.out_dir, "data"))
        except DataError as error:
            sys.exit(f"error: {error}")
        out = os.path.join(args.out_dir, dataset)
        todo = {
            "ceiling": lambda: ceiling(root),
            "faithful": lambda: train_and_score(root, os.path.join(out, "faithful"), [
                "--recipe", "faithful", "--num_epochs", str(args.faithful_epochs)]),
            "patches": lambda: train_and_score(root, os.path.join(out, "patches"), [
                "--recipe", "patches", *args.patch_args.split()]),
        }
        if args.generalist:
            todo["zero_shot"] = lambda: score(root, args.generalist, os.path.join(out, "zero_shot", "pred"),
                                              os.path.join(out, "zero_shot"))
            todo["fine_tuned"] = lambda: train_and_score(root, os.path.join(out, "fine_tuned"), [
                "--recipe", "patches", "--init_from", args.generalist, *args.patch_args.split()])
        for recipe in recipes:
            if recipe not in todo:
                continue
            label = f"faithful ({args.faithful_epochs} epochs)" if recipe == "faithful" else recipe
            print(f"{dataset}: {label} ...", flush=True)
            row = {"dataset": dataset, "recipe": label, **todo[recipe]()}
            rows.append(row)
            print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                                   if k not in ("dataset", "recipe")), flush=True)
    add_cost_to_beat_faithful(rows, args.out_dir)
    table = pd.DataFrame(rows)
    os.makedirs(args.out_dir, exist_ok=True)
    table.to_csv(os.path.join(args.out_dir, "benchmark_real.csv"), index=False)
    with open(os.path.join(args.out_dir, "benchmark_real.json"), "w") as file:
        json.dump(rows, file, indent=2)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
