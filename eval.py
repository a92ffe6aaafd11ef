"""Instance Dice (SPEC §6): score predicted instance maps against ground truth, per frame and overall.

    python eval.py --pred_dir pred --gt_dir /path/to/data_root [--seqs c] [--csv pred/instance_dice.csv]
"""
import argparse
import os
import sys
import warnings

import numpy as np
import pandas as pd

from border_core import resize_nearest
from dataset import (MASK_PATTERN, PREDICTION_PATTERN, DataError, atomic_write, error_line, mask_dir, numbered_files,
                     prediction_path, read_mask, read_prediction)
from energy import EnergyMeter
from metrics import score_frame


def evaluate(pred_dir: str, gt_dir: str, sequences=None) -> pd.DataFrame:
    """One row per GT frame of the chosen sequences: sequence, frame, score, gt_count, pred_count, matched."""
    if not os.path.isdir(pred_dir):
        raise DataError(f"{pred_dir}: prediction folder does not exist")
    if sequences is None:
        sequences = [s for s in sorted(os.listdir(pred_dir))
                     if os.path.isdir(os.path.join(pred_dir, s)) and os.path.isdir(mask_dir(gt_dir, s))]
        if not sequences:
            raise DataError(f"{pred_dir}: no sequence folder with ground truth in {gt_dir}")
    rows, missing = [], []
    for sequence in sequences:
        folder = mask_dir(gt_dir, sequence)
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: no ground truth for sequence '{sequence}'")
        masks = numbered_files(folder, MASK_PATTERN)
        if not masks:
            raise DataError(f"{folder}: no mask named man_seg<number>.tif")
        pred_folder = os.path.join(pred_dir, sequence)
        preds = numbered_files(pred_folder, PREDICTION_PATTERN) if os.path.isdir(pred_folder) else {}
        for number in sorted(preds.keys() - masks.keys()):
            warnings.warn(f"{preds[number]}: prediction without ground truth, not scored")
        for number, mask_path in sorted(masks.items()):
            if number not in preds:
                missing.append(prediction_path(pred_dir, sequence, number))
                gt_count = len(np.unique(read_mask(mask_path))) - 1
                rows.append((sequence, number, 0.0, gt_count, 0, 0))
                continue
            pred = read_prediction(preds[number])
            gt = resize_nearest(read_mask(mask_path), pred.shape)
            rows.append((sequence, number, *score_frame(gt, pred)))
    if missing:
        warnings.warn(f"{len(missing)} frame(s) without a prediction score 0: " + ", ".join(missing))
    return pd.DataFrame(rows, columns=["sequence", "frame", "score", "gt_count", "pred_count", "matched"])


def write_csv_atomically(table: pd.DataFrame, path: str):
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False), ".csv.tmp")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred_dir", required=True, help="folder with <seq>/t<frame>_256.tif predictions")
    parser.add_argument("--gt_dir", required=True, help="data root with ground truth, challenge or CTC layout")
    parser.add_argument("--seqs", default=None,
                        help="comma-separated sequences to score (default: every sequence folder of pred_dir with GT)")
    parser.add_argument("--csv", default=None, help="per-frame scores (default: <pred_dir>/instance_dice.csv)")
    args = parser.parse_args(argv)
    meter = EnergyMeter(gpus=[]).start()  # scoring runs on the CPU: RAPL where readable, else time
    try:
        table = evaluate(args.pred_dir, args.gt_dir, args.seqs.split(",") if args.seqs else None)
        meter.stop()
        write_csv_atomically(table, args.csv or os.path.join(args.pred_dir, "instance_dice.csv"))
    except (DataError, OSError) as error:
        sys.exit(error_line(error))
    for sequence, scores in table.groupby("sequence")["score"]:
        print(f"sequence {sequence}: {len(scores)} frames, Instance Dice {scores.mean():.6f}")
    mean = table["score"].mean()
    print(meter.report(frames=len(table)))
    print(f"Mean Instance Dice: {mean:.6f}")
    return mean


if __name__ == "__main__":
    main()
