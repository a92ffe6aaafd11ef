"""Quality on real microscopy, recipes and the field's standard tool side by side: scores on frames used for neither
training nor model selection, against training CPU-seconds.

    python benchmark_real.py                                   # every dataset, every recipe (hours on a 2-core CPU)
    python benchmark_real.py --datasets trpL --recipes ceiling,patches,cellpose
    python benchmark_real.py --faithful_epochs 30              # a shorter faithful run, named as such in the table
    python benchmark_real.py --datasets usiigaci --recipes fine_tuned,cellpose --frames 1,2,4,8 \
        --generalist models/bacteria_generalist.pt             # the learning curve: a few annotated frames
    python benchmark_real.py --datasets trpL --recipes patches --variant dice1 --patch_args "--set dice_weight=1"

Data (read from ../shared/real, never copied into the repository; written as sequences under --out_dir/data):
- trpL: the E. coli time-lapse, 20 frames of 727 x 1026 uint16 at their own size: frames 0-11 train (a), 12-14
  select the best checkpoint (b), 15-19 are the test frames (c).
- usiigaci: phase-contrast mammalian cells, 1022 x 1024: a's frames 0-17 and b's even frames train (30), a's 18-21
  select, b's 11 odd frames are the test (SPLITS says why); usiigaci_by_sequence: the first split, a's frames 0-17
  train, 18-21 select, b's 23 frames test.
- simulated: simulate.py's three sequences of 20 frames of 256 x 256 (SIMULATE_ARGS): a trains, b selects, c tests.

Rows per dataset: the method's ceiling (ground truth -> border-core targets -> postprocessing), the faithful recipe
(docs/baseline.md §4), the patch recipe from scratch, where a checkpoint is given (--generalist) that model zero-shot and
fine-tuned, and Cellpose 3 trained from scratch with its command-line defaults (peer_cellpose.py, in its own venv
.venv-cellpose, created when missing): one training run of its 500 epochs (or up to --cellpose_max_cpu_seconds),
a checkpoint every 10 epochs, scored at the checkpoints first past 1x, 2x and 4x the patch recipe's CPU-seconds
(CELLPOSE_BUDGETS), every --cellpose_score_every epochs, its last, and wherever an earlier call left a prediction.
Cellpose selects no checkpoint: sequence b only gives its test loss in the log. A Cellpose run whose folder already holds checkpoints.json is reused, not
retrained (delete the folder to retrain).

Scores, all on the test frames with eval.py's functions: Instance Dice at 256 x 256 (the challenge's) and at the
frames' own size, AP at IoU 0.5 (TP / (TP + FP + FN), counts pooled over the frames) at both sizes. Cellpose's masks
are written at the frames' own size and brought to 256 x 256 by the same rule as ours. Each tool finds the test
frames' scale from the training frames: ours are given the training masks' cell width (`training_cell_width`),
Cellpose, which has no size model when trained from scratch (its --train_size is not default), rescales them by
diam_mean / diam_labels, its training masks' mean diameter. Training CPU-seconds: user +
system of the training process and its children (os.wait4; Cellpose's: at each saved checkpoint, in-process); wall
time; the size filter best.ckpt chose (min_area_fraction). cellpose_at_equal_cpu: Cellpose's score (256) at the row's
CPU-seconds, interpolated between its checkpoints; ahead_of_cellpose: the row's score minus it.

Learning curve (--frames N,...): instead of the rows on all training frames, the patch, fine-tuned and cellpose rows
trained on N of them, spread evenly over them (`spread`), with the same selection and test frames; a table per
dataset and a plot of score against the number of frames (--curve_plot). Cellpose there trains its 500 epochs or up to --cellpose_max_cpu_seconds,
and its last checkpoint is scored. A variant (--variant NAME with --patch_args) is a row of its own beside the recipe's.

--rescore predicts and scores the test frames of every earlier row of ours again with its trained model, after a
change to inference.py, and leaves the training figures as they were.

Writes every row measured so far to --table (docs/benchmark_real.json, kept in the repository: rows of earlier calls
stay unless rerun, so the tables and plots can be drawn again without training, `--recipes none`), the same as CSV
into --out_dir, the plot of score against CPU-seconds (--plot), and the table as markdown between the markers of
--results_md.
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd

from scale import median_cell_width
from border_core import border_core_targets, instances_at_score_size, instances_from_border_core, resize_nearest
from data_files import (DataError, atomic_write, list_frames, numbered_files, read_mask, read_prediction,
                        read_tiff_2d, write_sequence, write_tiff_atomically, NATIVE_PREDICTION_PATTERN,
                        narrowest_unsigned, prediction_path, write_marked_block)
from eval import evaluate, sequence_scores
from metrics import instance_dice, pooled_ap
from unet import load_checkpoint

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED_REAL = os.path.join(ROOT, "..", "shared", "real")

# train.py's command lines, in one place: what changes when train.py's flags change
TRAIN_FLAGS = []  # every training run
FAITHFUL_FLAGS = ["--config", "recipes/faithful.yaml"]
PATCHES_FLAGS = []  # the recommended recipe, train.py's default (recipes/patches.yaml)

# the peer
CELLPOSE_VENV = os.path.join(ROOT, ".venv-cellpose")
CELLPOSE_TRAIN_FLAGS = ["--min_train_masks", "0", "--save_every", "10"]  # every training frame, as ours (docs/peers.md)
CELLPOSE_BUDGETS = (1, 2, 4)  # multiples of the patch recipe's CPU-seconds at which Cellpose is scored
SIMULATE_ARGS = ["--sequences", "3", "--without_gt", "0", "--frames", "20", "--size", "256", "--seed", "0"]
MACHINE_MARKS = "¹²³⁴⁵⁶⁷⁸⁹"  # a table's rows measured on a second, third, ... machine
RESULTS_START, RESULTS_END = "<!-- benchmark_real:start -->", "<!-- benchmark_real:end -->"

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
DATASETS = [*SPLITS, "simulated"]
VARIABLE = ("patches", "fine_tuned", "zero_shot")  # the rows --variant renames


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
    if dataset == "simulated":
        if not os.path.isdir(root):  # written beside, then renamed: a half-written set is never taken for whole
            staging = root + ".partial"
            shutil.rmtree(staging, ignore_errors=True)
            subprocess.run([sys.executable, "simulate.py", "--out_dir", staging, *SIMULATE_ARGS], cwd=ROOT,
                           check=True, stdout=subprocess.DEVNULL)
            os.replace(staging, root)
        return root
    for sequence, pieces in SPLITS[dataset].items():
        if not os.path.isdir(os.path.join(root, sequence)):
            write_sequence(root, sequence, [pair for source, frames in pieces
                                            for pair in source_frames(real_dir, source, frames)])
    return root


def spread(count: int, total: int) -> list[int]:
    """`count` frame indices spread evenly over `total` frames, first and last included: a subset that samples the
    whole set (early sparse and late dense frames of a time-lapse; both kinds of Usiigaci field).

    >>> spread(1, 12), spread(2, 12), spread(4, 12)
    ([0], [0, 11], [0, 4, 7, 11])
    """
    return [int(i) for i in np.unique(np.round(np.linspace(0, total - 1, count)).astype(int))] if count > 1 else [0]


def prepare_subset(root: str, frames: int) -> str:
    """A data root beside `root` whose training sequence a holds `frames` of a's frames (`spread`), b and c the same."""
    subset = f"{root}_{frames}frames"
    if not os.path.isdir(subset):
        staging = subset + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        for sequence in ("a", "b", "c"):
            listed = list_frames(root, sequence, with_masks=True)
            kept = [listed[i] for i in spread(frames, len(listed))] if sequence == "a" else listed
            write_sequence(staging, sequence, [(read_tiff_2d(f.image_path), read_mask(f.mask_path)) for f in kept])
        os.replace(staging, subset)
    return subset


