"""Cellpose 3, the field's standard tool, trained from scratch and run on a challenge-layout data root: the peer that
benchmark_real.py compares the project's recipes with.

    python peer_cellpose.py install --venv .venv-cellpose                 # any Python 3.11: creates the peer's venv
    .venv-cellpose/bin/python peer_cellpose.py train --root_dir DATA --train_seqs a --test_seqs b --out_dir RUN
    .venv-cellpose/bin/python peer_cellpose.py predict --model RUN/models/cellpose_epoch_0010 \\
        --root_dir DATA --seqs c --pred_dir PRED

It runs inside its own venv (torch==2.13.0, then cellpose<4; no torchvision) and imports only cellpose, numpy and
tifffile, never the project's modules. Data: <root>/<seq>/t<NNNN>.tif with masks <root>/<seq>_GT/man_seg<NNNN>.tif.

train: Cellpose 3's command-line defaults for training from scratch (`python -m cellpose --train
--pretrained_model None`): no pretrained weights, CPnet of widths 32-256, SGD with momentum 0.9, learning rate 0.2
(ten warm-up epochs, halved ten times over the last 100 of more than 300 epochs), weight decay 1e-5, batch size 8,
500 epochs of one pass over the training frames each, 224 px crops, frames rescaled so that their masks' mean
diameter becomes diam_mean 30 (random scale range 0.5), 1-99 percentile normalisation, frames with fewer than
min_train_masks 5 masks dropped, test sequences scored by loss only (no model selection). A checkpoint is saved every
--save_every epochs to its own file (models/cellpose_epoch_NNNN, the last as models/cellpose), and
checkpoints.json beside models/ records each one's epochs and the cumulative CPU-seconds (user + system of this
process and its children) at the moment it was saved.

predict: each frame of the sequences segmented at the model's own diameter handling for a custom model
(`diameter=None`: the frames are rescaled by diam_mean / diam_labels, the training masks' mean diameter),
flow threshold 0.4, cell-probability threshold 0; one label TIFF per frame at the frame's own size,
<pred_dir>/<seq>/mask<NNNN>.tif (the name inference.py --native writes). The 256 x 256 version and the scores are
the project's own (benchmark_real.py).
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

IMAGE_PATTERN = re.compile(r"^t(\d+)\.tiff?$")
MASK_PATTERN = re.compile(r"^man_seg(\d+)\.tiff?$")
CELLPOSE_REQUIREMENT = "cellpose<4"
TORCH_REQUIREMENT = "torch==2.13.0"  # the local CPU build; any other version downloads gigabytes
MODEL_NAME = "cellpose"
# Cellpose 3.1's command-line training defaults (cellpose/cli.py), the comparison's settings
CLI_DEFAULTS = {"learning_rate": 0.2, "weight_decay": 1e-5, "n_epochs": 500, "batch_size": 8, "SGD": 1,
                "min_train_masks": 5, "diam_mean": 30.0}


class PeerError(Exception):
    """Bad input: reported as one `error: <file>: <problem>` line."""


def limit_threads():
    """One thread everywhere (torch, OpenMP, numba), set before cellpose is imported: the benchmark's runs share the
    machine's cores and count CPU-seconds."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    import torch
    torch.set_num_threads(1)


