"""Instance Dice (SPEC §6): score predicted instance maps against ground truth, per frame and overall.

    python eval.py --pred_dir pred --gt_dir /path/to/data_root [--seqs c] [--csv pred/instance_dice.csv]
"""
import argparse
import os
import re
import sys
import tempfile
import warnings

import numpy as np
import pandas as pd

from dataset import MASK_PATTERN, DataError, _numbered_files, mask_dir, read_mask, read_tiff_2d, resize_nearest
from energy import EnergyMeter

PREDICTION_PATTERN = re.compile(r"^t(\d+)_256\.tiff?$")
DICE_CUTOFF = 0.1


def dense_index(labels: np.ndarray):
    """(sorted non-zero labels, index of each pixel's label among them, -1 for background). A lookup table when the
    labels are small integers (the usual case), a sort otherwise."""
    if labels.dtype == bool or labels.dtype.itemsize == 8:  # bincount takes neither bool nor uint64
        labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"negative instance label {labels.min()}")
    top = int(labels.max(initial=0))
    if top <= 4 * labels.size + 65536:
        present = np.bincount(labels, minlength=top + 1) > 0
        present[0] = False
        lookup = np.full(top + 1, -1, np.int64)
        lookup[present] = np.arange(present.sum())
        return np.flatnonzero(present), lookup[labels]
    ids, index = np.unique(labels, return_inverse=True)
    if ids[0] == 0:
        return ids[1:], index - 1
    return ids, index


def match_instances(gt: np.ndarray, pred: np.ndarray, cutoff: float = DICE_CUTOFF):
    """Greedy Dice matching of acvl-utils' `match_instances_dice`: repeatedly the pair with the highest Dice above
    `cutoff`, both then removed; ties go to the lower GT label, then the lower predicted label.

    Returns ([(GT label, predicted label, Dice) of each match, in matching order], GT count, predicted count).
    Works on the table of overlapping label pairs, so the cost is one pass over the pixels plus O(pairs).
    """
    gt, pred = np.asarray(gt).ravel(), np.asarray(pred).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"GT and prediction differ in size: {gt.shape} vs {pred.shape}")
    gt_labels, gt_index = dense_index(gt)
    pred_labels, pred_index = dense_index(pred)
    n_gt, n_pred = len(gt_labels), len(pred_labels)
    gt_sizes = np.bincount(gt_index[gt_index >= 0], minlength=n_gt)
    pred_sizes = np.bincount(pred_index[pred_index >= 0], minlength=n_pred)

    both = (gt_index >= 0) & (pred_index >= 0)
    pair_codes = gt_index[both].astype(np.int64) * n_pred + pred_index[both]
    if n_gt * n_pred <= 4 * pair_codes.size + 1_000_000:  # a dense table is cheap: count without sorting
        overlap = np.bincount(pair_codes, minlength=n_gt * n_pred)
        pairs = np.flatnonzero(overlap)
        overlap = overlap[pairs]
    else:
        pairs, overlap = np.unique(pair_codes, return_counts=True)
    pair_gt, pair_pred = pairs // max(n_pred, 1), pairs % max(n_pred, 1)
    dice = 2 * overlap / (gt_sizes[pair_gt] + pred_sizes[pair_pred])

    candidates = np.flatnonzero(dice > cutoff)
    order = candidates[np.lexsort((pair_pred[candidates], pair_gt[candidates], -dice[candidates]))]
    gt_taken, pred_taken, matches = np.zeros(n_gt, bool), np.zeros(n_pred, bool), []
    for k in order:  # O(overlapping pairs), a few per cell
        g, p = pair_gt[k], pair_pred[k]
        if not gt_taken[g] and not pred_taken[p]:
            gt_taken[g] = pred_taken[p] = True
            matches.append((int(gt_labels[g]), int(pred_labels[p]), float(dice[k])))
    return matches, n_gt, n_pred


def instance_dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Mean over all entries of the matching: the Dice of each matched pair and 0 for every unmatched GT or predicted
    instance, as the baseline averages acvl-utils' matches. A frame with no instance on either side scores 1.0 (the
    baseline's mean of nothing is NaN; nothing to find and nothing found is a perfect answer)."""
    return score_frame(gt, pred)[0]


def score_frame(gt: np.ndarray, pred: np.ndarray):
    """(score, GT count, predicted count, matched count) of one frame."""
    matches, n_gt, n_pred = match_instances(gt, pred)
    entries = n_gt + n_pred - len(matches)
    score = sum(dice for _, _, dice in matches) / entries if entries else 1.0
    return score, n_gt, n_pred, len(matches)


def read_prediction(path: str) -> np.ndarray:
    pred = read_tiff_2d(path)
    if not np.issubdtype(pred.dtype, np.integer):
        raise DataError(f"{path}: predicted instance labels must be integers, got dtype {pred.dtype}")
    if pred.size and pred.min() < 0:
        raise DataError(f"{path}: negative instance label {pred.min()}")
    return pred


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
        masks = _numbered_files(folder, MASK_PATTERN)
        if not masks:
            raise DataError(f"{folder}: no mask named man_seg<number>.tif")
        pred_folder = os.path.join(pred_dir, sequence)
        preds = _numbered_files(pred_folder, PREDICTION_PATTERN) if os.path.isdir(pred_folder) else {}
        for number in sorted(preds.keys() - masks.keys()):
            warnings.warn(f"{preds[number]}: prediction without ground truth, not scored")
        for number, mask_path in sorted(masks.items()):
            if number not in preds:
                missing.append(os.path.join(pred_folder, f"t{number:04d}_256.tif"))
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
    """Write to a temporary file beside the target, then rename: the CSV is either whole or absent."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".csv.tmp")
    try:
        with os.fdopen(fd, "w") as file:
            table.to_csv(file, index=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
    except DataError as error:
        sys.exit(f"error: {error}")
    meter.stop()
    write_csv_atomically(table, args.csv or os.path.join(args.pred_dir, "instance_dice.csv"))
    for sequence, scores in table.groupby("sequence")["score"]:
        print(f"sequence {sequence}: {len(scores)} frames, Instance Dice {scores.mean():.6f}")
    mean = table["score"].mean()
    print(meter.report(frames=len(table)))
    print(f"Mean Instance Dice: {mean:.6f}")
    return mean


if __name__ == "__main__":
    main()
