"""Instance Dice (docs/baseline.md §6): score predicted instance maps against ground truth, per frame and overall; beside it the
detection scores at IoU thresholds, and the Cell Tracking Challenge's SEG, DET and TRA of a tracking result.

    python eval.py --pred_dir pred --root_dir /path/to/data_root [--native] [--seqs c] [--csv pred/instance_dice.csv]
    python eval.py --ctc_res track/01_RES --ctc_gt sim_ctc/01_GT          # SEG, DET, TRA (py-ctcmetrics)
    python eval.py --gt masks.tif --pred labels.tif                         # two T x Y x X stacks, frame by frame

--gt/--pred: a movie's labels against a mask stack, both T x Y x X TIFFs (or one 2-D frame each), frame t against
frame t, at the frames' own size (rows of sequence <pred name>@native, where the sizes agree) and at the challenge's
256 x 256 (<pred name>@256: both resized by nearest neighbour, border_core.resize_nearest, as the challenge resizes its
ground truth); a prediction stack of 256 x 256 frames is scored at 256 only. The headline is the 256 score, the native
one with --native. CSV default: <pred without extension>_instance_dice.csv.

instance_dice.csv, one row per GT frame: score (Instance Dice), gt_count, pred_count, matched (Dice matching), then
tp50 ... tp95 (true positives of the one-to-one IoU matching with IoU > 0.50, 0.55, ..., 0.95), precision50,
recall50, f1_50, ap50 (AP = TP / (TP + FP + FN) at IoU > 0.5, as StarDist and Cellpose report it) and map (AP
averaged over the ten thresholds). The line per sequence pools the counts of its frames (StarDist's
matching_dataset does the same). Instance Dice stays the headline: the last line is `Mean Instance Dice: <value>`.
"""
import argparse
import contextlib
import io
import os
import sys
import warnings

import numpy as np
import pandas as pd

from border_core import SCORE_SIZE, resize_nearest
from cli_types import HelpFormatter, Renamed, positive_int
from data_files import (MASK_PATTERN, NATIVE_PREDICTION_PATTERN, PREDICTION_PATTERN, RESULT_MASK_PATTERN,
                        RESULT_TRACK_FILE, TRACK_FILE, DataError, atomic_write, check_labels, compact_labels,
                        error_line, mask_dir, numbered_files, prediction_path, read_mask, read_prediction,
                        read_tiff_stack, read_tracks)
from energy import EnergyMeter
from metrics import IOU_THRESHOLDS, detection_scores, iou_counts, score_frame

TP_COLUMNS = [f"tp{round(100 * t)}" for t in IOU_THRESHOLDS]
COLUMNS = (["sequence", "frame", "score", "gt_count", "pred_count", "matched"] + TP_COLUMNS
           + ["precision50", "recall50", "f1_50", "ap50", "map"])


def detection_columns(tp: np.ndarray, gt_count, pred_count) -> dict:
    """precision50, recall50, f1_50, ap50 and map from true positives at IOU_THRESHOLDS (arrays over rows allowed)."""
    tp = np.asarray(tp, np.int64)
    at_50 = detection_scores(tp[..., 0], pred_count - tp[..., 0], gt_count - tp[..., 0])
    every = detection_scores(tp, np.expand_dims(pred_count, -1) - tp, np.expand_dims(gt_count, -1) - tp)
    return {"precision50": at_50["precision"], "recall50": at_50["recall"], "f1_50": at_50["f1"],
            "ap50": at_50["ap"], "map": every["ap"].mean(-1)}


def frame_row(sequence: str, number: int, gt: np.ndarray, pred: np.ndarray) -> tuple:
    score, n_gt, n_pred, matched = score_frame(gt, pred)
    tp = iou_counts(gt, pred, IOU_THRESHOLDS)[:, 0]
    scores = detection_columns(tp, n_gt, n_pred)
    return (sequence, number, score, n_gt, n_pred, matched, *tp.tolist(), *(float(v) for v in scores.values()))


def sequence_scores(rows: pd.DataFrame) -> dict:
    """The detection scores of a sequence from the pooled counts of its frames."""
    pooled = detection_columns(rows[TP_COLUMNS].sum().to_numpy(), rows["gt_count"].sum(), rows["pred_count"].sum())
    return {name: float(value) for name, value in pooled.items()}


