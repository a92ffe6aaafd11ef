"""Cell tracking and lineage: link per-frame instance maps into tracks, write the Cell Tracking Challenge's result
format and a table of per-cell histories.

    python track.py --labels pred/c --out_dir track/c                     # our predictions, t0000_256.tif ...
    python track.py --pred_dir pred --seqs c,d --out_dir track            # track/c_RES, track/d_RES
    python track.py --labels sim_ctc/01_GT/SEG --out_dir track/01_RES     # any man_seg000.tif / mask000.tif folder
    python track.py --labels pred/c --out_dir track/c --out_size 512 512  # 256 x 256 predictions, native-size result
    python track.py --labels masks/ --out_dir track/m --register none     # link without following stage drift

Input: one folder of instance maps paired by the frame number in their names, one kind of name per folder:
t0000_256.tif (predictions at 256 x 256), t0000.tif (native-size instance maps named like their images),
man_seg000.tif, man_track000.tif or mask000.tif, any digit count, numbered without gaps.

Output (out_dir, written into a hidden staging folder and renamed into place whole):
    mask000.tif ...   the frames with track ids as labels (3 digits; 4 from 1000 frames on), uint16
    res_track.txt     one line `label begin end parent` per track (CTC rules: a track ends at a division, both
                      daughters name it as parent; 0 for a root; a track interrupted by a missing frame continues
                      as a new track naming the interrupted one as parent)
    tracks.csv        one row per track: track_id, parent, generation, first_frame, last_frame, frames, divided,
                      area and major axis length at birth and at the end (division or last frame), growth_rate
                      (least-squares slope of log(area) over the track's frames, per frame)
    drift.csv         one row per frame: shift_y, shift_x (px the content moved since the frame before) and drift_y,
                      drift_x (since frame 0)

Drift: the stage (or the whole colony) may move between frames by more than a cell's width, and overlap would then
link nothing. Consecutive frames are registered first: the shift that maximises the overlap of their foregrounds
(cross-correlation by FFT, scikit-image's phase_cross_correlation without the phase normalisation), kept only where it
overlaps more than no shift; frames are linked with the earlier one moved by that shift. When most tracks still last
one frame, a warning says so.

Linking, frame t-1 -> t, from one contingency table of the two label maps (np.bincount over paired labels):
  1. division: a cell of t-1 with two cells of t each lying mostly inside it (overlap > DAUGHTER_INSIDE of the
     daughter's area; registered, inside it grown by DIVISION_TOLERANCE px), together covering more than
     MOTHER_COVERED of it, each smaller than DAUGHTER_MAX_SHARE of it;
  2. continuation: one-to-one assignment of the other cells (scipy's linear_sum_assignment, cost 1 - IoU, pairs with
     IoU >= MIN_IOU only, the most pairs first);
  3. gap closing: a cell of t left over links to a track lost at t-1 (last seen at t-2) by the same assignment on
     the overlap of frames t-2 and t;
  4. whatever is left starts a new track (entering at the chamber's open sides, or missed before); a track not
     continued ends (leaving the chamber, or missed).
"""
import argparse
import os
import re
import sys
import time

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from border_core import resize_nearest_exact
from data_files import (MASK_PATTERN, PREDICTION_PATTERN, RESULT_MASK_PATTERN, RESULT_TRACK_FILE, TRACK_MASK_PATTERN,
                        DataError, compact_labels, ctc_digits, format_tracks, narrowest_unsigned, numbered_files,
                        read_prediction, replace_folder, result_mask_name)
from metrics import dense_index, overlap_table_of_indices

DAUGHTER_INSIDE = 0.5  # share of a daughter's area inside its mother's last outline (> 0.5: one mother at most)
MOTHER_COVERED = 0.5  # share of the mother's area the two daughters cover
DAUGHTER_MAX_SHARE = 0.8  # a daughter is smaller than this share of its mother
MIN_IOU = 0.1  # the least IoU of a continuation or a gap closing
DIVISION_TOLERANCE = 4  # px: with registration, daughters are looked for in their mother grown by this much
REGISTER_BLUR = 2.0  # px: the foregrounds are smoothed before correlating, so that cells that grew or turned still align
SHORT_TRACKS_WARNING = 0.5  # warn when more than this share of the tracks last one frame, or appear without a parent

