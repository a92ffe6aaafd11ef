"""Simulated time-lapse phase-contrast movies of growing bacterial microcolonies, with instance masks.

    python simulate.py --out_dir demo_data                                  # the challenge layout: a..c with GT, d, e without
    python simulate.py --out_dir sim --frames 800 --size 512 --sequences 5 --seed 1
    python simulate.py --out_dir sim_ctc --layout ctc --sequences 1 --without_gt 0 --frames 200   # 01, 01_GT/{SEG,TRA}

Biology: rod-shaped cells (capsules: a segment with round caps) grow exponentially in length, divide in two at a
length threshold drawn per cell, and push each other apart (and away from the chamber walls) so that they do not
overlap. A colony starts from one to three cells in the middle of a monolayer chamber that is closed at the top and
bottom and open at the left and right, where cells pushed out leave the chamber, as in microfluidic growth chambers.
The growth rate is set so that the chamber fills after about 85 % of the movie; from then on it stays densely packed.

Optics (as real phase contrast): dark cells with bright boundaries between neighbours and a bright halo around them,
on a grey background, blurred, under uneven illumination that flickers slightly, with noise; uint8 frames. Masks are
uint16; a cell keeps its label (its track id) from birth to division, daughters get new labels. The true lineage
(the mother of each daughter) is kept, and the CTC layout (--layout ctc) writes it as tracking ground truth
(<seq>_GT/TRA: man_track000.tif and man_track.txt); a cell that leaves the chamber ends its track there.

Same seed, same bytes. The physics is vectorised over pairs of neighbouring cells, rendering loops over cells only
(each in its bounding box); nothing loops over pixels.
"""
import argparse
import os
import string
import sys
import time

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from dataset import DataError, ctc_digits, write_ctc_sequence, write_sequence

CELL_RADIUS = 6.0  # px: cells 12 px wide, like C. glutamicum at 0.072 µm/px
DIVISION_LENGTH = 50.0  # px, tip to tip, mean of the per-cell threshold
DIVISION_SPREAD = 0.1  # relative spread of that threshold and of the growth rate
FILL_FRACTION = 0.85  # share of the movie after which the chamber is full
PACKING = 0.8  # cell area / chamber area aimed at
PRESSURE_SCALE = 2.0  # px of summed overlap depth that halves a cell's growth


# ---------------------------------------------------------------------------------------------------------------- physics

