"""Simulated time-lapse phase-contrast movies of growing bacterial microcolonies, with instance masks.

    python simulate.py --out_dir demo_data                                  # the challenge layout: a..c with GT, d, e without
    python simulate.py --out_dir sim --frames 800 --size 512 --sequences 5 --seed 1
    python simulate.py --out_dir sim --randomise --sequences 8 --frames 30 --size 256  # a look and geometry each
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

With --randomise (or simulate_sequence(..., look=Look(...), geometry=Geometry(...)) from a training script) each
sequence draws its own look and geometry from its seed, for a generalist model: cell width and length, phase contrast
or brightfield, halo, defocus, illumination, flicker, noise, debris, out-of-focus particles, camera bit depth and
offset; a chamber, mother-machine-like channels or an agar pad. docs/simulation.md lists the ranges and says why.
Without it the output is the fixed look above, byte for byte as before the randomisation existed.

Same seed, same bytes. The physics is vectorised over pairs of neighbouring cells, rendering loops over cells only
(each in its bounding box); nothing loops over pixels.
"""
import argparse
import string
import sys
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from cli_types import HelpFormatter, Renamed, non_negative_int, positive_int
from data_files import MAX_PIXELS, DataError, ctc_digits, error_line, write_ctc_sequence, write_sequence

CELL_RADIUS = 6.0  # px: cells 12 px wide, like C. glutamicum at 0.072 µm/px
DIVISION_LENGTH = 50.0  # px, tip to tip, mean of the per-cell threshold
DIVISION_SPREAD = 0.1  # relative spread of that threshold and of the growth rate
FILL_FRACTION = 0.85  # share of the movie after which the chamber is full
PACKING = 0.8  # cell area / chamber area aimed at
PRESSURE_SCALE = 2.0  # px of summed overlap depth that halves a cell's growth
LANE_ALIGNMENT = 0.05  # rad per relaxation step (at 45°) by which a channel turns its cells along itself


# ---------------------------------------------------------------------------------------------------------------- physics