# the kinds of instance-map names track.py reads; a folder holds one kind
LABEL_PATTERNS = {"prediction (t0000_256.tif)": PREDICTION_PATTERN, "native-size map (t0000.tif)":
                  re.compile(r"^t(\d+)\.tiff?$"), "mask (man_seg000.tif)": MASK_PATTERN,
                  "track mask (man_track000.tif)": TRACK_MASK_PATTERN, "result mask (mask000.tif)": RESULT_MASK_PATTERN}
DRIFT_COLUMNS = ["frame", "shift_y", "shift_x", "drift_y", "drift_x"]
TRACK_COLUMNS = ["track_id", "parent", "generation", "first_frame", "last_frame", "frames", "divided",
                 "area_birth", "area_end", "length_birth", "length_end", "growth_rate"]


# ------------------------------------------------------------------------------------------------------ registration

def shifted(array: np.ndarray, shift, fill=0) -> np.ndarray:
    """`array` moved by the integer shift (dy, dx): out[y + dy, x + dx] = array[y, x]; what comes in is `fill`.

    >>> shifted(np.arange(6).reshape(2, 3), (0, 1), fill=-1)
    array([[-1,  0,  1],
           [-1,  3,  4]])
    """
    dy, dx = (int(round(v)) for v in shift)
    out = np.full_like(array, fill)
    height, width = array.shape
    if abs(dy) >= height or abs(dx) >= width:
        return out
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        array[max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)]
    return out


def foreground_overlap(previous: np.ndarray, current: np.ndarray, shift) -> int:
    """Pixels of `current`'s foreground covered by `previous`'s moved by `shift` (bool arrays)."""
    return int(np.count_nonzero(shifted(previous, shift, False) & current))