def training_frames(root: str) -> int:
    return len(list_frames(root, "a", with_masks=True))


def ceiling(root: str, sequence: str = "c") -> dict:
    """Instance Dice of the ground truth passed through targets and postprocessing: what a perfect model scores."""
    native, small = [], []
    for frame in list_frames(root, sequence, with_masks=True):
        gt = read_mask(frame.mask_path)
        instances = instances_from_border_core(border_core_targets(gt))
        native.append((gt, instances))
        small.append((resize_nearest(gt, (256, 256)), resize_nearest(instances, (256, 256))))
    return {"dice_256": float(np.mean([instance_dice(*pair) for pair in small])),
            "dice_native": float(np.mean([instance_dice(*pair) for pair in native])),
            "ap50_256": pooled_ap(small), "ap50_native": pooled_ap(native)}


def run_timed(command: list[str], log_path: str) -> tuple[float, float]:
    """Run a command to completion with its output in a log; (CPU-seconds of it and its children, wall seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: {log_path}: {' '.join(command[:3])} failed, see the log")
    return usage.ru_utime + usage.ru_stime, time.perf_counter() - start


def test_scores(pred_dir: str, root: str) -> dict:
    """Instance Dice and AP at IoU 0.5 of the predictions of the test sequence c, at 256 x 256 and at native size."""
    small, native = evaluate(pred_dir, root, ["c"]), evaluate(pred_dir, root, ["c"], native=True)
    return {"dice_256": float(small["score"].mean()), "dice_native": float(native["score"].mean()),
            "ap50_256": sequence_scores(small)["ap50"], "ap50_native": sequence_scores(native)["ap50"]}


def score(root: str, checkpoint: str, pred_dir: str, log_dir: str, extra=()) -> dict:
    """Predict the test sequence c with a checkpoint and score it (the inference command and its CPU-seconds kept)."""
    os.makedirs(log_dir, exist_ok=True)
    command = [sys.executable, "inference.py", "--root_dir", root, "--seqs", "c", "--model", checkpoint,
               "--pred_dir", pred_dir, "--native", "--overwrite", *extra]
    cpu, _ = run_timed(command, os.path.join(log_dir, "inference.log"))
    return {**test_scores(pred_dir, root), "inference_cpu_seconds": cpu, "inference_command": shown_command(command)}


def training_cell_width(root: str) -> float:
    """The cells' width in the training sequence a (px): what a user knows of their own data. A model trained here
    predicts the test frames with it (`inference.py --cell_width`); a weak model's own estimate of the scale can be
    far off (it finds fragments), and the test masks are not looked at."""
    return median_cell_width(read_mask(f.mask_path) for f in list_frames(root, "a", with_masks=True))


def train_and_score(root: str, run_dir: str, train_args: list[str], score_args=()) -> dict:
    os.makedirs(run_dir, exist_ok=True)
    command = [sys.executable, "train.py", "--root_dir", root, "--train_seqs", "a", "--val_seqs", "b",
               "--out_dir", os.path.join(run_dir, "run"), *TRAIN_FLAGS, *train_args]
    cpu, wall = run_timed(command, os.path.join(run_dir, "train.log"))
    best = os.path.join(run_dir, "run", "checkpoints", "best.ckpt")
    result = score(root, best, os.path.join(run_dir, "pred"), run_dir,
                   ["--cell_width", f"{training_cell_width(root):.2f}", *score_args])
    metrics = pd.read_csv(os.path.join(run_dir, "run", "metrics.csv"))
    result.update(cpu_seconds=cpu, wall_seconds=wall, epochs=int(metrics["epoch"].max() + 1),
                  best_val=float(metrics["val_instance_dice"].max()),
                  min_area_fraction=float(load_checkpoint(best)["hyper_parameters"].get("min_area_fraction", 0)),
                  command=shown_command(command))
    return result


def rescore(row: dict) -> dict:
    """The row with its test frames predicted and scored again as `score` predicts them (the trained model kept, its
    training figures too): after a change to inference.py, no training is repeated. A model trained here is given the
    training frames' cell width, as in `train_and_score`."""
    words = row["inference_command"].split()
    if "--cell_width" in words:
        del words[words.index("--cell_width"):words.index("--cell_width") + 2]
    root = words[words.index("--root_dir") + 1]
    if row.get("command", "").startswith("python train.py"):
        words += ["--cell_width", f"{training_cell_width(root):.2f}"]
    command = [sys.executable if word == "python" else word for word in words]
    pred_dir = command[command.index("--pred_dir") + 1]
    log_dir = os.path.dirname(pred_dir.rstrip("/"))
    os.makedirs(log_dir, exist_ok=True)
    cpu, _ = run_timed(command, os.path.join(log_dir, "inference.log"))
    return {**row, **test_scores(pred_dir, root), "inference_cpu_seconds": cpu, "inference_command": " ".join(words)}