class Colony:
    """Cells as capsules: centre (x, y), axis angle, segment length (tip to tip minus 2 r), growth rate per frame,
    division length, label. All arrays of one entry per cell; `parent` maps each daughter's label to its mother's."""

    def __init__(self, rng: np.random.Generator, chamber, n_frames: int, n_start: int = 1,
                 radius: float = CELL_RADIUS, division_length: float = DIVISION_LENGTH,
                 growth_spread: float = DIVISION_SPREAD, division_spread: float = DIVISION_SPREAD,
                 closed=("top", "bottom"), lanes=None, fill_area=None, founders=None):
        """`closed`: which of the chamber's top and bottom are walls; open sides let cells out. `lanes`: (n, 2) x
        ranges of narrow channels that confine the cells sideways (mother machine); without lanes the left and right
        sides are open. `fill_area`: cell area aimed at after FILL_FRACTION of the movie (default: PACKING of the
        chamber). `founders`: (positions, angles) of the first cells instead of a few near the centre."""
        self.rng, self.chamber = rng, chamber  # chamber = (x0, y0, x1, y1)
        self.radius, self.division_length = float(radius), float(division_length)
        self.growth_spread, self.division_spread = growth_spread, division_spread
        self.closed, self.lanes = tuple(closed), None if lanes is None else np.asarray(lanes, float).reshape(-1, 2)
        self.pressure_scale = PRESSURE_SCALE * self.radius / CELL_RADIUS  # overlap depth scales with the cells
        radius = self.radius
        x0, y0, x1, y1 = chamber
        cell_area = (0.75 * self.division_length - 2 * radius) * 2 * radius + np.pi * radius ** 2
        fill_area = PACKING * (x1 - x0) * (y1 - y0) if fill_area is None else fill_area
        target_cells = fill_area / cell_area
        self.rate = np.log(max(target_cells / n_start, 2.0)) / (FILL_FRACTION * max(n_frames - 1, 1))
        centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        self.pos = centre + rng.normal(0, 2 * radius, (n_start, 2))
        self.angle = rng.uniform(0, np.pi, n_start)
        if founders is not None:
            self.pos, self.angle = (np.array(v, float) for v in founders)
        self.length = rng.uniform(0.5, 0.9, n_start) * self.division_length - 2 * radius
        self.growth = self._draw_rates(n_start)
        self.divide_at = self._draw_division_lengths(n_start)
        self.label = np.arange(1, n_start + 1)
        self.next_label = n_start + 1
        self.divisions = 0
        self.parent = {}
        self.pressure = np.zeros(n_start)
        self.relax()

    def _draw_rates(self, n):
        return self.rate * (1 + self.growth_spread * self.rng.standard_normal(n)).clip(0.5, 1.5)

    def _draw_division_lengths(self, n):
        length = self.division_length * (1 + self.division_spread * self.rng.standard_normal(n)).clip(0.7, 1.3)
        return np.maximum(length, 4.4 * self.radius)  # short cells: each daughter keeps a segment between its caps

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
            inhibition = 1 / (1 + self.pressure / self.pressure_scale)
            total = (self.length + 2 * self.radius) * np.exp(self.growth * inhibition / substeps)
            if self.lanes is not None:
                self._flow_along_lanes(total - 2 * self.radius - self.length)
            self.length = total - 2 * self.radius
            self.divide()
            self.relax()
            self.leave()

    def divide(self):
        dividing = self.length + 2 * self.radius >= self.divide_at
        if not dividing.any():
            return
        parents = np.flatnonzero(dividing)
        n = len(parents)
        total = self.length[parents] + 2 * self.radius
        offset = (total / 4)[:, None] * self.axis[parents]
        jitter = self.rng.normal(0, 0.05, (2, n))
        self.pos = np.concatenate([np.delete(self.pos, parents, 0), self.pos[parents] - offset,
                                   self.pos[parents] + offset])
        self.angle = np.concatenate([np.delete(self.angle, parents), self.angle[parents] + jitter[0],
                                     self.angle[parents] + jitter[1]])
        daughter_length = np.tile(total / 2 - 2 * self.radius, 2)
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

    def neighbour_pairs(self, margin: float = None):
        """Pairs of cells whose centres are close enough to touch, with room for the moves of one relaxation."""
        margin = 2 * self.radius if margin is None else margin
        reach = float(self.length.max(initial=0) + 2 * self.radius + margin)
        return cKDTree(self.pos).query_pairs(reach, output_type="ndarray").reshape(-1, 2)

    def overlaps(self, pairs=None):
        """Touching pairs among `pairs` (default: all neighbours): indices i, j, contact points on each axis, and
        overlap depth (2 r minus the distance of the axes)."""
        pairs = self.neighbour_pairs(0) if pairs is None else pairs
        i, j = pairs[:, 0], pairs[:, 1]
        a, b = self.endpoints()
        on_i, on_j = closest_points_between_segments(a[i], b[i], a[j], b[j])
        depth = 2 * self.radius - np.linalg.norm(on_i - on_j, axis=1)
        touching = depth > 0
        return i[touching], j[touching], on_i[touching], on_j[touching], depth[touching]

    def relax(self, max_iterations: int = None, tolerance: float = 0.5):
        """Push overlapping cells apart along the contact normal and turn them by the torque of that push; keep the
        tips inside the chamber's top and bottom walls. Iterates until no overlap is deeper than `tolerance` px."""
        # a column of cells in a channel passes a push on one cell per step: it needs more steps than a chamber
        max_iterations = max_iterations or (30 if self.lanes is None else 120)
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
                if self.lanes is not None:  # no room sideways in a channel: crossing cells are pushed along it
                    crossing = degenerate | (depth > self.radius)
                    below = np.where(self.pos[i[crossing], 1] >= self.pos[j[crossing], 1], 1.0, -1.0)
                    normal[crossing] = np.stack([np.zeros_like(below), below], 1)
                    norm[crossing] = 1
                norm[degenerate] = 1
                push = 0.4 * (depth[:, None] + 0.1) * normal / norm  # under-relaxed: many contacts per cell
                self._apply(move, turn, i, on_i, push)
                self._apply(move, turn, j, on_j, -push)
            wall_depth = 0.0
            for tip in self.endpoints():
                below, above, left, right = self._wall_depths(tip)
                hit = np.flatnonzero(below + above + left + right > 0)
                wall_push = np.stack([left[hit] - right[hit], below[hit] - above[hit]], 1)
                self._apply(move, turn, hit, tip[hit], wall_push)
                wall_depth = max(wall_depth, float((below + above + left + right).max(initial=0)))
            if self.lanes is not None:  # the walls (and the flow of medium) turn cells along the channel
                turn -= LANE_ALIGNMENT * np.sin(2 * self.angle - np.pi)
            self.pos += move
            self.angle += turn
            if depth.max(initial=0) < tolerance and wall_depth < tolerance:
                break
        self.pressure = np.bincount(np.concatenate([i, j]), np.concatenate([depth, depth]), minlength=len(self.pos))

    def _lane(self):
        """Index of the lane each cell is in: the one whose range is nearest to its centre."""
        return np.searchsorted((self.lanes[:-1, 1] + self.lanes[1:, 0]) / 2, self.pos[:, 0])

    def _flow_along_lanes(self, growth):
        """In a channel closed at the top, a cell's growth pushes every cell below it towards the exit. Move them
        at once (shared between the columns of cells that fit side by side), so that relaxation only settles the
        rest: a long column would pass the push on one cell per relaxation step, and jam."""
        if not len(self.pos):  # every cell has left the channels
            return
        lane = self._lane()
        along = growth * np.abs(np.sin(self.angle))
        order = np.lexsort((self.pos[:, 1], lane))
        pushed = np.cumsum(along[order])
        lane_sorted = lane[order]
        first = np.flatnonzero(np.r_[True, lane_sorted[1:] != lane_sorted[:-1]])
        before = (pushed - along[order]) - np.repeat((pushed - along[order])[first], np.diff(np.r_[first, len(order)]))
        columns = np.maximum((self.lanes[:, 1] - self.lanes[:, 0]) / (2 * self.radius), 1)
        shift = np.empty(len(order))
        shift[order] = (before + 0.5 * along[order]) / columns[lane_sorted]
        self.pos[:, 1] += shift

    def _wall_depths(self, tip):
        """How far each cell's tip reaches into the top, bottom, left and right walls (0 where open or clear)."""
        _, y0, _, y1 = self.chamber
        none = np.zeros(len(tip))
        below = np.maximum(y0 + self.radius - tip[:, 1], 0) if "top" in self.closed else none
        above = np.maximum(tip[:, 1] - (y1 - self.radius), 0) if "bottom" in self.closed else none
        if self.lanes is None:
            return below, above, none, none
        lane = self._lane()  # a cell stays in the lane it is in
        left = np.maximum(self.lanes[lane, 0] + self.radius - tip[:, 0], 0)
        right = np.maximum(tip[:, 0] - (self.lanes[lane, 1] - self.radius), 0)
        return below, above, left, right

    def _apply(self, move, turn, cells, contact, push):
        """Accumulate translation and rotation of a push at a contact point (rod: moment ~ length² / 12)."""
        np.add.at(move, cells, push)
        arm = contact - self.pos[cells]
        torque = arm[:, 0] * push[:, 1] - arm[:, 1] * push[:, 0]
        inertia = self.length[cells] ** 2 / 12 + self.radius ** 2
        np.add.at(turn, cells, torque / inertia)

    def leave(self):
        """Drop cells whose centre crossed an open side: the chamber's left and right unless lanes confine the
        cells, its top or bottom unless closed."""
        x0, y0, x1, y1 = self.chamber
        stay = np.ones(len(self.pos), bool)
        if self.lanes is None:
            stay = (self.pos[:, 0] >= x0) & (self.pos[:, 0] <= x1)
        if "top" not in self.closed:
            stay &= self.pos[:, 1] >= y0
        if "bottom" not in self.closed:
            stay &= self.pos[:, 1] <= y1
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
        low = np.floor(np.minimum(start, end) - colony.radius).astype(int).clip(0, [shape[1], shape[0]])
        high = np.ceil(np.maximum(start, end) + colony.radius + 1).astype(int).clip(0, [shape[1], shape[0]])
        if (high <= low).any():
            continue
        ys, xs = np.mgrid[low[1]:high[1], low[0]:high[0]]
        direction = end - start
        along = ((xs - start[0]) * direction[0] + (ys - start[1]) * direction[1]) / max(direction @ direction, 1e-12)
        along = along.clip(0, 1)
        distance = np.hypot(xs - start[0] - along * direction[0], ys - start[1] - along * direction[1])
        window = np.s_[low[1]:high[1], low[0]:high[0]]
        claim = (distance <= colony.radius) & (distance < nearest[window])
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