def cpu_seconds() -> float:
    """User + system time of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def numbered(folder: str, pattern: re.Pattern) -> dict[int, str]:
    if not os.path.isdir(folder):
        raise PeerError(f"{folder}: folder does not exist")
    files = {int(m.group(1)): os.path.join(folder, m.group(0)) for m in map(pattern.match, sorted(os.listdir(folder)))
             if m}
    if not files:
        raise PeerError(f"{folder}: no file named {pattern.pattern}")
    return files


def read_2d(path: str):
    import tifffile
    try:
        array = tifffile.imread(path)
    except Exception as error:  # tifffile raises several kinds on a damaged file
        raise PeerError(f"{path}: not a readable TIFF ({error})") from error
    if array.ndim != 2:
        raise PeerError(f"{path}: expected one 2-D frame, found shape {array.shape}")
    return array


def read_sequence(root: str, sequence: str, with_masks: bool):
    """[(number, image, mask or None)] of one sequence; every image needs its mask when with_masks."""
    images = numbered(os.path.join(root, sequence), IMAGE_PATTERN)
    masks = numbered(os.path.join(root, sequence + "_GT"), MASK_PATTERN) if with_masks else {}
    frames = []
    for number, path in sorted(images.items()):
        image = read_2d(path)
        mask = None
        if with_masks:
            if number not in masks:
                raise PeerError(f"{path}: no mask man_seg{number:04d}.tif in {sequence}_GT")
            mask = read_2d(masks[number])
            if mask.shape != image.shape:
                raise PeerError(f"{masks[number]}: mask {mask.shape} differs from its frame {image.shape}")
        frames.append((number, image, mask))
    return frames


def write_json_atomically(path: str, content):
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as file:
            json.dump(content, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_labels_atomically(path: str, labels):
    import numpy as np
    import tifffile
    dtype = np.uint16 if labels.max(initial=0) < 2 ** 16 else np.uint32
    descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tif.tmp")
    os.close(descriptor)
    try:
        tifffile.imwrite(temporary, labels.astype(dtype))
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


class BudgetReached(Exception):
    """Raised after a checkpoint is saved once the CPU-seconds budget is spent."""


def train(args):
    import numpy as np

    images, labels = [], []
    for sequence in args.train_seqs.split(","):
        for _, image, mask in read_sequence(args.root_dir, sequence, with_masks=True):
            images.append(image.astype(np.float32))
            labels.append(mask.astype(np.int32))
    test_images, test_labels = [], []
    for sequence in filter(None, args.test_seqs.split(",")):
        for _, image, mask in read_sequence(args.root_dir, sequence, with_masks=True):
            test_images.append(image.astype(np.float32))
            test_labels.append(mask.astype(np.int32))
    counts = [len(np.unique(mask)) - 1 for mask in labels]
    kept = sum(count >= args.min_train_masks for count in counts)
    if kept == 0:
        raise PeerError(f"{args.root_dir}: every training frame has fewer than --min_train_masks "
                        f"{args.min_train_masks} masks (counts {counts}); Cellpose would train on nothing")
    limit_threads()
    import torch
    from cellpose import io, models, train as cellpose_train

    os.makedirs(args.out_dir, exist_ok=True)
    io.logger_setup(cp_path=os.path.abspath(args.out_dir), logfile_name="cellpose_train.log")
    torch.manual_seed(args.seed)
    model = models.CellposeModel(gpu=False, device=torch.device("cpu"), pretrained_model=False,
                                 diam_mean=args.diam_mean, nchan=2)
    record_path = os.path.join(args.out_dir, "checkpoints.json")
    settings = {name: getattr(args, name) for name in ("learning_rate", "weight_decay", "n_epochs", "batch_size",
                                                       "SGD", "min_train_masks", "diam_mean", "save_every", "seed")}
    record = {"settings": settings, "train_frames": len(images), "train_frames_kept": kept,
              "mask_counts": counts, "checkpoints": []}
    start_wall = time.perf_counter()
    save_model = model.net.save_model

    def save_and_record(filename):
        """Cellpose saves after epoch index e (e % save_every == 0, and the last): record the cost so far."""
        save_model(filename)
        match = re.search(r"_epoch_(\d+)$", str(filename))
        epochs = int(match.group(1)) + 1 if match else args.n_epochs
        entry = {"epochs": epochs, "model": os.path.relpath(str(filename), args.out_dir),
                 "cpu_seconds": cpu_seconds(), "wall_seconds": time.perf_counter() - start_wall,
                 "diam_labels": float(model.net.diam_labels.item())}
        record["checkpoints"] = [c for c in record["checkpoints"] if c["model"] != entry["model"]] + [entry]
        write_json_atomically(record_path, record)
        if args.max_cpu_seconds and entry["cpu_seconds"] >= args.max_cpu_seconds:
            raise BudgetReached

    model.net.save_model = save_and_record
    try:
        cellpose_train.train_seg(
            model.net, train_data=images, train_labels=labels, test_data=test_images or None,
            test_labels=test_labels or None, channels=[0, 0], normalize=True, learning_rate=args.learning_rate,
            weight_decay=args.weight_decay, SGD=bool(args.SGD), n_epochs=args.n_epochs, batch_size=args.batch_size,
            min_train_masks=args.min_train_masks, save_path=args.out_dir, save_every=args.save_every,
            save_each=True, model_name=MODEL_NAME)
    except BudgetReached:
        print(f"stopped: {args.max_cpu_seconds:.0f} CPU-seconds spent", flush=True)
    print(json.dumps(record["checkpoints"][-1]), flush=True)


def native_prediction_name(number: int) -> str:
    """The file inference.py --native writes for frame `number` (data_files.prediction_name(number, native=True))."""
    return f"mask{number:04d}.tif"


def predict(args):
    import numpy as np

    if not os.path.isfile(args.model):
        raise PeerError(f"{args.model}: no such model file")
    frames = {sequence: sorted(numbered(os.path.join(args.root_dir, sequence), IMAGE_PATTERN).items())
              for sequence in args.seqs.split(",")}
    limit_threads()
    import torch
    from cellpose import models

    model = models.CellposeModel(gpu=False, device=torch.device("cpu"), pretrained_model=args.model)
    for sequence, files in frames.items():
        folder = os.path.join(args.pred_dir, sequence)
        os.makedirs(folder, exist_ok=True)
        for number, path in files:
            image = read_2d(path).astype(np.float32)
            masks = model.eval(image, channels=[0, 0], diameter=None, flow_threshold=args.flow_threshold,
                               cellprob_threshold=args.cellprob_threshold)[0]
            write_labels_atomically(os.path.join(folder, native_prediction_name(number)), np.asarray(masks))
    print(f"{sum(map(len, frames.values()))} frames segmented into {args.pred_dir}", flush=True)


def install(args):
    """A venv for the peer: torch first (the pinned local build), then Cellpose 3, which then finds torch there."""
    python = os.path.join(args.venv, "bin", "python")
    if not os.path.isfile(python):
        subprocess.run([sys.executable, "-m", "venv", args.venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", TORCH_REQUIREMENT], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", CELLPOSE_REQUIREMENT], check=True)
    subprocess.run([python, "-c", "import cellpose.models, tifffile"], check=True)
    print(f"Cellpose installed in {args.venv}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter

    setup = commands.add_parser("install", help="create the peer's venv", formatter_class=defaults)
    setup.add_argument("--venv", default=".venv-cellpose")

    fit = commands.add_parser("train", help="train from scratch", formatter_class=defaults)
    fit.add_argument("--root_dir", required=True, help="challenge-layout data root")
    fit.add_argument("--train_seqs", default="a")
    fit.add_argument("--test_seqs", default="b", help="scored by loss only, as Cellpose's --test_dir ('' for none)")
    fit.add_argument("--out_dir", required=True)
    for name, value in CLI_DEFAULTS.items():
        fit.add_argument(f"--{name}", type=type(value), default=value, help="Cellpose 3 CLI default")
    fit.add_argument("--save_every", type=int, default=10, help="epochs between saved checkpoints")
    fit.add_argument("--max_cpu_seconds", type=float, default=0,
                     help="stop after the first checkpoint past this many CPU-seconds (0: train all n_epochs)")
    fit.add_argument("--seed", type=int, default=0, help="torch's seed (Cellpose seeds numpy by epoch itself)")

    run = commands.add_parser("predict", help="segment frames with a trained model", formatter_class=defaults)
    run.add_argument("--model", required=True)
    run.add_argument("--root_dir", required=True)
    run.add_argument("--seqs", default="c")
    run.add_argument("--pred_dir", required=True)
    run.add_argument("--flow_threshold", type=float, default=0.4, help="Cellpose default")
    run.add_argument("--cellprob_threshold", type=float, default=0.0, help="Cellpose default")

    args = parser.parse_args(argv)
    try:
        {"install": install, "train": train, "predict": predict}[args.command](args)
    except PeerError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