def shown_command(command: list[str]) -> str:
    """A command as a user would type it: `python` for this interpreter, paths relative to the repository."""
    words = ["python" if word == sys.executable else os.path.relpath(word, ROOT) if os.path.isabs(word) else word
             for word in command]
    return " ".join(words)


# ---- the peer: Cellpose 3 from scratch --------------------------------------------------------------------------

def cellpose_python(log_dir: str) -> str:
    """The peer venv's interpreter, the venv created first where it is missing (peer_cellpose.py install)."""
    python = os.path.join(CELLPOSE_VENV, "bin", "python")
    installed = os.path.isfile(python) and subprocess.run([python, "-c", "import cellpose.models"],
                                                          capture_output=True).returncode == 0
    if not installed:
        os.makedirs(log_dir, exist_ok=True)
        run_timed([sys.executable, "peer_cellpose.py", "install", "--venv", CELLPOSE_VENV],
                  os.path.join(log_dir, "install.log"))
    return python


def train_cellpose(root: str, run_dir: str, max_cpu_seconds: float) -> tuple[list[dict], str]:
    """Cellpose's checkpoints ({epochs, model, cpu_seconds, ...} each) and its training command; trained unless its
    checkpoints.json exists."""
    record = os.path.join(run_dir, "run", "checkpoints.json")
    command = [cellpose_python(run_dir), "peer_cellpose.py", "train", "--root_dir", root, "--train_seqs", "a",
               "--test_seqs", "b", "--out_dir", os.path.join(run_dir, "run"), *CELLPOSE_TRAIN_FLAGS,
               "--max_cpu_seconds", str(max_cpu_seconds)]
    if not os.path.isfile(record):
        os.makedirs(run_dir, exist_ok=True)
        run_timed(command, os.path.join(run_dir, "train.log"))
    with open(record) as file:
        return json.load(file)["checkpoints"], shown_command(command).replace(CELLPOSE_VENV, ".venv-cellpose")