# ------------------------------------------------------------------------------------------------ randomised look and geometry

GEOMETRIES = ("chamber", "channel", "agar")
MODALITIES = ("phase", "brightfield")


@dataclass
class Geometry:
    """Where and how the cells grow. Lengths in px or in cell widths, as named.

    chamber: a monolayer chamber closed at the top and bottom, open at the left and right (as the default movies);
    channel: mother-machine-like narrow channels side by side, closed at the top, open at the bottom into a trench;
    agar: no walls, the colony grows freely from the centre of the field of view."""
    kind: str = "chamber"
    cell_width: float = 2 * CELL_RADIUS  # px: the pixel scale, in effect
    division_widths: float = DIVISION_LENGTH / (2 * CELL_RADIUS)  # mean tip-to-tip length at division, in widths
    growth_spread: float = DIVISION_SPREAD  # relative spread of the growth rate between cells
    division_spread: float = DIVISION_SPREAD  # relative spread of the division length
    founders: int = 0  # chamber and agar: cells at the start (0: one to three, drawn); channel: one per channel
    margin: float = 0.06  # chamber: PDMS above and below, channel: PDMS above and trench below, share of the height
    channel_widths: float = 1.3  # channel: inner width, in cell widths (below 2: a single file of cells)
    wall_widths: float = 1.0  # channel: PDMS between neighbouring channels, in cell widths
    coverage: float = 0.6  # agar: share of the frame the colony would cover at FILL_FRACTION of the movie, unslowed

    def __post_init__(self):
        if self.kind not in GEOMETRIES:
            raise ValueError(f"geometry kind {self.kind!r} is not one of {', '.join(GEOMETRIES)}")
        if self.cell_width <= 0 or self.division_widths < 2 or self.channel_widths < 1.05:
            raise ValueError(f"impossible geometry {self}")

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Geometry":
        return cls(kind=str(rng.choice(GEOMETRIES, p=[0.4, 0.25, 0.35])),
                   cell_width=float(np.exp(rng.uniform(np.log(6), np.log(20)))),
                   division_widths=float(rng.uniform(2.5, 6)),
                   growth_spread=float(rng.uniform(0.03, 0.25)),
                   division_spread=float(rng.uniform(0.05, 0.15)),
                   margin=float(rng.uniform(0.03, 0.15)),
                   channel_widths=float(rng.choice([rng.uniform(1.15, 1.6), rng.uniform(2.2, 3.2)])),  # no jam at 2
                   wall_widths=float(rng.uniform(0.5, 2.5)),
                   coverage=float(rng.uniform(0.15, 0.7)))