def evaluate(pred_dir: str, gt_dir: str, sequences=None, native: bool = False) -> pd.DataFrame:
    """One row per GT frame of the chosen sequences, the columns of COLUMNS (see the module's docstring).

    The challenge's way: <seq>/t<frame>_256.tif against the GT resized to 256 x 256 by nearest neighbour. With
    `native`: <seq>/mask<frame>.tif (inference.py --native) against the GT at its own size."""
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
        pattern = NATIVE_PREDICTION_PATTERN if native else PREDICTION_PATTERN
        preds = numbered_files(pred_folder, pattern) if os.path.isdir(pred_folder) else {}
        for number in sorted(preds.keys() - masks.keys()):
            warnings.warn(f"{preds[number]}: prediction without ground truth, not scored")
        for number, mask_path in sorted(masks.items()):
            if number not in preds:
                missing.append(prediction_path(pred_dir, sequence, number, native))
                gt = compact_labels(read_mask(mask_path))
                row = frame_row(sequence, number, gt, np.zeros_like(gt))
                rows.append(row[:2] + (0.0,) + row[3:])  # a missing prediction scores 0 even on an empty GT frame
                continue
            # uint64 ids above the int64 range are fine instance ids: renumbered, order kept (data_files)
            pred = compact_labels(read_prediction(preds[number]))
            gt = compact_labels(read_mask(mask_path))
            if native and gt.shape != pred.shape:
                raise DataError(f"{preds[number]}: size {pred.shape} differs from its ground truth {mask_path} {gt.shape}")
            gt = gt if native else resize_nearest(gt, pred.shape)
            rows.append(frame_row(sequence, number, gt, pred))
    if missing:
        warnings.warn(f"{len(missing)} frame(s) without a prediction score 0: " + ", ".join(missing))
    return pd.DataFrame(rows, columns=COLUMNS)


def evaluate_stacks(gt_path: str, pred_path: str) -> pd.DataFrame:
    """Rows of COLUMNS for a label stack against a mask stack, frame t against frame t (see the module's docstring):
    sequence '<pred name>@native' at the frames' own size where the sizes agree, '<pred name>@256' at 256 x 256."""
    gt = compact_labels(check_labels(read_tiff_stack(gt_path), gt_path))
    pred = compact_labels(check_labels(read_tiff_stack(pred_path), pred_path, "predicted instance labels"))
    if len(gt) != len(pred):
        raise DataError(f"{pred_path}: {len(pred)} frame(s), its ground truth {gt_path} has {len(gt)}")
    same_size = gt.shape[1:] == pred.shape[1:]
    if not same_size and pred.shape[1:] != tuple(SCORE_SIZE):
        raise DataError(f"{pred_path}: frames of {pred.shape[1]} x {pred.shape[2]} differ from the ground truth's "
                        f"{gt.shape[1]} x {gt.shape[2]} in {gt_path} (and are not the challenge's "
                        f"{SCORE_SIZE[0]} x {SCORE_SIZE[1]})")
    name = os.path.splitext(os.path.basename(pred_path))[0]
    rows = [frame_row(f"{name}@native", t, g, p) for t, (g, p) in enumerate(zip(gt, pred))] if same_size else []
    rows += [frame_row(f"{name}@{SCORE_SIZE[0]}", t, resize_nearest(g, SCORE_SIZE), resize_nearest(p, SCORE_SIZE))
             for t, (g, p) in enumerate(zip(gt, pred))]
    return pd.DataFrame(rows, columns=COLUMNS)


CTC_METRICS = ["SEG", "DET", "TRA", "BC(0)"]


def check_ctc_folders(res_dir: str, gt_dir: str):
    """What py-ctcmetrics would otherwise stop on with an assertion: both folders and their files, one frame each."""
    for path in (os.path.join(res_dir, RESULT_TRACK_FILE), os.path.join(gt_dir, "TRA", TRACK_FILE)):
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing (a CTC {'result' if path.startswith(res_dir) else 'ground truth'} "
                            "folder has one)")
        read_tracks(path)  # the format, checked here: py-ctcmetrics stops on a malformed file with a traceback
    results = numbered_files(res_dir, RESULT_MASK_PATTERN)
    truth = [name for name in os.listdir(os.path.join(gt_dir, "TRA")) if name.endswith(".tif")]
    if len(results) != len(truth) or sorted(results) != list(range(len(results))):
        raise DataError(f"{res_dir}: {len(results)} result masks mask<frame>.tif numbered from 0 expected, one per "
                        f"ground-truth frame in {os.path.join(gt_dir, 'TRA')} ({len(truth)})")
    stray = [name for name in os.listdir(res_dir) if name.endswith(".tif") and not RESULT_MASK_PATTERN.match(name)]
    if stray:
        raise DataError(f"{os.path.join(res_dir, stray[0])}: a result folder holds only mask<frame>.tif images")


def ctc_scores(res_dir: str, gt_dir: str, threads: int = 1) -> dict:
    """SEG, DET, TRA and the division counts (BC(0): a division found in its exact frame) of a CTC tracking result,
    by py-ctcmetrics (the maintained Python port of the CTC's evaluation software). Its own progress prints are
    swallowed."""
    check_ctc_folders(res_dir, gt_dir)
    from ctc_metrics import evaluate_sequence  # imported here: only this mode needs it

    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate_sequence(res_dir, gt_dir, metrics=list(CTC_METRICS), threads=threads)