def chosen_checkpoints(checkpoints: list[dict], reference_cpu: float | None, every: int) -> list[dict]:
    """The checkpoints to score: the first past each multiple of the reference CPU-seconds (CELLPOSE_BUDGETS), every
    `every` epochs, and the last; in order of training."""
    def first_past(key, value):
        return next((c["epochs"] for c in checkpoints if c[key] >= value), None)

    chosen = {checkpoints[-1]["epochs"]}
    chosen |= {first_past("epochs", epochs) for epochs in range(every, checkpoints[-1]["epochs"] + 1, every or 1)
               } if every else set()
    chosen |= {first_past("cpu_seconds", multiple * reference_cpu) for multiple in CELLPOSE_BUDGETS
               } if reference_cpu else set()
    return [c for c in checkpoints if c["epochs"] in chosen]


def write_score_size_predictions(pred_dir: str, sequence: str = "c"):
    """Each native label map <seq>/mask<N>.tif -> the challenge's <seq>/t<N>_256.tif, by our own rule."""
    for number, path in numbered_files(os.path.join(pred_dir, sequence), NATIVE_PREDICTION_PATTERN).items():
        native = read_prediction(path)
        write_tiff_atomically(prediction_path(pred_dir, sequence, number),
                              narrowest_unsigned(instances_at_score_size(native, native.shape)))


def predicted_every_frame(pred_dir: str, root: str, sequence: str = "c") -> bool:
    """Whether an earlier prediction left a native mask for every frame of the sequence (else it is predicted again)."""
    folder = os.path.join(pred_dir, sequence)
    frames = {frame.number for frame in list_frames(root, sequence, with_masks=False)}
    return os.path.isdir(folder) and frames <= set(numbered_files(folder, NATIVE_PREDICTION_PATTERN))


def cellpose_rows(root: str, run_dir: str, reference_cpu: float | None, every: int, max_cpu_seconds: float,
                  label: str = "cellpose ({epochs} epochs)"):
    checkpoints, train_command = train_cellpose(root, run_dir, max_cpu_seconds)
    python = cellpose_python(run_dir)

    def pred_dir_of(checkpoint):
        return os.path.join(run_dir, f"pred_{checkpoint['epochs']:04d}")

    chosen = chosen_checkpoints(checkpoints, reference_cpu, every)
    chosen += [c for c in checkpoints if c not in chosen and predicted_every_frame(pred_dir_of(c), root)]
    rows = []
    for checkpoint in sorted(chosen, key=lambda c: c["epochs"]):
        pred_dir = pred_dir_of(checkpoint)
        if not predicted_every_frame(pred_dir, root):
            run_timed([python, "peer_cellpose.py", "predict", "--model", os.path.join(run_dir, "run", checkpoint["model"]),
                       "--root_dir", root, "--seqs", "c", "--pred_dir", pred_dir],
                      os.path.join(run_dir, f"predict_{checkpoint['epochs']:04d}.log"))
        write_score_size_predictions(pred_dir)
        rows.append({"recipe": label.format(epochs=checkpoint["epochs"]), **test_scores(pred_dir, root),
                     "cpu_seconds": checkpoint["cpu_seconds"], "wall_seconds": checkpoint["wall_seconds"],
                     "epochs": checkpoint["epochs"],
                     "command": f"{train_command}  # scored: {checkpoint['model']}"})
    return rows


def subset_of(row: dict) -> int | None:
    """The number of training frames of a learning-curve row (--frames), None for a row trained on all of them."""
    return row.get("train_frames") if row.get("subset") else None


def add_cellpose_at_equal_cpu(rows: list[dict]):
    """cellpose_at_equal_cpu and ahead_of_cellpose for every other trained row: Cellpose's Instance Dice (256) at the
    row's CPU-seconds, linear between its scored checkpoints measured on the same machine (none outside their range)."""
    for row in rows:
        for key in ("cellpose_at_equal_cpu", "ahead_of_cellpose"):  # figures of an earlier drawing of the table
            row.pop(key, None)
        peer = sorted((r["cpu_seconds"], r["dice_256"]) for r in rows if r["dataset"] == row["dataset"]
                      and r["recipe"].startswith("cellpose") and subset_of(r) == subset_of(row)
                      and r.get("machine") == row.get("machine"))  # CPU-seconds compare on one machine only
        cpu = row.get("cpu_seconds")
        if row["recipe"].startswith("cellpose") or not peer or cpu is None or not np.isfinite(cpu):
            continue
        if peer[0][0] <= cpu <= peer[-1][0]:
            row["cellpose_at_equal_cpu"] = float(np.interp(cpu, *zip(*peer)))
            row["ahead_of_cellpose"] = row["dice_256"] - row["cellpose_at_equal_cpu"]


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