@dataclass
class Look:
    """How the microscope and camera show the cells. Intensities are relative to the background (1), before
    illumination, noise and the camera's offset and gain; lengths in px.

    phase: dark cells (cell_contrast < 0) with bright lines between touching cells and a bright halo around them;
    brightfield: cells a little darker or brighter than the background, with a rim (`halo`) that is bright or dark
    depending on the side of focus."""
    modality: str = "phase"
    cell_contrast: float = -0.6  # cell interior minus background; its sign says dark or bright cells
    contrast_spread: float = 0.15  # relative spread of the contrast between cells
    boundary: float = 0.36  # brightness of the line between touching cells
    halo: float = 0.9  # strength of the halo (phase, >= 0) or rim (brightfield, either sign) just outside the cells
    halo_width: float = 3.0  # px, Gaussian sigma of the halo
    blur: float = 1.0  # px, Gaussian sigma of the defocus
    illumination: float = 0.2  # strength of the uneven illumination (multiplicative, smooth)
    illumination_scale: int = 4  # coarse grid of that field: more cells, finer variation
    flicker: float = 0.02  # relative sd of the frame-to-frame brightness
    noise: float = 0.05  # Gaussian read noise, sd relative to the background
    photons: float = np.inf  # photons per pixel at background level (shot noise); inf: none
    debris: int = 0  # small dark or bright specks on the glass, not in the mask
    debris_size: float = 1.5  # px, their mean Gaussian sigma
    blobs: int = 0  # out-of-focus particles: rings with a dark or bright core, not in the mask
    blob_size: float = 8.0  # px, their mean ring radius
    pdms: float = -0.16  # PDMS outside the chamber or channels, relative to the background
    wall: float = 0.5  # brightness of the PDMS edges (phase: bright; brightfield: often dark)
    dtype: str = "uint8"
    offset: float = 0.0  # camera counts at zero light
    background: float = 127.5  # camera counts of the background

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality {self.modality!r} is not one of {', '.join(MODALITIES)}")
        if self.dtype not in ("uint8", "uint16"):
            raise ValueError(f"dtype {self.dtype!r} is not uint8 or uint16")

    @classmethod
    def random(cls, rng: np.random.Generator, scale: float = 1.0) -> "Look":
        """A random look; `scale` (cell width / 12 px) scales the optical lengths with the pixel size."""
        phase = rng.random() < 0.65
        if phase:
            cell_contrast = -rng.uniform(0.25, 0.75)
            halo = 0.0 if rng.random() < 0.2 else rng.uniform(0.2, 1.2)
            boundary = rng.uniform(0.0, 0.4)
            wall = rng.uniform(0.1, 0.6)
        else:  # low contrast either way; the rim's sign follows the side of focus, independent of the cells'
            cell_contrast = rng.choice([-1, 1]) * rng.uniform(0.08, 0.25)
            halo = rng.choice([-1, 1]) * rng.uniform(0.05, 0.4)
            boundary = rng.uniform(-0.1, 0.1)
            wall = rng.uniform(-0.4, 0.2)
        if rng.random() < 0.5:
            dtype, full = "uint8", 255
        else:
            dtype, full = "uint16", 2 ** int(rng.choice([12, 14, 16])) - 1
        offset = rng.uniform(0, 0.12) * full
        # the noise is drawn relative to the cells' contrast (signal-to-noise 3 to 20), so that cells stay visible
        noise = abs(cell_contrast) * rng.uniform(0.05, 0.33)
        shot = 0.0 if rng.random() < 0.3 else rng.uniform(0.3, 1.0)  # share of the noise that is shot noise
        return cls(modality="phase" if phase else "brightfield",
                   cell_contrast=float(cell_contrast),
                   contrast_spread=float(rng.uniform(0, 0.3)),
                   boundary=float(boundary),
                   halo=float(halo),
                   halo_width=float(scale * rng.uniform(1.5, 5)),
                   blur=float(scale * rng.uniform(0.4, 2.2)),
                   illumination=float(rng.uniform(0, 0.3)),
                   illumination_scale=int(rng.integers(2, 6)),
                   flicker=float(rng.uniform(0, 0.05)),
                   noise=float(noise * np.sqrt(1 - shot ** 2)),
                   photons=float(1 / (shot * noise) ** 2) if shot else np.inf,
                   debris=int(rng.poisson(rng.uniform(0, 15))),
                   debris_size=float(scale * rng.uniform(0.7, 2.5)),
                   blobs=int(rng.poisson(0.7)),
                   blob_size=float(scale * rng.uniform(5, 15)),
                   pdms=float(rng.uniform(-0.3, 0.1)),
                   wall=float(wall),
                   dtype=dtype,
                   offset=float(offset),
                   background=float(rng.uniform(0.25, 0.55) * (full - offset)))


