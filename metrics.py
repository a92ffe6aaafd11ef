"""Matching predicted instances to ground truth, and the scores built on it. Pure numpy, no I/O (in the manner of
stardist's matching.py).

    instance_dice(gt, pred)   the challenge's score (SPEC §6): greedy Dice matching as acvl-utils, averaged the
                              baseline's way
"""
import numpy as np

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
