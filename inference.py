"""Predict instance masks with a trained checkpoint.

    python inference.py --root_dir data --from_checkpoint runs/default/checkpoints/best.ckpt --pred_dir pred
    python inference.py --root_dir data --split val --from_checkpoint ... --pred_dir pred   # sequence c, for eval.py
    python inference.py --root_dir data --seqs c,d --from_checkpoint ... --pred_dir pred

Writes pred_dir/<seq>/<image name>_256.tif (e.g. pred/d/t0000_256.tif): the instance map at 256 x 256, resized by
nearest neighbour, in the narrowest unsigned dtype that holds the frame's labels. Each file is written to a temporary
name and renamed, so a file is either whole or absent.
"""
import argparse
import multiprocessing
import os
import sys
import tempfile
from collections import deque

import numpy as np
import tifffile
import torch
from torch.utils.data import DataLoader

from dataset import DataError, UnlabelledFrames, default_sequences, list_frames
from energy import EnergyMeter
from unet import SCORE_SIZE, UNet, border_core_maps, instances_at_size, pick_device


def narrowest_unsigned(labels: np.ndarray) -> np.ndarray:
    top = int(labels.max()) if labels.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return labels.astype(dtype)
    return labels.astype(np.uint64)


def write_tiff_atomically(path: str, array: np.ndarray):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tif.tmp")
    os.close(fd)
    try:
        tifffile.imwrite(tmp, array)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_instances(semantic: np.ndarray, path: str, small_center_threshold: int, isolated_border_threshold: int):
    """Postprocess one border-core map and write its 256 x 256 instance map (runs in the pool's processes)."""
    instances = instances_at_size(semantic, SCORE_SIZE, small_center_threshold, isolated_border_threshold)
    write_tiff_atomically(path, narrowest_unsigned(instances))


def predict_sequence(model: UNet, root_dir: str, sequence: str, pred_dir: str, batch_size: int, num_workers: int,
                     device: torch.device, pool=None) -> int:
    """Predict every frame of one sequence. The model runs in this process; postprocessing and writing run in `pool`
    (a multiprocessing pool, or inline without one), so they overlap with the model's next batches."""
    frames = list_frames(root_dir, sequence, with_masks=False)
    loader = DataLoader(UnlabelledFrames(frames, model.hparams.input_size), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    out_folder = os.path.join(pred_dir, sequence)
    os.makedirs(out_folder, exist_ok=True)
    thresholds = (model.hparams.small_center_threshold, model.hparams.isolated_border_threshold)
    pending = deque()
    for indices, maps in border_core_maps(model, loader, device):
        jobs = [(m, os.path.join(out_folder, f"{frames[i].name}_256.tif"), *thresholds) for i, m in zip(indices, maps)]
        if pool is None:
            for job in jobs:
                write_instances(*job)
            continue
        pending.append(pool.starmap_async(write_instances, jobs))
        while len(pending) > 4:  # bounded: the model may run ahead of the pool by a few batches only
            pending.popleft().get()  # .get() also raises a worker's error here
    for result in pending:
        result.get()
    return len(frames)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root_dir", required=True, help="data root, challenge or CTC layout")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"],
                        help="sequences by role: test = d,e (04,05 in CTC layout), val = c (03), train = a,b (01,02)")
    parser.add_argument("--seqs", default=None, help="comma-separated sequence names (overrides --split)")
    parser.add_argument("--from_checkpoint", required=True, help="a .ckpt written by train.py")
    parser.add_argument("--pred_dir", default="pred")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="loader processes that read and resize frames")
    parser.add_argument("--postprocess_workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that turn border-core maps into instances and write them (0: inline)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:1, cpu")
    args = parser.parse_args(argv)

    if not os.path.isfile(args.from_checkpoint):
        sys.exit(f"error: {args.from_checkpoint}: checkpoint not found")
    device = pick_device(args.device)
    # the meter counts this process's GPU, RAPL where readable, and the CPU time of the pool once it has exited
    meter = EnergyMeter(gpus=[device.index or 0] if device.type == "cuda" else []).start()
    # fork the pool before CUDA is initialised: its processes only run numpy/scipy and never touch the GPU
    pool = multiprocessing.get_context("fork").Pool(args.postprocess_workers) if args.postprocess_workers else None
    model = UNet.load_from_checkpoint(args.from_checkpoint, map_location=device)
    total = 0
    try:
        sequences = args.seqs.split(",") if args.seqs else default_sequences(args.root_dir, args.split)
        for sequence in sequences:
            count = predict_sequence(model, args.root_dir, sequence, args.pred_dir, args.batch_size,
                                     args.num_workers, device, pool)
            total += count
            print(f"sequence {sequence}: {count} frames -> {os.path.join(args.pred_dir, sequence)}")
    except DataError as error:
        sys.exit(f"error: {error}")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    meter.stop()
    print(f"{total} frames on {device}; {meter.report(frames=total)}")


if __name__ == "__main__":
    main()