def random_setup(rng: np.random.Generator):
    """A random (Look, Geometry) pair; the optics scale with the cell width, as both follow the pixel size."""
    geometry = Geometry.random(rng)
    return Look.random(rng, scale=geometry.cell_width / (2 * CELL_RADIUS)), geometry


def layout(geometry: Geometry, size, n_frames: int, rng: np.random.Generator):
    """The colony in its walls, and the PDMS as a boolean image (True where there is no room for cells)."""
    height, width = size
    radius = geometry.cell_width / 2
    division_length = geometry.division_widths * geometry.cell_width
    options = dict(radius=radius, division_length=division_length, growth_spread=geometry.growth_spread,
                   division_spread=geometry.division_spread)
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    founders = geometry.founders or int(rng.integers(1, 4))
    if geometry.kind == "chamber":
        margin_y, margin_x = max(int(geometry.margin * height), 4), max(int(0.04 * width), 4)
        chamber = (margin_x, margin_y, width - margin_x, height - margin_y)
        colony = Colony(rng, chamber, n_frames, founders, **options)
        pdms = np.broadcast_to((rows < chamber[1]) | (rows >= chamber[3]), size).copy()
    elif geometry.kind == "channel":
        channel, wall = geometry.channel_widths * geometry.cell_width, geometry.wall_widths * geometry.cell_width
        count = max(int((width - wall) // (channel + wall)), 1)
        first = (width - count * channel - (count - 1) * wall) / 2
        lanes = first + np.arange(count)[:, None] * (channel + wall) + np.array([0, channel])
        top = max(int(geometry.margin * height), 4)
        bottom = height - int(rng.uniform(0, 0.6) * geometry.margin * height)  # the trench, sometimes out of view
        chamber = (0, top, width, bottom)
        # one mother cell per channel at its closed end, along the channel
        founder_pos = np.stack([lanes.mean(1) + rng.normal(0, 0.05 * radius, count),
                                top + rng.uniform(0.4, 1.2, count) * division_length], 1)
        founder_angle = np.pi / 2 + rng.normal(0, 0.05, count)
        colony = Colony(rng, chamber, n_frames, count, closed=("top",), lanes=lanes,
                        fill_area=PACKING * channel * count * (bottom - top), founders=(founder_pos, founder_angle),
                        **options)
        in_lane = ((cols >= lanes[:, :1, None]) & (cols < lanes[:, 1:, None])).any(0)
        pdms = (rows < top) | ((rows < bottom) & ~in_lane)
    else:  # agar: no walls; cells that drift far out of view are dropped
        pdms = np.zeros(size, bool)
        reach = 2 * division_length
        chamber = (-reach, -reach, width + reach, height + reach)
        colony = Colony(rng, chamber, n_frames, founders, closed=(),
                        fill_area=geometry.coverage * height * width, **options)
    return colony, pdms


def blob_image(shape, centres, radii, profile):
    """Sum of radial profiles profile(distance, radius, k) around centres, each drawn in its bounding box."""
    image = np.zeros(shape, np.float32)
    for k, ((y, x), radius) in enumerate(zip(centres, radii)):
        reach = int(np.ceil(3 * radius)) + 1
        y_lo, y_hi = max(int(y) - reach, 0), min(int(y) + reach + 1, shape[0])
        x_lo, x_hi = max(int(x) - reach, 0), min(int(x) + reach + 1, shape[1])
        if y_hi <= y_lo or x_hi <= x_lo:
            continue
        ys, xs = np.mgrid[y_lo:y_hi, x_lo:x_hi]
        image[y_lo:y_hi, x_lo:x_hi] += profile(np.hypot(ys - y, xs - x), radius, k)
    return image


def static_scene(rng, look: Look, pdms: np.ndarray) -> np.ndarray:
    """What does not move, relative to the background: PDMS with bright or dark edges, debris, out-of-focus
    particles. Cells hide it where they lie on it."""
    shape = pdms.shape
    edge = ndimage.binary_dilation(pdms, iterations=2) & ~ndimage.binary_erosion(pdms, iterations=1, border_value=1)
    scene = look.pdms * pdms + look.wall * edge
    size = np.array(shape)
    centres = rng.uniform(0, 1, (look.debris, 2)) * size
    sigmas = look.debris_size * rng.uniform(0.5, 1.5, look.debris)
    amplitudes = rng.choice([-1, 1], look.debris) * rng.uniform(0.15, 0.6, look.debris)
    scene += blob_image(shape, centres, sigmas,
                        lambda d, s, k: amplitudes[k] * np.exp(-0.5 * (d / s) ** 2))
    centres = rng.uniform(0, 1, (look.blobs, 2)) * size
    radii = look.blob_size * rng.uniform(0.6, 1.4, look.blobs)
    rings = rng.uniform(0.1, 0.4, look.blobs) * rng.choice([-1, 1], look.blobs)
    cores = rng.uniform(0.1, 0.4, look.blobs) * rng.choice([-1, 1], look.blobs)
    scene += blob_image(shape, centres, radii,
                        lambda d, r, k: rings[k] * np.exp(-0.5 * ((d - r) / (0.25 * r)) ** 2)
                        + cores[k] * np.exp(-0.5 * (d / (0.5 * r)) ** 2))
    return scene.astype(np.float32)


def render_randomised(labels, rng, look: Look, illumination, scene, contrast):
    """One frame of a label image in the given look: cells over the static scene, halo or rim, defocus,
    illumination and flicker, shot and read noise, then the camera's offset, gain and bit depth."""
    inside = (labels > 0).astype(np.float32)
    boundary = np.zeros_like(inside)
    boundary[:, 1:] += (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    boundary[1:, :] += (labels[1:, :] != labels[:-1, :]) & (labels[1:, :] > 0) & (labels[:-1, :] > 0)
    image = 1 + scene * (1 - inside) + contrast[labels] + look.boundary * np.minimum(boundary, 1)
    if look.halo:
        image += look.halo * np.clip(ndimage.gaussian_filter(inside, look.halo_width) - inside, 0, None)
    image = ndimage.gaussian_filter(image, look.blur) * illumination * (1 + rng.normal(0, look.flicker))
    if np.isfinite(look.photons):
        image = rng.poisson(np.clip(image, 0, None) * look.photons).astype(np.float32) / look.photons
    image += rng.normal(0, look.noise, image.shape).astype(np.float32)
    counts = look.offset + look.background * image
    return np.clip(np.rint(counts), 0, np.iinfo(look.dtype).max).astype(look.dtype)


# ------------------------------------------------------------------------------------------------------------- sequences

def simulate_sequence(n_frames: int = 100, size=(256, 256), seed: int = 0, look: Look = None,
                      geometry: Geometry = None, randomise: bool = False):
    """Yield (frame, uint16 instance mask, colony) for each frame of one movie. Without look and geometry: the
    original fixed look in a chamber (uint8 frames, same bytes as ever). `randomise`: look and geometry drawn from
    the seed; a given look or geometry is used as is (the other one defaults to its dataclass defaults)."""
    rng = np.random.default_rng(seed)
    if randomise or look is not None or geometry is not None:
        drawn_look, drawn_geometry = random_setup(rng) if randomise else (Look(), Geometry())
        yield from simulate_randomised(n_frames, size, rng, look or drawn_look, geometry or drawn_geometry)
        return
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


def simulate_randomised(n_frames: int, size, rng: np.random.Generator, look: Look, geometry: Geometry):
    """simulate_sequence for a given look and geometry."""
    colony, pdms = layout(geometry, size, n_frames, rng)
    colony.look, colony.geometry, colony.pdms = look, geometry, pdms  # what was drawn, for callers and tests
    illumination = smooth_field(rng, size, look.illumination, coarse=look.illumination_scale)
    scene = static_scene(rng, look, pdms)
    spread = look.contrast_spread * rng.uniform(-1, 1, 2 ** 16 - 1)
    contrast = np.concatenate([[0.0], look.cell_contrast * (1 + spread)]).astype(np.float32)
    substeps = max(1, int(np.ceil(colony.rate / 0.02)))
    for frame in range(n_frames):
        if frame:
            colony.step(substeps)
        labels = render_labels(colony, size)
        yield render_randomised(labels, rng, look, illumination, scene, contrast), labels, colony


def write_simulated_sequence(root: str, name: str, n_frames: int, size, seed: int, with_gt: bool,
                             randomise: bool = False, layout: str = "challenge") -> dict:
    counts, colony, parent_of = [], None, {}

    def frames():
        nonlocal colony
        for image, labels, colony in simulate_sequence(n_frames, size, seed, randomise=randomise):
            counts.append(len(colony.label))
            parent_of.update(colony.parent)
            yield image, labels

    if layout == "ctc":
        write_ctc_sequence(root, name, frames(), parent_of, with_gt, ctc_digits(n_frames))
    else:
        write_sequence(root, name, frames(), with_gt)
    summary = {"cells_first": counts[0], "cells_last": counts[-1], "divisions": colony.divisions}
    if randomise:
        summary["look"], summary["geometry"] = colony.look, colony.geometry
    return summary


def sequence_names(n_sequences: int, layout: str = "challenge") -> list[str]:
    """a, b, c, ..., z, then aa, ab, ... (as spreadsheet columns) in the challenge layout; 01, 02, ... in the CTC
    layout."""
    if layout == "ctc":
        return [f"{k + 1:02d}" for k in range(n_sequences)]
    names = []
    for k in range(n_sequences):
        name, k = "", k + 1
        while k:
            k, letter = divmod(k - 1, 26)
            name = string.ascii_lowercase[letter] + name
        names.append(name)
    return names


def write_dataset(root: str, n_sequences: int = 5, n_frames: int = 100, size=(256, 256), seed: int = 0,
                  n_without_gt: int = 2, randomise: bool = False, layout: str = "challenge") -> dict:
    """Sequences a, b, c, ... in the challenge layout (01, 02, ... in the CTC layout, with tracking GT); the last
    n_without_gt have no GT (d, e by default). Sequence k has the same cells in both layouts."""
    summary = {}
    for k, name in enumerate(sequence_names(n_sequences, layout)):
        summary[name] = write_simulated_sequence(root, name, n_frames, size, seed * 1000 + k,
                                                 with_gt=k < n_sequences - n_without_gt, randomise=randomise,
                                                 layout=layout)
    return summary


def describe(info: dict) -> str:
    look, geometry = info["look"], info["geometry"]
    return (f"; {geometry.kind}, cells {geometry.cell_width:.1f} px wide, {look.modality} with "
            f"{'dark' if look.cell_contrast < 0 else 'bright'} cells, {look.dtype}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--root_dir", "--out_dir", dest="out_dir", default="demo_data", help="data root to write")
    parser.add_argument("--num_sequences", "--sequences", dest="sequences", action=Renamed, type=positive_int, default=5,
                        help="number of sequences, named a, b, c, ..., z, aa, ab, ... (01, 02, ... in the CTC layout)")
    parser.add_argument("--layout", choices=["challenge", "ctc"], default="challenge",
                        help="challenge: a/t0000.tif, a_GT/man_seg0000.tif; ctc: 01/t000.tif, 01_GT/SEG/man_seg000.tif "
                             "and tracking GT 01_GT/TRA/man_track000.tif, man_track.txt")
    parser.add_argument("--without_gt", type=non_negative_int, default=2,
                        help="the last this many sequences get no GT (test)")
    parser.add_argument("--num_frames", "--frames", dest="frames", action=Renamed, type=positive_int, default=100,
                        help="frames per sequence")
    parser.add_argument("--size", type=positive_int, nargs="+", default=[256], help="frame size: S (square) or H W")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="sequence k is simulated from seed * 1000 + k")
    parser.add_argument("--randomise", action="store_true",
                        help="draw a look (phase contrast or brightfield, optics, noise, camera) and a geometry (cell "
                             "size, chamber, channels or agar pad) per sequence from its seed; see docs/simulation.md")
    args = parser.parse_args(argv)
    if len(args.size) > 2:
        parser.error(f"argument --size: one size S or two sizes H W, got {len(args.size)} values")
    size = tuple(args.size * 2 if len(args.size) == 1 else args.size)
    if size[0] * size[1] > MAX_PIXELS:
        parser.error(f"argument --size: {size[0]} x {size[1]} is more than {MAX_PIXELS} pixels a frame, more than the "
                     "scripts read")
    if args.without_gt > args.sequences:
        parser.error(f"argument --without_gt: {args.without_gt} is more than the {args.sequences} sequence(s)")
    start = time.perf_counter()
    try:
        summary = write_dataset(args.out_dir, args.sequences, args.frames, size, args.seed, args.without_gt,
                                args.randomise, args.layout)
    except (DataError, OSError) as error:
        sys.exit(error_line(error))
    for name, info in summary.items():
        print(f"sequence {name}: {args.frames} frames of {size[0]} x {size[1]}, cells {info['cells_first']} -> "
              f"{info['cells_last']}, {info['divisions']} divisions" + (describe(info) if "look" in info else ""))
    print(f"wrote {args.out_dir} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