class Colony:
    """Cells as capsules: centre (x, y), axis angle, segment length (tip to tip minus 2 r), growth rate per frame,
    division length, label. All arrays of one entry per cell; `parent` maps each daughter's label to its mother's."""

    def __init__(self, rng: np.random.Generator, chamber, n_frames: int, n_start: int = 1):
        self.rng, self.chamber = rng, chamber  # chamber = (x0, y0, x1, y1), open at x0 and x1
        x0, y0, x1, y1 = chamber
        cell_area = (0.75 * DIVISION_LENGTH - 2 * CELL_RADIUS) * 2 * CELL_RADIUS + np.pi * CELL_RADIUS ** 2
        target_cells = PACKING * (x1 - x0) * (y1 - y0) / cell_area
        self.rate = np.log(max(target_cells / n_start, 2.0)) / (FILL_FRACTION * max(n_frames - 1, 1))
        centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        self.pos = centre + rng.normal(0, 2 * CELL_RADIUS, (n_start, 2))
        self.angle = rng.uniform(0, np.pi, n_start)
        self.length = rng.uniform(0.5, 0.9, n_start) * DIVISION_LENGTH - 2 * CELL_RADIUS
        self.growth = self._draw_rates(n_start)
        self.divide_at = self._draw_division_lengths(n_start)
        self.label = np.arange(1, n_start + 1)
        self.next_label = n_start + 1
        self.divisions = 0
        self.parent = {}
        self.pressure = np.zeros(n_start)
        self.relax()

    def _draw_rates(self, n):
        return self.rate * (1 + DIVISION_SPREAD * self.rng.standard_normal(n)).clip(0.5, 1.5)

    def _draw_division_lengths(self, n):
        return DIVISION_LENGTH * (1 + DIVISION_SPREAD * self.rng.standard_normal(n)).clip(0.7, 1.3)

    @property
    def axis(self):
        return np.stack([np.cos(self.angle), np.sin(self.angle)], 1)

    def endpoints(self):
        half = (0.5 * self.length)[:, None] * self.axis
        return self.pos - half, self.pos + half

    def step(self, substeps: int = 1):
        """One frame: grow (slower under contact pressure), divide, push apart, drop cells that left the chamber."""
        for _ in range(substeps):
            # cells squeezed by their neighbours grow slower: a packed chamber stops filling and flows out
            inhibition = 1 / (1 + self.pressure / PRESSURE_SCALE)
            total = (self.length + 2 * CELL_RADIUS) * np.exp(self.growth * inhibition / substeps)
            self.length = total - 2 * CELL_RADIUS
            self.divide()
            self.relax()
            self.leave()

    def divide(self):
        dividing = self.length + 2 * CELL_RADIUS >= self.divide_at
        if not dividing.any():
            return
        parents = np.flatnonzero(dividing)
        n = len(parents)
        total = self.length[parents] + 2 * CELL_RADIUS
        offset = (total / 4)[:, None] * self.axis[parents]
        jitter = self.rng.normal(0, 0.05, (2, n))
        self.pos = np.concatenate([np.delete(self.pos, parents, 0), self.pos[parents] - offset,
                                   self.pos[parents] + offset])
        self.angle = np.concatenate([np.delete(self.angle, parents), self.angle[parents] + jitter[0],
                                     self.angle[parents] + jitter[1]])
        daughter_length = np.tile(total / 2 - 2 * CELL_RADIUS, 2)
        self.length = np.concatenate([np.delete(self.length, parents), daughter_length])
        self.growth = np.concatenate([np.delete(self.growth, parents), self._draw_rates(2 * n)])
        self.divide_at = np.concatenate([np.delete(self.divide_at, parents), self._draw_division_lengths(2 * n)])
        self.pressure = np.concatenate([np.delete(self.pressure, parents), np.tile(self.pressure[parents], 2)])
        new_labels = self.next_label + np.arange(2 * n)
        mothers = np.tile(self.label[parents], 2)  # daughters k and n + k are the two halves of mother k
        self.parent.update(zip(new_labels.tolist(), mothers.tolist()))
        self.label = np.concatenate([np.delete(self.label, parents), new_labels])
        self.next_label += 2 * n
        self.divisions += n

    def neighbour_pairs(self, margin: float = 2 * CELL_RADIUS):
        """Pairs of cells whose centres are close enough to touch, with room for the moves of one relaxation."""
        reach = float(self.length.max(initial=0) + 2 * CELL_RADIUS + margin)
        return cKDTree(self.pos).query_pairs(reach, output_type="ndarray").reshape(-1, 2)

    def overlaps(self, pairs=None):
        """Touching pairs among `pairs` (default: all neighbours): indices i, j, contact points on each axis, and
        overlap depth (2 r minus the distance of the axes)."""
        pairs = self.neighbour_pairs(0) if pairs is None else pairs
        i, j = pairs[:, 0], pairs[:, 1]
        a, b = self.endpoints()
        on_i, on_j = closest_points_between_segments(a[i], b[i], a[j], b[j])
        depth = 2 * CELL_RADIUS - np.linalg.norm(on_i - on_j, axis=1)
        touching = depth > 0
        return i[touching], j[touching], on_i[touching], on_j[touching], depth[touching]

    def relax(self, max_iterations: int = 30, tolerance: float = 0.5):
        """Push overlapping cells apart along the contact normal and turn them by the torque of that push; keep the
        tips inside the chamber's top and bottom walls. Iterates until no overlap is deeper than `tolerance` px."""
        _, y0, _, y1 = self.chamber
        pairs = self.neighbour_pairs()
        for _ in range(max_iterations):
            move = np.zeros_like(self.pos)
            turn = np.zeros_like(self.angle)
            i, j, on_i, on_j, depth = self.overlaps(pairs)
            if len(i):
                normal = on_i - on_j
                norm = np.linalg.norm(normal, axis=1, keepdims=True)
                degenerate = norm[:, 0] < 1e-9  # axes crossing: push sideways to the first cell's axis
                normal[degenerate] = np.stack([-np.sin(self.angle[i[degenerate]]),
                                               np.cos(self.angle[i[degenerate]])], 1)
                norm[degenerate] = 1
                push = 0.4 * (depth[:, None] + 0.1) * normal / norm  # under-relaxed: many contacts per cell
                self._apply(move, turn, i, on_i, push)
                self._apply(move, turn, j, on_j, -push)
            wall_depth = 0.0
            for tip in self.endpoints():
                below = np.maximum(y0 + CELL_RADIUS - tip[:, 1], 0)
                above = np.maximum(tip[:, 1] - (y1 - CELL_RADIUS), 0)
                hit = np.flatnonzero(below + above > 0)
                wall_push = np.stack([np.zeros(len(hit)), below[hit] - above[hit]], 1)
                self._apply(move, turn, hit, tip[hit], wall_push)
                wall_depth = max(wall_depth, float((below + above).max(initial=0)))
            self.pos += move
            self.angle += turn
            if depth.max(initial=0) < tolerance and wall_depth < tolerance:
                break
        self.pressure = np.bincount(np.concatenate([i, j]), np.concatenate([depth, depth]), minlength=len(self.pos))

    def _apply(self, move, turn, cells, contact, push):
        """Accumulate translation and rotation of a push at a contact point (rod: moment ~ length² / 12)."""
        np.add.at(move, cells, push)
        arm = contact - self.pos[cells]
        torque = arm[:, 0] * push[:, 1] - arm[:, 1] * push[:, 0]
        inertia = self.length[cells] ** 2 / 12 + CELL_RADIUS ** 2
        np.add.at(turn, cells, torque / inertia)

    def leave(self):
        x0, _, x1, _ = self.chamber
        stay = (self.pos[:, 0] >= x0) & (self.pos[:, 0] <= x1)
        for name in ("pos", "angle", "length", "growth", "divide_at", "label", "pressure"):
            setattr(self, name, getattr(self, name)[stay])