# ---- outputs ----------------------------------------------------------------------------------------------------

def machine_name() -> str:
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            model = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core CPU ({model})"


def merge_rows(previous: list[dict], new: list[dict]) -> list[dict]:
    """Earlier rows, each replaced by a new row of the same dataset and recipe; new ones appended."""
    keys = {(row["dataset"], row["recipe"]) for row in new}
    return [row for row in previous if (row["dataset"], row["recipe"]) not in keys] + new


def format_value(value, digits: int = 4) -> str:
    """A table cell: `digits` decimals (negative: that many, with a sign), 0: a whole number with thousands' commas."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:,.0f}" if digits == 0 else f"{value:+.{-digits}f}" if digits < 0 else f"{value:.{digits}f}"
    return str(value)


def tool_of(row: dict) -> str:
    """The line a row belongs to in the plots: Cellpose's checkpoints are one tool, each of our recipes another; a
    learning-curve row (--frames) and a longer run (--variant e40, or e120v8: validated every 8th epoch) belong to
    their recipe's line.

    >>> [tool_of({"recipe": name}) for name in ("patches e40", "patches e120v8", "fine_tuned (2 frames)", "patches dice1")]
    ['patches', 'patches', 'fine_tuned', 'patches dice1']
    """
    if row["recipe"].startswith("cellpose"):
        return "Cellpose 3 (from scratch)"
    # a variant named e<N> (v<K>) is the same recipe trained N epochs (val_every K): a point further along its line
    return re.sub(r" e\d+(v\d+)?$", "", re.sub(r" \(\d+ frames\)$", "", row["recipe"]))


def learning_curve(rows: list[dict], dataset: str) -> dict:
    """tool -> [(training frames, row)] of a dataset, by frames: the --frames rows and, for all frames, the tool's
    full-data row: the recipe's own row, trained as long as the subsets (not a longer --variant e<N>), else the
    longest (Cellpose's: its last checkpoint)."""
    subsets = [row for row in rows if row["dataset"] == dataset and subset_of(row)]
    tools = dict.fromkeys(tool_of(row) for row in subsets)
    curves = {tool: [(row["train_frames"], row) for row in subsets if tool_of(row) == tool] for tool in tools}
    all_frames = max((row["train_frames"] for row in rows if row["dataset"] == dataset and not subset_of(row)
                      and "train_frames" in row), default=None)
    for tool in tools:
        full = [row for row in rows if row["dataset"] == dataset and not subset_of(row) and tool_of(row) == tool]
        if full and all_frames:
            last = next((row for row in full if row["recipe"] == tool), max(full, key=lambda row: row.get("epochs", 0)))
            curves[tool].append((all_frames, last))
        curves[tool].sort(key=lambda point: point[0])
    return curves


def results_markdown(rows: list[dict]) -> str:
    """The table of every dataset, its data and machine, each row's command below the table."""
    lines = ["Written by `python benchmark_real.py` (its docstring says what each column is). Test frames used for "
             "neither training nor model selection; Instance Dice and AP at IoU 0.5 at 256 × 256 and at the frames' "
             "own size; training CPU-seconds; *vs Cellpose*: the row's Instance Dice (256) minus Cellpose's at the "
             "same CPU-seconds, interpolated between its checkpoints.", ""]
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        group = [row for row in rows if row["dataset"] == dataset and not subset_of(row)]
        machines = list(dict.fromkeys(row["machine"] for row in rows if row["dataset"] == dataset and "machine" in row))
        # rows measured on another machine than the dataset's first are marked: their CPU-seconds are not comparable
        marks = {machine: MACHINE_MARKS[index - 1] if index else "" for index, machine in enumerate(machines)}
        shown = "; ".join(f"{marks[m] + ' ' if marks[m] else ''}{m}" for m in machines)
        lines += [f"### {dataset}", "", f"Data: `{group[0].get('data', '')}`. "
                  f"Machine{'s' if len(machines) > 1 else ''}: {shown}{' (rows marked so)' if len(machines) > 1 else ''}.",
                  "", "| recipe | Instance Dice 256 | native | AP50 256 | AP50 native | training CPU-s | vs Cellpose |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        mark = lambda row: (" " + marks[row["machine"]]) if marks.get(row.get("machine")) else ""
        for row in group:
            lines.append(f"| {row['recipe']}{mark(row)} | {format_value(row.get('dice_256'))} | "
                         f"{format_value(row.get('dice_native'))} | {format_value(row.get('ap50_256'))} | "
                         f"{format_value(row.get('ap50_native'))} | {format_value(row.get('cpu_seconds'), 0)} | "
                         f"{format_value(row.get('ahead_of_cellpose'), -3)} |")
        lines += ["", "Commands:", ""]
        lines += [f"- {row['recipe']}: `{row.get('command') or row['inference_command']}`" for row in group
                  if row.get("command") or row.get("inference_command")]
        lines.append("")
        curves = learning_curve(rows, dataset)
        if curves:
            lines += [f"Learning curve on {dataset}: trained on a few of the training frames (spread evenly over them), "
                      "scored on the same test frames.", "",
                      "| training frames | tool | Instance Dice 256 | native | AP50 256 | training CPU-s | epochs |",
                      "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
            points = sorted((frames, tool, row) for tool, curve in curves.items() for frames, row in curve)
            lines += [f"| {frames} | {tool}{mark(row)} | {format_value(row.get('dice_256'))} | "
                      f"{format_value(row.get('dice_native'))} | {format_value(row.get('ap50_256'))} | "
                      f"{format_value(row.get('cpu_seconds'), 0)} | {row.get('epochs', '—')} |"
                      for frames, tool, row in points]
            lines += ["", "Commands:", ""]
            lines += [f"- {row['recipe']}: `{row['command']}`" for _, _, row in points
                      if row.get("command") and subset_of(row)]
            lines.append("")
    return "\n".join(lines)


def write_results_block(path: str, text: str):
    """This benchmark's block of the results page (data_files.write_marked_block; the rest of the page untouched)."""
    write_marked_block(path, "benchmark_real", text)


def race_points(group: list[dict]) -> tuple[dict, dict]:
    """A dataset's trained rows as points (CPU-seconds, Instance Dice 256) by tool: those measured on the dataset's
    first machine, joined into lines, and those measured on another, drawn apart (their CPU-seconds do not compare).

    >>> race_points([{"recipe": "patches", "cpu_seconds": 9.0, "dice_256": 0.5, "machine": "A"},
    ...              {"recipe": "patches e40", "cpu_seconds": 30.0, "dice_256": 0.7, "machine": "B"},
    ...              {"recipe": "ceiling", "dice_256": 0.97, "machine": "A"}])
    ({'patches': [(9.0, 0.5)]}, {'patches': [(30.0, 0.7)]})
    """
    first_machine = next((row["machine"] for row in group if "machine" in row), None)
    lines, elsewhere = {}, {}
    for row in group:
        if row["recipe"] != "ceiling" and np.isfinite(row.get("cpu_seconds", np.nan)):
            points = elsewhere if row.get("machine", first_machine) != first_machine else lines
            points.setdefault(tool_of(row), []).append((row["cpu_seconds"], row["dice_256"]))
    return lines, elsewhere


def plot_race(rows: list[dict], path: str):
    """Instance Dice (256) against training CPU-seconds, a panel per dataset: one line per tool or recipe (Cellpose's
    checkpoints; each of our recipes, a point per run), the method's ceiling dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if not subset_of(row)]
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    tools = list(dict.fromkeys(tool_of(row) for row in rows if row["recipe"] != "ceiling"))
    colours = {tool: f"C{index % 10}" for index, tool in enumerate(tools)}  # one colour per tool in every panel
    figure, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 4.8), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        group = [row for row in rows if row["dataset"] == dataset]
        for row in group:
            if row["recipe"] == "ceiling":
                axis.axhline(row["dice_256"], color="grey", linestyle="--", linewidth=1, label="ceiling")
        lines, elsewhere = race_points(group)
        for tool, points in lines.items():
            cpu, dice = zip(*sorted(points))
            axis.plot(cpu, dice, marker="o", markersize=4, label=tool, color=colours[tool])
        for tool, points in elsewhere.items():
            cpu, dice = zip(*sorted(points))
            axis.plot(cpu, dice, linestyle="none", marker="o", markersize=6, markerfacecolor="none",
                      color=colours[tool], label=f"{tool}, another machine")
        axis.set_title(dataset)
        axis.set_xlabel("training CPU-seconds")
        axis.set_xlim(left=0)
        axis.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("Instance Dice (256 × 256), test frames")
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"), ".png.tmp")
    plt.close(figure)


def plot_learning_curves(rows: list[dict], path: str):
    """Instance Dice (256) against the number of training frames, a panel per dataset with a learning curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {dataset: learning_curve(rows, dataset) for dataset in dict.fromkeys(row["dataset"] for row in rows)}
    curves = {dataset: tools for dataset, tools in curves.items() if tools}
    if not curves:
        return
    names = list(dict.fromkeys(tool for tools in curves.values() for tool in tools))
    figure, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for axis, (dataset, tools) in zip(axes[0], curves.items()):
        for tool, points in tools.items():
            frames = [frames for frames, _ in points]
            axis.plot(frames, [row["dice_256"] for _, row in points], marker="o", markersize=4, label=tool,
                      color=f"C{names.index(tool) % 10}")
        axis.set_xscale("log", base=2)
        axis.set_title(dataset)
        axis.set_xlabel("annotated training frames")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("Instance Dice (256 × 256), test frames")
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"), ".png.tmp")
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real_dir", default=SHARED_REAL, help="the real data (see its README) (default %(default)s)")
    parser.add_argument("--out_dir", default="runs/benchmark_real",
                        help="data, run folders, predictions and logs (default %(default)s)")
    parser.add_argument("--table", default="docs/benchmark_real.json",
                        help="every row measured so far, read and extended by each call (default %(default)s)")
    parser.add_argument("--datasets", default="trpL,usiigaci,simulated",
                        help=f"comma-separated, of {','.join(DATASETS)} (default %(default)s)")
    parser.add_argument("--recipes", default="ceiling,faithful,patches,zero_shot,fine_tuned,cellpose",
                        help="(default %(default)s)")
    parser.add_argument("--rescore", action="store_true",
                        help="predict and score the test frames of the earlier rows of --datasets again, with their "
                             "trained models (after a change to inference.py); nothing is trained")
    parser.add_argument("--faithful_epochs", type=int, default=100, help="docs/baseline.md §4: 100 (default %(default)s)")
    parser.add_argument("--patch_args", default="", help="extra train.py arguments of the patch recipe")
    parser.add_argument("--generalist", default=None, help="a checkpoint for the zero-shot and fine-tuned rows")
    parser.add_argument("--variant", default="",
                        help="a name for a variant of the patch and fine-tuned rows made by --patch_args: its rows and "
                             "run folders carry the name, beside the recipe's own (default: none)")
    parser.add_argument("--score_args", default="",
                        help="extra inference.py arguments when the test frames are predicted (e.g. --test_flips on) "
                             "(default: none)")
    parser.add_argument("--frames", default="",
                        help="learning curve: also train the patch, fine-tuned and cellpose rows on this many of the "
                             "training frames, spread evenly (comma-separated, e.g. 1,2,4,8) (default: none)")
    parser.add_argument("--cellpose_max_cpu_seconds", type=float, default=0,
                        help="stop Cellpose's training after the first checkpoint past this (0: its 500 epochs) "
                             "(default %(default)s)")
    parser.add_argument("--cellpose_score_every", type=int, default=50,
                        help="score Cellpose's checkpoint every this many epochs besides the budgets "
                             "(default %(default)s)")
    parser.add_argument("--plot", default="readme_imgs/peer_race.png", help="(default %(default)s)")
    parser.add_argument("--curve_plot", default="readme_imgs/learning_curve.png",
                        help="the learning curves' plot, where --frames rows exist (default %(default)s)")
    parser.add_argument("--results_md", default="docs/results.md",
                        help=f"the table goes between {RESULTS_START} and {RESULTS_END} here (default %(default)s)")
    args = parser.parse_args(argv)
    datasets, recipes = args.datasets.split(","), args.recipes.split(",")
    if args.variant and not re.fullmatch(r"[\w+=.-]+", args.variant):
        sys.exit(f"error: --variant: {args.variant!r}: use letters, digits and _+=.- only")
    try:
        subset_sizes = [int(n) for n in args.frames.split(",") if n]
        assert all(n >= 1 for n in subset_sizes)
    except (ValueError, AssertionError):
        sys.exit(f"error: --frames: {args.frames!r}: positive whole numbers, comma-separated")
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        sys.exit(f"error: --datasets: unknown {','.join(unknown)} (known: {','.join(DATASETS)})")
    if set(datasets) - {"simulated"} and not os.path.isdir(args.real_dir):
        sys.exit(f"error: {args.real_dir}: real data not found (see ../shared/real/README.md)")
    table_path = args.table
    previous = json.load(open(table_path)) if os.path.isfile(table_path) else []
    rows = []
    if args.rescore:
        ours = [row for row in previous if row["dataset"] in datasets
                and row.get("inference_command", "").startswith("python inference.py")]
        def model_of(row):
            words = row["inference_command"].split()
            return words[words.index("--model") + 1]
        missing = [row for row in ours if not os.path.isfile(os.path.join(ROOT, model_of(row)))]
        if missing:  # e.g. rows rebuilt from the results page, whose run folders are gone: kept as they are
            print(f"rescore: {len(missing)} rows kept as they are, their models are gone "
                  f"({', '.join(sorted({model_of(row) for row in missing})[:3])}, ...)", flush=True)
        ours = [row for row in ours if row not in missing]
        for number, row in enumerate(ours, 1):
            rows.append(rescore(row))
            print(f"rescored {number}/{len(ours)} {row['dataset']} {row['recipe']}: dice_256 {row['dice_256']:.4f} -> "
                  f"{rows[-1]['dice_256']:.4f}", flush=True)
    for dataset in datasets:
        try:
            root = prepare(args.real_dir, dataset, os.path.join(args.out_dir, "data"))
        except DataError as error:
            sys.exit(f"error: {error}")
        out = os.path.join(args.out_dir, dataset)
        suffix = "_" + args.variant if args.variant else ""
        todo = {
            "ceiling": lambda: ceiling(root),
            "faithful": lambda: train_and_score(root, os.path.join(out, "faithful"), [
                *FAITHFUL_FLAGS, "--num_epochs", str(args.faithful_epochs)]),
            "patches": lambda: train_and_score(root, os.path.join(out, "patches" + suffix), [
                *PATCHES_FLAGS, *args.patch_args.split()], args.score_args.split()),
        }
        if args.generalist:
            todo["zero_shot"] = lambda: score(root, args.generalist, os.path.join(out, "zero_shot" + suffix, "pred"),
                                              os.path.join(out, "zero_shot" + suffix), args.score_args.split())
            todo["fine_tuned"] = lambda: train_and_score(root, os.path.join(out, "fine_tuned" + suffix), [
                *PATCHES_FLAGS, "--init_from", args.generalist, *args.patch_args.split()], args.score_args.split())
        context = {"dataset": dataset, "data": os.path.relpath(root, ROOT), "machine": machine_name(),
                   "train_frames": training_frames(root)}
        for recipe in recipes if not subset_sizes else []:  # with --frames only the subsets are trained
            if recipe == "cellpose":
                ours = [r for r in merge_rows(previous, rows) if r["dataset"] == dataset and r["recipe"] == "patches"]
                print(f"{dataset}: cellpose ...", flush=True)
                new = [{**context, **row} for row in cellpose_rows(
                    root, os.path.join(out, "cellpose"), ours[0]["cpu_seconds"] if ours else None,
                    args.cellpose_score_every, args.cellpose_max_cpu_seconds)]
            elif recipe in todo:
                label = f"faithful ({args.faithful_epochs} epochs)" if recipe == "faithful" else recipe
                label += f" {args.variant}" if args.variant and recipe in VARIABLE else ""
                print(f"{dataset}: {label} ...", flush=True)
                new = [{**context, "recipe": label, **todo[recipe]()}]
            else:
                continue
            rows += new
            for row in new:
                print(f"  {row['recipe']}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                        if isinstance(v, float)), flush=True)
        for frames in subset_sizes:
            if frames >= context["train_frames"]:
                continue
            subset = prepare_subset(root, frames)
            subset_context = {**context, "data": os.path.relpath(subset, ROOT), "train_frames": frames, "subset": True}
            for recipe in recipes:
                folder = os.path.join(out, f"{recipe}{'_' + args.variant if args.variant else ''}_{frames}frames")
                if recipe == "cellpose":
                    print(f"{dataset}: cellpose on {frames} frames ...", flush=True)
                    new = [{**subset_context, **row} for row in cellpose_rows(
                        subset, os.path.join(out, f"cellpose_{frames}frames"), None, 0, args.cellpose_max_cpu_seconds,
                        f"cellpose ({frames} frames, {{epochs}} epochs)")]
                elif recipe == "fine_tuned" and args.generalist:
                    label = f"fine_tuned{' ' + args.variant if args.variant else ''} ({frames} frames)"
                    print(f"{dataset}: {label} ...", flush=True)
                    new = [{**subset_context, "recipe": label, **train_and_score(subset, folder, [
                        *PATCHES_FLAGS, "--init_from", args.generalist, *args.patch_args.split()])}]
                elif recipe == "patches":
                    label = f"patches{' ' + args.variant if args.variant else ''} ({frames} frames)"
                    print(f"{dataset}: {label} ...", flush=True)
                    new = [{**subset_context, "recipe": label, **train_and_score(
                        subset, folder, [*PATCHES_FLAGS, *args.patch_args.split()])}]
                else:
                    continue
                rows += new
                for row in new:
                    print(f"  {row['recipe']}: dice_256 {row['dice_256']:.4f}, cpu_seconds "
                          f"{row.get('cpu_seconds', float('nan')):.0f}", flush=True)
    # read again: another call may have written its rows meanwhile
    rows = merge_rows(json.load(open(table_path)) if os.path.isfile(table_path) else [], rows)
    add_cost_to_beat_faithful(rows, args.out_dir)
    add_cellpose_at_equal_cpu(rows)
    table = pd.DataFrame(rows)
    os.makedirs(args.out_dir, exist_ok=True)
    atomic_write(os.path.join(args.out_dir, "benchmark_real.csv"), lambda tmp: table.to_csv(tmp, index=False), ".tmp")
    def write_json(temporary):
        with open(temporary, "w") as file:
            json.dump(rows, file, indent=2)
    atomic_write(table_path, write_json, ".tmp")
    if args.plot:
        plot_race(rows, args.plot)
    if args.curve_plot:
        plot_learning_curves(rows, args.curve_plot)
    if args.results_md:
        write_results_block(args.results_md, results_markdown(rows))
    shown = [c for c in ("dataset", "recipe", "dice_256", "dice_native", "ap50_256", "ap50_native", "cpu_seconds",
                         "ahead_of_cellpose") if c in table]
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