def frame_shift(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """(dy, dx) in whole pixels by which the content moved from label map `previous` to `current`: the peak of the
    cross-correlation of their smoothed foregrounds, kept only where it covers more of `current`'s foreground than
    no shift does (else 0, as for an empty frame)."""
    from skimage.registration import phase_cross_correlation  # imported here: skimage takes a second to import
    before, after = np.asarray(previous) > 0, np.asarray(current) > 0
    if not before.any() or not after.any():
        return np.zeros(2)
    smooth_before = ndimage.gaussian_filter(before.astype(np.float32), REGISTER_BLUR)
    smooth_after = ndimage.gaussian_filter(after.astype(np.float32), REGISTER_BLUR)
    shift = phase_cross_correlation(smooth_after, smooth_before, normalization=None)[0]
    shift = np.round(shift)
    if foreground_overlap(before, after, shift) <= foreground_overlap(before, after, (0, 0)):
        return np.zeros(2)
    return shift


def register_frames(label_maps) -> np.ndarray:
    """(T, 2) shifts: row t is how far the content moved from frame t-1 to frame t (row 0 is 0)."""
    shifts = np.zeros((len(label_maps), 2))
    for t in range(1, len(label_maps)):  # O(frames), one FFT correlation each
        shifts[t] = frame_shift(label_maps[t - 1], label_maps[t])
    return shifts


def drift_table(shifts) -> pd.DataFrame:
    """One row per frame (DRIFT_COLUMNS): the shift since the frame before and the drift since frame 0."""
    shifts = np.asarray(shifts, np.float64).reshape(-1, 2)
    drift = np.cumsum(shifts, 0)
    return pd.DataFrame({"frame": np.arange(len(shifts)), "shift_y": shifts[:, 0], "shift_x": shifts[:, 1],
                         "drift_y": drift[:, 0], "drift_x": drift[:, 1]}, columns=DRIFT_COLUMNS)


def linking_warning(tracks: np.ndarray, n_frames: int) -> str | None:
    """A warning line when linking looks implausible: most tracks that could have lasted longer than one frame last
    one frame, or most tracks that begin after frame 0 have no parent (cells appearing from nowhere). Cells then moved
    more than their size between frames (drift that registration did not follow), or the segmentation flickers."""
    tracks = np.asarray(tracks).reshape(-1, 4)
    could_last = tracks[tracks[:, 1] < n_frames - 1]
    later = tracks[tracks[:, 1] > 0]
    short = int(np.count_nonzero(could_last[:, 2] == could_last[:, 1]))
    orphans = int(np.count_nonzero(later[:, 3] == 0))
    if n_frames < 3:
        return None
    if len(could_last) >= 4 and short > SHORT_TRACKS_WARNING * len(could_last):
        found = f"{short} of {len(could_last)} tracks last one frame"
    elif len(later) >= 4 and orphans > SHORT_TRACKS_WARNING * len(later):
        found = f"{orphans} of {len(later)} tracks that begin after frame 0 have no parent"
    else:
        return None
    return (f"warning: {found}: linking by overlap failed for many cells (they moved more than their size between "
            f"frames); check drift.csv, the segmentation, or the frame interval")


# ---------------------------------------------------------------------------------------------------------- linking

def assign(pair_a, pair_b, iou, min_iou: float = MIN_IOU):
    """One-to-one assignment among candidate pairs (indices pair_a, pair_b with their IoU): the most pairs with
    IoU >= min_iou, and among those the highest summed IoU. A pair that is the only candidate of both its cells is
    taken as it is; linear_sum_assignment runs on the rest only (the few cells with several candidates)."""
    keep = iou >= min_iou
    pair_a, pair_b, iou = pair_a[keep], pair_b[keep], iou[keep]
    if not len(pair_a):
        return pair_a, pair_b
    _, a_inverse, a_counts = np.unique(pair_a, return_inverse=True, return_counts=True)
    _, b_inverse, b_counts = np.unique(pair_b, return_inverse=True, return_counts=True)
    alone = (a_counts[a_inverse] == 1) & (b_counts[b_inverse] == 1)
    chosen_a, chosen_b = [pair_a[alone]], [pair_b[alone]]
    if not alone.all():
        rest_a, rest_b, rest_iou = pair_a[~alone], pair_b[~alone], iou[~alone]
        rows, row_index = np.unique(rest_a, return_inverse=True)
        cols, col_index = np.unique(rest_b, return_inverse=True)
        # an allowed pair costs 1 - IoU < 1, a forbidden one more than all allowed pairs together: one forbidden
        # pair fewer always wins, whatever the IoUs
        forbidden = min(len(rows), len(cols)) + 1.0
        cost = np.full((len(rows), len(cols)), forbidden)
        cost[row_index, col_index] = 1 - rest_iou
        r, c = linear_sum_assignment(cost)
        allowed = cost[r, c] < forbidden
        chosen_a.append(rows[r[allowed]])
        chosen_b.append(cols[c[allowed]])
    return np.concatenate(chosen_a), np.concatenate(chosen_b)


def find_divisions(a_sizes, b_sizes, pair_a, pair_b, overlap):
    """(mothers, first daughters, second daughters) as indices into frames t-1 and t; see the module's docstring."""
    inside = overlap > DAUGHTER_INSIDE * b_sizes[pair_b]
    small = b_sizes[pair_b] < DAUGHTER_MAX_SHARE * a_sizes[pair_a]
    candidate = np.flatnonzero(inside & small)
    if not len(candidate):
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    # per mother, its candidates by decreasing overlap; the first two of a mother with at least two are the daughters
    order = candidate[np.lexsort((-overlap[candidate], pair_a[candidate]))]
    mothers = pair_a[order]
    first = np.flatnonzero(np.r_[True, mothers[1:] != mothers[:-1]])
    two = first[(first + 1 < len(order))]
    two = two[mothers[two + 1] == mothers[two]]
    mother, one, other = mothers[two], pair_b[order[two]], pair_b[order[two + 1]]
    covered = (overlap[order[two]] + overlap[order[two + 1]]) > MOTHER_COVERED * a_sizes[mother]
    return mother[covered], one[covered], other[covered]


def only(index, cells, n_cells):
    """A dense index map with every cell not in `cells` made background (-1)."""
    lookup = np.full(n_cells + 1, -1, np.int64)
    lookup[np.asarray(cells) + 1] = cells
    return lookup[index + 1]


def match_frames(prev_index, n_prev, index, n, tolerance: float = 0):
    """Divisions (mothers, first and second daughters) and continuations (kept_a, kept_b) between two dense index maps
    of one size (the earlier one already moved into the later one's coordinates). `tolerance` > 0: a daughter lies
    inside her mother as grown by that many px (skimage's expand_labels, neighbours never overlap), for what one
    shift cannot follow: a colony that grows spreads out from its middle."""
    _, _, a_sizes, b_sizes, pair_a, pair_b, overlap = overlap_table_of_indices(
        np.arange(n_prev), prev_index.ravel(), np.arange(n), index.ravel())
    if tolerance > 0:
        from skimage.segmentation import expand_labels
        grown = expand_labels(prev_index + 1, tolerance) - 1
        _, _, _, _, grown_a, grown_b, grown_overlap = overlap_table_of_indices(
            np.arange(n_prev), grown.ravel(), np.arange(n), index.ravel())
        mothers, one, other = find_divisions(a_sizes, b_sizes, grown_a, grown_b, grown_overlap)
    else:
        mothers, one, other = find_divisions(a_sizes, b_sizes, pair_a, pair_b, overlap)
    taken_a, taken_b = np.zeros(n_prev, bool), np.zeros(n, bool)
    taken_a[mothers] = taken_b[one] = taken_b[other] = True
    free = ~taken_a[pair_a] & ~taken_b[pair_b]
    iou = overlap / (a_sizes[pair_a] + b_sizes[pair_b] - overlap)
    kept_a, kept_b = assign(pair_a[free], pair_b[free], iou[free])
    return mothers, one, other, kept_a, kept_b


def link_tracks(label_maps, shifts=None):
    """Link a sequence of instance maps (2-D integer arrays of one size, labels per frame arbitrary) into tracks;
    `shifts` (T, 2), from register_frames: how far the content moved from each frame to the next (None: not at all).

    Returns (track_maps, tracks): track_maps[t] is label_maps[t] with each cell's label replaced by its track id
    (uint16, uint32 beyond 65535 tracks), and tracks is the CTC table, an (n, 4) int64 array of rows
    (track id, first frame, last frame, parent track id or 0), ids 1..n in order of appearance.
    """
    begin, parent, tracks_per_frame, track_maps = [], [], [], []

    def new_tracks(count, parents, t):
        first = len(begin) + 1
        begin.extend([t] * count)
        parent.extend(np.broadcast_to(parents, (count,)).tolist())
        return np.arange(first, first + count)

    previous = before = None  # (dense index map, track id per cell, drift since frame 0) of frames t-1 and t-2
    lost_before = np.zeros(0, np.int64)  # cells of frame t-2 whose track was lost at t-1
    drift = np.cumsum(np.zeros((len(label_maps), 2)) if shifts is None else np.asarray(shifts, np.float64), 0)
    for t, labels in enumerate(label_maps):
        labels = np.asarray(labels)
        if previous is not None and labels.shape != previous[0].shape:
            raise ValueError(f"frame {t} has size {labels.shape}, frame {t - 1} {previous[0].shape}")
        cell_labels, index = dense_index(labels.ravel())
        index = index.reshape(labels.shape)
        n = len(cell_labels)
        track_of = np.zeros(n, np.int64)
        lost_now = np.zeros(0, np.int64)
        if previous is None:
            track_of[:] = new_tracks(n, 0, t)
        else:
            prev_index, prev_track, prev_drift = previous
            moved = shifted(prev_index, drift[t] - prev_drift, -1)  # in frame t's coordinates
            tolerance = 0 if shifts is None else DIVISION_TOLERANCE
            mothers, one, other, kept_a, kept_b = match_frames(moved, len(prev_track), index, n, tolerance)
            taken_a, taken_b = np.zeros(len(prev_track), bool), np.zeros(n, bool)
            taken_a[mothers] = taken_b[one] = taken_b[other] = True
            track_of[kept_b] = prev_track[kept_a]
            taken_a[kept_a] = taken_b[kept_b] = True
            for mother, daughters in zip(mothers, zip(one, other)):  # O(divisions)
                track_of[list(daughters)] = new_tracks(2, prev_track[mother], t)
            lost_now = np.flatnonzero(~taken_a)
            left = np.flatnonzero(~taken_b)
            if len(left) and len(lost_before):  # gap closing over one missing frame
                before_index, before_track, before_drift = before
                before_index = shifted(before_index, drift[t] - before_drift, -1)
                lost_index = only(before_index, lost_before, len(before_track))
                left_index = only(index, left, n)
                _, _, c_sizes, d_sizes, pair_c, pair_d, gap_overlap = overlap_table_of_indices(
                    before_track, lost_index.ravel(), cell_labels, left_index.ravel())
                gap_iou = gap_overlap / (c_sizes[pair_c] + d_sizes[pair_d] - gap_overlap)
                closed_c, closed_d = assign(pair_c, pair_d, gap_iou)
                for c, d in zip(closed_c, closed_d):  # O(closed gaps): the continuation names the interrupted track
                    track_of[d] = new_tracks(1, before_track[c], t)[0]
                taken_b[closed_d] = True
            left = np.flatnonzero(~taken_b)
            track_of[left] = new_tracks(len(left), 0, t)
        before, lost_before = previous, lost_now
        previous = (index, track_of, drift[t])
        tracks_per_frame.append(track_of)
        track_maps.append(np.concatenate([[0], track_of])[index + 1])
    end = np.zeros(len(begin) + 1, np.int64)
    for t, track_of in enumerate(tracks_per_frame):
        end[track_of] = t
    tracks = np.stack([np.arange(1, len(begin) + 1), begin, end[1:], parent], 1).astype(np.int64).reshape(-1, 4)
    dtype = np.uint16 if len(begin) <= np.iinfo(np.uint16).max else np.uint32
    return [m.astype(dtype) for m in track_maps], tracks


# ---------------------------------------------------------------------------------------------------- per-cell table

def track_statistics(track_maps, tracks) -> pd.DataFrame:
    """One row per track (TRACK_COLUMNS): lineage, frames, area and major axis length at birth and end, growth rate.

    Per frame, every cell's area and second moments come from np.bincount over its track map (O(pixels)); the growth
    rate is the least-squares slope of log(area) against frame number, accumulated as sums per track (NaN for a
    one-frame track). Length is the major axis of the ellipse with the cell's second moments (4 sqrt(largest
    eigenvalue), as skimage's axis_major_length)."""
    n = len(tracks)
    ids, first, last, parents = (tracks[:, k] for k in range(4))
    sums = np.zeros((5, n + 1))  # frames, sum t, sum t^2, sum log a, sum t log a
    area_birth, area_end = np.zeros(n + 1), np.zeros(n + 1)
    length_birth, length_end = np.zeros(n + 1), np.zeros(n + 1)
    begins, ends = np.zeros(n + 1, np.int64), np.zeros(n + 1, np.int64)
    begins[ids], ends[ids] = first, last
    if len(track_maps):
        yy, xx = np.indices(np.asarray(track_maps[0]).shape, dtype=np.float64)
        yy, xx = yy.ravel(), xx.ravel()
    for t, track_map in enumerate(track_maps):
        labels = np.asarray(track_map).ravel().astype(np.int64)
        area = np.bincount(labels, minlength=n + 1).astype(np.float64)
        present = np.flatnonzero(area[1:]) + 1
        if not len(present):
            continue
        a = area[present]
        sums[:, present] += [np.ones_like(a), np.full_like(a, t), np.full_like(a, t * t), np.log(a), t * np.log(a)]
        at_birth, at_end = present[begins[present] == t], present[ends[present] == t]
        if len(at_birth) or len(at_end):
            length = major_axis_lengths(labels, xx, yy, area, n)
            area_birth[at_birth], length_birth[at_birth] = area[at_birth], length[at_birth]
            area_end[at_end], length_end[at_end] = area[at_end], length[at_end]
    count, st, stt, sy, sty = sums[:, ids]
    denominator = count * stt - st ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        growth = np.where(denominator > 0, (count * sty - st * sy) / np.where(denominator > 0, denominator, 1), np.nan)
    children = np.bincount(parents, minlength=n + 1)
    generation = generations(tracks)
    return pd.DataFrame({
        "track_id": ids, "parent": parents, "generation": generation[ids], "first_frame": first, "last_frame": last,
        "frames": last - first + 1, "divided": children[ids] >= 2, "area_birth": area_birth[ids],
        "area_end": area_end[ids], "length_birth": length_birth[ids], "length_end": length_end[ids],
        "growth_rate": growth}, columns=TRACK_COLUMNS)


def generations(tracks) -> np.ndarray:
    """Generation of every track id (index = id; 0 for a root): a division makes a new generation, a gap's
    continuation (one child) stays in its parent's. Ids are 1..n in order of appearance, so a parent's id is lower
    than its children's."""
    tracks = np.asarray(tracks).reshape(-1, 4)
    n = int(tracks[:, 0].max(initial=0))
    parent_of = np.zeros(n + 1, np.int64)
    parent_of[tracks[:, 0]] = tracks[:, 3]
    children = np.bincount(tracks[:, 3], minlength=n + 1)
    generation = np.zeros(n + 1, np.int64)
    for label in np.sort(tracks[:, 0]):  # O(tracks)
        p = parent_of[label]
        if p:
            generation[label] = generation[p] + (children[p] >= 2)
    return generation


def major_axis_lengths(labels, xx, yy, area, n):
    """Major axis length of every label from its second central moments (np.bincount, no loop over cells)."""
    safe = np.maximum(area, 1)
    mx, my = np.bincount(labels, xx, n + 1) / safe, np.bincount(labels, yy, n + 1) / safe
    cxx = np.bincount(labels, xx * xx, n + 1) / safe - mx ** 2
    cyy = np.bincount(labels, yy * yy, n + 1) / safe - my ** 2
    cxy = np.bincount(labels, xx * yy, n + 1) / safe - mx * my
    largest = (cxx + cyy) / 2 + np.sqrt(((cxx - cyy) / 2) ** 2 + cxy ** 2)
    return 4 * np.sqrt(np.maximum(largest, 0))


# -------------------------------------------------------------------------------------------------------------- I/O

def find_label_files(folder: str) -> list[str]:
    """The instance maps of a folder in frame order; one kind of name, numbered without gaps."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: label folder does not exist")
    kinds = {kind: numbered_files(folder, pattern) for kind, pattern in LABEL_PATTERNS.items()}
    kinds = {kind: files for kind, files in kinds.items() if files}
    if not kinds:
        raise DataError(f"{folder}: no instance maps (names: {', '.join(LABEL_PATTERNS)})")
    if set(kinds) == {"prediction (t0000_256.tif)", "result mask (mask000.tif)"}:
        del kinds["prediction (t0000_256.tif)"]  # inference.py --native wrote both: the frame-size maps are the ones
    if len(kinds) > 1:
        raise DataError(f"{folder}: instance maps of more than one kind of name ({', '.join(kinds)}); keep one")
    files = next(iter(kinds.values()))
    numbers = sorted(files)
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if missing:
        raise DataError(f"{folder}: gap in the frame numbering, no frame {', '.join(map(str, missing[:5]))}"
                        f"{' ...' if len(missing) > 5 else ''} between {numbers[0]} and {numbers[-1]}")
    return [files[k] for k in numbers]


def read_label_maps(paths: list[str], out_size=None) -> list[np.ndarray]:
    """Every frame read and checked (integer labels, one size) before anything is linked or written; resized
    (nearest) to out_size when given."""
    maps, shape = [], None
    for path in paths:
        labels = read_prediction(path)
        if labels.dtype == bool:
            labels = labels.astype(np.uint8)
        if shape is None:
            shape = labels.shape
        elif labels.shape != shape:
            raise DataError(f"{path}: frame size {labels.shape} differs from {shape} of {paths[0]}")
        if out_size is not None and labels.shape != tuple(out_size):
            labels = resize_nearest_exact(labels, tuple(out_size))  # pixel centres aligned
        if labels.dtype == np.uint64:  # ids beyond int64 renumbered in order; linking indexes them as int64
            labels = narrowest_unsigned(compact_labels(labels))
        maps.append(narrowest_unsigned(labels) if labels.dtype.kind == "i" else labels)
    return maps


def write_result(out_dir: str, track_maps, tracks, statistics: pd.DataFrame, overwrite: bool = False,
                 drift: pd.DataFrame | None = None):
    """mask<frame>.tif, res_track.txt, tracks.csv and drift.csv, staged in a hidden folder beside out_dir and renamed into place
    whole: out_dir is either the complete result or what it was before."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise DataError(f"{out_dir}: already exists; choose another folder, remove it or pass --overwrite")
    digits = ctc_digits(len(track_maps))

    def write(staging):
        for t, track_map in enumerate(track_maps):
            tifffile.imwrite(os.path.join(staging, result_mask_name(t, digits)), track_map)
        with open(os.path.join(staging, RESULT_TRACK_FILE), "w") as file:
            file.write(format_tracks(tracks))
        statistics.to_csv(os.path.join(staging, "tracks.csv"), index=False)
        (drift_table(np.zeros((len(track_maps), 2))) if drift is None else drift).to_csv(
            os.path.join(staging, "drift.csv"), index=False)
    replace_folder(out_dir, write, "track")


def track(labels_dir: str, out_dir: str, out_size=None, overwrite: bool = False, register: bool = True) -> dict:
    """Read, register, link, describe and write one sequence; returns counts, the linking time and a warning line
    (None when linking looks plausible)."""
    label_maps = read_label_maps(find_label_files(labels_dir), out_size)
    start = time.perf_counter()
    shifts = register_frames(label_maps) if register else np.zeros((len(label_maps), 2))
    track_maps, tracks = link_tracks(label_maps, shifts)
    link_seconds = time.perf_counter() - start
    statistics = track_statistics(track_maps, tracks)
    write_result(out_dir, track_maps, tracks, statistics, overwrite, drift_table(shifts))
    return {"frames": len(track_maps), "tracks": len(tracks), "divisions": int(statistics["divided"].sum()),
            "link_seconds": link_seconds, "largest_shift": float(np.abs(shifts).max(initial=0)),
            "warning": linking_warning(tracks, len(track_maps))}


def positive_size(text: str) -> int:
    """argparse type of one side of --out_size: a whole number of pixels from 1 to 16384 (a frame of at most 2**28
    pixels, the limit every reader keeps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of pixels: {text!r}") from None
    if not 1 <= value <= 16384:
        raise argparse.ArgumentTypeError(f"a side of 1 to 16384 px, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", help="folder of per-frame instance maps")
    source.add_argument("--pred_dir", help="predictions' root (inference.py's): each <pred_dir>/<seq> is tracked into "
                        "<out_dir>/<seq>_RES")
    parser.add_argument("--seqs", default=None, help="with --pred_dir: comma-separated sequences (default: every "
                        "folder of --pred_dir)")
    parser.add_argument("--out_dir", "--out", dest="out_dir", required=True,
                        help="result folder (CTC format: mask000.tif ..., res_track.txt; and tracks.csv, drift.csv); "
                             "with --pred_dir the folder of the <seq>_RES results")
    parser.add_argument("--out_size", type=positive_size, nargs="+", default=None, metavar="PX",
                        help="resize the maps (nearest) to S x S or H x W before linking, e.g. the ground truth's size "
                             "for 256 x 256 predictions (default: as they are)")
    parser.add_argument("--register", choices=("masks", "none"), default="masks",
                        help="follow stage drift by registering consecutive frames' masks, or not (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing result folder")
    args = parser.parse_args(argv)
    out_size = None
    if args.out_size is not None:
        if len(args.out_size) > 2:
            parser.error(f"argument --out_size: one size S or two, H W; got {len(args.out_size)}: "
                         f"{' '.join(map(str, args.out_size))}")
        out_size = tuple(args.out_size * 2 if len(args.out_size) == 1 else args.out_size)
    if args.seqs is not None and args.pred_dir is None:
        parser.error("argument --seqs: goes with --pred_dir (with --labels the folder is the sequence)")
    try:
        jobs = [(args.labels, args.out_dir)] if args.labels else [
            (os.path.join(args.pred_dir, seq), os.path.join(args.out_dir, f"{seq}_RES"))
            for seq in prediction_sequences(args.pred_dir, args.seqs)]
        for labels, out_dir in jobs:  # every sequence read and checked before its result is written
            summary = track(labels, out_dir, out_size, args.overwrite, args.register == "masks")
            print(f"{out_dir}: {summary['frames']} frames, {summary['tracks']} tracks, {summary['divisions']} "
                  f"divisions; largest shift between frames {summary['largest_shift']:.0f} px; linking "
                  f"{summary['link_seconds']:.2f} s ({summary['frames'] / max(summary['link_seconds'], 1e-9):.1f} "
                  f"frames/s)")
            if summary["warning"]:
                print(summary["warning"], file=sys.stderr)
    except DataError as error:
        sys.exit(f"error: {error}")
    return summary


def prediction_sequences(pred_dir: str, seqs: str | None) -> list[str]:
    """The sequences to track: those named (each must be a folder of pred_dir), else every folder of pred_dir."""
    if not os.path.isdir(pred_dir):
        raise DataError(f"{pred_dir}: prediction folder does not exist")
    found = sorted(e for e in os.listdir(pred_dir) if os.path.isdir(os.path.join(pred_dir, e)) and
                   not e.startswith("."))
    if seqs is None:
        if not found:
            raise DataError(f"{pred_dir}: no sequence folder to track")
        return found
    names = [name.strip() for name in seqs.split(",") if name.strip()]
    missing = [name for name in names if name not in found]
    if missing or not names:
        raise DataError(f"{pred_dir}: no sequence {', '.join(missing) or repr(seqs)} (folders found: "
                        f"{', '.join(found) or 'none'}); choose with --seqs")
    return names


if __name__ == "__main__":
    main()