def print_ctc_scores(res_dir: str, scores: dict):
    if not scores.get("Valid", 1) or scores.get("TRA") is None:
        print(f"CTC {res_dir}: invalid result (py-ctcmetrics' validity check failed): SEG, DET, TRA not computed")
        return
    print(f"CTC {res_dir}: SEG {scores['SEG']:.6f}, DET {scores['DET']:.6f}, TRA {scores['TRA']:.6f}, divisions "
          f"{scores['tp_div(0)']} of {scores['gt_divisions']} found, {scores['fp_div(0)']} false")


def write_csv_atomically(table: pd.DataFrame, path: str):
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False), ".csv.tmp")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--pred_dir", default=None, help="folder with <seq>/t<frame>_256.tif predictions")
    parser.add_argument("--root_dir", "--gt_dir", dest="root_dir", action=Renamed, default=None,
                        help="data root with ground truth, challenge or CTC layout (--gt_dir: the baseline's spelling)")
    parser.add_argument("--seqs", default=None,
                        help="comma-separated sequences to score (default: every sequence folder of pred_dir with GT)")
    parser.add_argument("--native", action="store_true",
                        help="score the native-size maps <seq>/mask<frame>.tif (inference.py --native) against the GT "
                             "at its own size, instead of the challenge's 256 x 256 (with --gt/--pred: the headline "
                             "is the native score)")
    parser.add_argument("--csv", default=None, help="per-frame scores (default: <pred_dir>/instance_dice.csv, or "
                        "<pred without extension>_instance_dice.csv)")
    parser.add_argument("--gt", default=None, help="a mask stack (T x Y x X TIFF, or one frame) to score --pred "
                        "against, frame by frame")
    parser.add_argument("--pred", default=None, help="the label stack scored against --gt (same number of frames)")
    parser.add_argument("--ctc_res", default=None, help="a tracking result folder (mask000.tif ..., res_track.txt, "
                        "as track.py writes it): print its SEG, DET and TRA against --ctc_gt")
    parser.add_argument("--ctc_gt", default=None, help="the CTC ground truth of that sequence (<seq>_GT, with TRA/ "
                        "and SEG/)")
    parser.add_argument("--ctc_threads", type=positive_int, default=1,
                        help="processes py-ctcmetrics matches frames with")
    args = parser.parse_args(argv)
    stacks = args.gt is not None or args.pred is not None
    if (args.pred_dir is None) != (args.root_dir is None) or (args.ctc_res is None) != (args.ctc_gt is None) \
            or (args.gt is None) != (args.pred is None):
        parser.error("--pred_dir and --root_dir go together, and so do --ctc_res and --ctc_gt, and --gt and --pred")
    if stacks and (args.pred_dir or args.ctc_res or args.seqs):
        parser.error("--gt and --pred score two stacks and go with none of --pred_dir, --root_dir, --seqs, --ctc_res")
    if args.pred_dir is None and args.ctc_res is None and not stacks:
        parser.error("give --pred_dir and --root_dir (Instance Dice), --gt and --pred (Instance Dice of two stacks), "
                     "or --ctc_res and --ctc_gt (SEG, DET, TRA)")
    meter = EnergyMeter(gpus=[]).start()  # scoring runs on the CPU: RAPL where readable, else time
    try:
        ctc = ctc_scores(args.ctc_res, args.ctc_gt, args.ctc_threads) if args.ctc_res else None
        if stacks:
            table = evaluate_stacks(args.gt, args.pred)
            native = table["sequence"].str.endswith("@native")
            if args.native and not native.any():
                raise DataError(f"{args.pred}: frames of the challenge's {SCORE_SIZE[0]} x {SCORE_SIZE[1]}, not the "
                                f"size of {args.gt}: no native score")
            csv = args.csv or os.path.splitext(args.pred)[0] + "_instance_dice.csv"
        else:
            table = evaluate(args.pred_dir, args.root_dir, args.seqs.split(",") if args.seqs else None,
                             args.native) if args.pred_dir else None
            csv = args.csv or (os.path.join(args.pred_dir, "instance_dice.csv") if args.pred_dir else None)
        meter.stop()
        if table is not None:
            write_csv_atomically(table, csv)
    except (DataError, OSError) as error:
        sys.exit(error_line(error))
    if ctc is not None:
        print_ctc_scores(args.ctc_res, ctc)
    if table is None:
        print(meter.report(frames=None))
        return ctc
    for sequence, rows in table.groupby("sequence", sort=not stacks):
        pooled = sequence_scores(rows)
        print(f"sequence {sequence}: {len(rows)} frames, Instance Dice {rows['score'].mean():.6f}; at IoU 0.5 "
              f"precision {pooled['precision50']:.4f}, recall {pooled['recall50']:.4f}, F1 {pooled['f1_50']:.4f}, "
              f"AP {pooled['ap50']:.4f}; mean AP 0.5:0.95 {pooled['map']:.4f}")
    # with --gt/--pred, the rows of one size: the challenge's 256, or with --native the frames' own
    headline = (table[native] if args.native else table[~native]) if stacks else table
    mean = headline["score"].mean()
    print(meter.report(frames=len(headline)))
    print(f"Mean Instance Dice: {mean:.6f}")
    return mean


if __name__ == "__main__":
    main()