def closest_points_between_segments(p1, q1, p2, q2):
    """Closest points of segments p1-q1 and p2-q2, vectorised over rows (Ericson, Real-Time Collision Detection 5.1.9)."""
    d1, d2, r = q1 - p1, q2 - p2, p1 - p2
    a = np.maximum((d1 * d1).sum(1), 1e-12)
    e = np.maximum((d2 * d2).sum(1), 1e-12)
    b, c, f = (d1 * d2).sum(1), (d1 * r).sum(1), (d2 * r).sum(1)
    denom = a * e - b * b
    s = np.where(denom > 1e-9, np.clip((b * f - c * e) / np.where(denom > 1e-9, denom, 1), 0, 1), 0.0)
    t = (b * s + f) / e
    s = np.where(t < 0, np.clip(-c / a, 0, 1), np.where(t > 1, np.clip((b - c) / a, 0, 1), s))
    t = np.clip(t, 0, 1)
    return p1 + s[:, None] * d1, p2 + t[:, None] * d2


# -------------------------------------------------------------------------------------------------------------- rendering

def render_labels(colony: Colony, shape) -> np.ndarray:
    """Instance mask: a pixel belongs to the cell whose axis is nearest, if within the radius. Each cell is drawn in
    its bounding box only; a pixel claimed by two capsules (contact, rasterisation) goes to the nearer axis."""
    labels = np.zeros(shape, np.uint16)
    nearest = np.full(shape, np.inf, np.float32)
    starts, ends = colony.endpoints()
    for start, end, label in zip(starts, ends, colony.label):
        low = np.floor(np.minimum(start, end) - CELL_RADIUS).astype(int).clip(0, [shape[1], shape[0]])
        high = np.ceil(np.maximum(start, end) + CELL_RADIUS + 1).astype(int).clip(0, [shape[1], shape[0]])
        if (high <= low).any():
            continue
        ys, xs = np.mgrid[low[1]:high[1], low[0]:high[0]]
        direction = end - start
        along = ((xs - start[0]) * direction[0] + (ys - start[1]) * direction[1]) / max(direction @ direction, 1e-12)
        along = along.clip(0, 1)
        distance = np.hypot(xs - start[0] - along * direction[0], ys - start[1] - along * direction[1])
        window = np.s_[low[1]:high[1], low[0]:high[0]]
        claim = (distance <= CELL_RADIUS) & (distance < nearest[window])
        labels[window][claim] = label
        nearest[window][claim] = distance[claim]
    return labels


def smooth_field(rng, shape, strength, coarse=4):
    """A smooth random field around 1 (uneven illumination): a coarse random grid, cubic-interpolated."""
    grid = rng.standard_normal((coarse, coarse))
    field = ndimage.zoom(grid, (shape[0] / coarse, shape[1] / coarse), order=3, mode="nearest")[:shape[0], :shape[1]]
    return (1 + strength * field / max(np.abs(field).max(), 1e-9)).astype(np.float32)


