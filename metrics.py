"""Matching predicted instances to ground truth, and the scores built on it. Pure numpy, no I/O (in the manner of
stardist's matching.py).

    instance_dice(gt, pred)   the challenge's score (docs/baseline.md §6): greedy Dice matching as acvl-utils, averaged the
                              baseline's way
    iou_counts(gt, pred, t)   TP, FP, FN of a one-to-one matching with IoU > t, and from them
    detection_scores(...)     precision, recall, F1 and AP = TP / (TP + FP + FN) (AP as StarDist and Cellpose report it)
    mean_ap(...)              that AP averaged over IoU thresholds 0.5, 0.55, ..., 0.95
"""
import numpy as np
from scipy.optimize import linear_sum_assignment

DICE_CUTOFF = 0.1
IOU_THRESHOLDS = np.round(np.arange(0.5, 0.96, 0.05), 2)  # 0.5:0.95, the COCO range


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


def overlap_table(a: np.ndarray, b: np.ndarray):
    """The contingency table of two label images, as its non-zero entries: (labels of a, labels of b, size of each
    label of a, of b, pair_a, pair_b, overlap), where pair_a / pair_b index the label lists and overlap counts the
    pixels of that pair. One pass over the pixels (np.bincount over paired dense indices) plus O(pairs)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label images differ in size: {a.shape} vs {b.shape}")
    a_labels, a_index = dense_index(a.ravel())
    b_labels, b_index = dense_index(b.ravel())
    return overlap_table_of_indices(a_labels, a_index, b_labels, b_index)


def overlap_table_of_indices(a_labels, a_index, b_labels, b_index):
    """overlap_table on already dense-indexed images (see dense_index), for callers that reuse one image's index."""
    n_a, n_b = len(a_labels), len(b_labels)
    a_sizes = np.bincount(a_index[a_index >= 0], minlength=n_a)
    b_sizes = np.bincount(b_index[b_index >= 0], minlength=n_b)
    both = (a_index >= 0) & (b_index >= 0)
    pair_codes = a_index[both].astype(np.int64) * n_b + b_index[both]
    if n_a * n_b <= 4 * pair_codes.size + 1_000_000:  # a dense table is cheap: count without sorting
        overlap = np.bincount(pair_codes, minlength=n_a * n_b)
        pairs = np.flatnonzero(overlap)
        overlap = overlap[pairs]
    else:
        pairs, overlap = np.unique(pair_codes, return_counts=True)
    pair_a, pair_b = pairs // max(n_b, 1), pairs % max(n_b, 1)
    return a_labels, b_labels, a_sizes, b_sizes, pair_a, pair_b, overlap


def match_instances(gt: np.ndarray, pred: np.ndarray, cutoff: float = DICE_CUTOFF):
    """Greedy Dice matching of acvl-utils' `match_instances_dice`: repeatedly the pair with the highest Dice above
    `cutoff`, both then removed; ties go to the lower GT label, then the lower predicted label.

    Returns ([(GT label, predicted label, Dice) of each match, in matching order], GT count, predicted count).
    Works on the table of overlapping label pairs, so the cost is one pass over the pixels plus O(pairs).
    """
    table = overlap_table(gt, pred)
    gt_labels, pred_labels, gt_sizes, pred_sizes, pair_gt, pair_pred, overlap = table
    n_gt, n_pred = len(gt_labels), len(pred_labels)
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


def pair_iou(table) -> np.ndarray:
    """IoU of each overlapping pair of an overlap_table."""
    _, _, a_sizes, b_sizes, pair_a, pair_b, overlap = table
    return overlap / (a_sizes[pair_a] + b_sizes[pair_b] - overlap)


def count_iou_matches(table, threshold: float) -> int:
    """Size of the largest one-to-one matching of pairs with IoU > threshold. Above 0.5 every instance has at most
    one such partner (two partners would need more than its whole area), so the pairs themselves are the matching;
    below, linear_sum_assignment finds the largest matching among them."""
    iou = pair_iou(table)
    keep = iou > threshold
    if threshold >= 0.5 or not keep.any():
        return int(keep.sum())
    _, _, _, _, pair_a, pair_b, _ = table
    rows, row_index = np.unique(pair_a[keep], return_inverse=True)
    cols, col_index = np.unique(pair_b[keep], return_inverse=True)
    cost = np.ones((len(rows), len(cols)))
    cost[row_index, col_index] = 0  # 0 for an allowed pair, 1 otherwise: minimal cost = most allowed pairs
    assigned_rows, assigned_cols = linear_sum_assignment(cost)
    return int((cost[assigned_rows, assigned_cols] == 0).sum())


def iou_counts(gt: np.ndarray, pred: np.ndarray, thresholds=(0.5,)) -> np.ndarray:
    """(TP, FP, FN) for each IoU threshold: an array of shape (len(thresholds), 3). One contingency table for all."""
    table = overlap_table(gt, pred)
    n_gt, n_pred = len(table[0]), len(table[1])
    counts = []
    for threshold in np.atleast_1d(thresholds):
        tp = count_iou_matches(table, float(threshold))
        counts.append((tp, n_pred - tp, n_gt - tp))
    return np.array(counts, np.int64).reshape(-1, 3)


def detection_scores(tp, fp, fn) -> dict:
    """Precision, recall, F1 and AP = TP / (TP + FP + FN) of counts (scalars or arrays). An undefined ratio (no
    prediction: precision; no GT: recall) is 0, except that nothing to find and nothing found scores 1 throughout, as
    in instance_dice."""
    tp, fp, fn = (np.asarray(v, np.float64) for v in (tp, fp, fn))
    empty = (tp + fp + fn) == 0

    def ratio(num, den):
        return np.where(den > 0, num / np.maximum(den, 1), np.where(empty, 1.0, 0.0))

    return {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "ap": ratio(tp, tp + fp + fn)}


def mean_ap(counts: np.ndarray) -> float:
    """Mean of AP over the rows of iou_counts(..., IOU_THRESHOLDS) (or their sums over frames)."""
    counts = np.asarray(counts)
    return float(np.mean(detection_scores(counts[:, 0], counts[:, 1], counts[:, 2])["ap"]))


def pooled_ap(pairs, threshold: float = 0.5) -> float:
    """AP = TP / (TP + FP + FN) at one IoU threshold over frames, (GT, prediction) pairs, the counts pooled over the
    frames first (as eval.py's line per sequence and StarDist's matching_dataset do), not AP averaged per frame.

    >>> gt = np.array([[1, 1, 0, 2, 2, 0, 3, 3]])
    >>> pooled_ap([(gt, gt)])
    1.0
    >>> pooled_ap([(gt, np.where(gt == 3, 0, gt))])     # one cell of three missed: 2 / 3
    0.6666666666666666
    >>> pooled_ap([(gt, gt), (np.array([[1, 1]]), np.array([[0, 0]]))])   # pooled 3 / 4; per frame would give 1/2
    0.75
    """
    counts = sum((iou_counts(gt, pred, (threshold,))[0] for gt, pred in pairs), np.zeros(3, np.int64))
    return float(detection_scores(*counts)["ap"])