def render_phase_contrast(labels, rng, illumination, chamber, darkness):
    """uint8 phase-contrast-like frame of a label image."""
    inside = (labels > 0).astype(np.float32)
    # boundaries between touching cells appear bright in phase contrast
    boundary = np.zeros_like(inside)
    boundary[:, 1:] += (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    boundary[1:, :] += (labels[1:, :] != labels[:-1, :]) & (labels[1:, :] > 0) & (labels[:-1, :] > 0)
    image = np.full(labels.shape, 0.5, np.float32)
    x0, y0, x1, y1 = (int(round(v)) for v in chamber)
    image[: max(y0 - 3, 0)] = image[y1 + 3:] = 0.42  # PDMS outside the chamber
    image[max(y0 - 3, 0): y0] = image[y1: y1 + 3] = 0.75  # the chamber walls
    image -= darkness[labels] * inside
    image += 0.18 * np.minimum(boundary, 1)
    halo = ndimage.gaussian_filter(inside, 3.0)
    image += 0.45 * np.clip(halo - inside, 0, None)
    image = ndimage.gaussian_filter(image, 1.0)
    image *= illumination * (1 + rng.normal(0, 0.02))
    image += rng.normal(0, 0.025, image.shape).astype(np.float32)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------------- sequences

def simulate_sequence(n_frames: int = 100, size=(256, 256), seed: int = 0):
    """Yield (uint8 frame, uint16 instance mask, colony) for each frame of one movie."""
    rng = np.random.default_rng(seed)
    height, width = size
    margin_y, margin_x = max(int(0.06 * height), 6), max(int(0.04 * width), 4)
    chamber = (margin_x, margin_y, width - margin_x, height - margin_y)
    colony = Colony(rng, chamber, n_frames, n_start=int(rng.integers(1, 4)))
    illumination = smooth_field(rng, size, strength=0.2)
    darkness = np.concatenate([[0.0], rng.uniform(0.25, 0.35, 2 ** 16 - 1)]).astype(np.float32)
    substeps = max(1, int(np.ceil(colony.rate / 0.02)))
    for frame in range(n_frames):
        if frame:
            colony.step(substeps)
        labels = render_labels(colony, size)
        yield render_phase_contrast(labels, rng, illumination, chamber, darkness), labels, colony


def write_simulated_sequence(root: str, name: str, n_frames: int, size, seed: int, with_gt: bool,
                             layout: str = "challenge") -> dict:
    counts, colony, parent_of = [], None, {}

    def frames():
        nonlocal colony
        for image, labels, colony in simulate_sequence(n_frames, size, seed):
            counts.append(len(colony.label))
            parent_of.update(colony.parent)
            yield image, labels

    if layout == "ctc":
        write_ctc_sequence(root, name, frames(), parent_of, with_gt, ctc_digits(n_frames))
    else:
        write_sequence(root, name, frames(), with_gt)
    return {"cells_first": counts[0], "cells_last": counts[-1], "divisions": colony.divisions}


def sequence_names(n_sequences: int, layout: str = "challenge") -> list[str]:
    """a, b, c, ... in the challenge layout; 01, 02, ... in the CTC layout."""
    if layout == "ctc":
        return [f"{k + 1:02d}" for k in range(n_sequences)]
    return list(string.ascii_lowercase[:n_sequences])


def write_dataset(root: str, n_sequences: int = 5, n_frames: int = 100, size=(256, 256), seed: int = 0,
                  n_without_gt: int = 2, layout: str = "challenge") -> dict:
    """Sequences a, b, c, ... in the challenge layout (01, 02, ... in the CTC layout, with tracking GT); the last
    n_without_gt have no GT (d, e by default). Sequence k has the same cells in both layouts."""
    summary = {}
    for k, name in enumerate(sequence_names(n_sequences, layout)):
        summary[name] = write_simulated_sequence(root, name, n_frames, size, seed * 1000 + k,
                                                 with_gt=k < n_sequences - n_without_gt, layout=layout)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="demo_data")
    parser.add_argument("--sequences", type=int, default=5, help="number of sequences, named a, b, c, ... (01, 02, "
                        "... in the CTC layout)")
    parser.add_argument("--layout", choices=["challenge", "ctc"], default="challenge",
                        help="challenge: a/t0000.tif, a_GT/man_seg0000.tif; ctc: 01/t000.tif, 01_GT/SEG/man_seg000.tif "
                             "and tracking GT 01_GT/TRA/man_track000.tif, man_track.txt")
    parser.add_argument("--without_gt", type=int, default=2, help="the last this many sequences get no GT (test)")
    parser.add_argument("--frames", type=int, default=100, help="frames per sequence")
    parser.add_argument("--size", type=int, nargs="+", default=[256], help="frame size: S (square) or H W")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = tuple(args.size * 2 if len(args.size) == 1 else args.size[:2])
    start = time.perf_counter()
    try:
        summary = write_dataset(args.out_dir, args.sequences, args.frames, size, args.seed, args.without_gt,
                                args.layout)
    except DataError as error:
        sys.exit(f"error: {error}")
    for name, info in summary.items():
        print(f"sequence {name}: {args.frames} frames of {size[0]} x {size[1]}, cells {info['cells_first']} -> "
              f"{info['cells_last']}, {info['divisions']} divisions")
    print(f"wrote {args.out_dir} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
