"""Training patches for microscopy: random crops of frames held in memory, with the augmentations that real movies
need, on numpy arrays. Pure numpy/scipy, no I/O, no torch.

One resampling does crop, scale, rotation and flips at once: the patch's pixel grid is mapped into the frame
(scaled, rotated about the crop centre, mirrored), the image is sampled there bilinearly (mirrored at the frame's
edges) and the instance mask by nearest neighbour. The border-core targets are computed on the resampled mask, so
the border stays 4 model pixels wide whatever the scale; pixels that fall outside the frame get IGNORE.
"""
import functools

import numpy as np
from scipy import ndimage

from border_core import border_core_targets

IGNORE = 255  # target value of pixels the loss skips (outside the frame)


def sample_grid(center, patch_size: int, scale: float = 1.0, angle: float = 0.0, flip: bool = False):
    """(rows, cols) frame coordinates of a patch_size x patch_size grid centred on `center`, zoomed by `scale` (> 1
    enlarges the cells), rotated by `angle` radians and mirrored left-right when `flip`."""
    offsets = (np.arange(patch_size) - (patch_size - 1) / 2) / scale
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    if flip:
        dx = -dx
    cos, sin = np.cos(angle), np.sin(angle)
    return center[0] + cos * dy - sin * dx, center[1] + sin * dy + cos * dx


def elastic_offsets(patch_size: int, strength: float, rng: np.random.Generator, spacing: int = 64):
    """(dy, dx), each patch_size x patch_size: a smooth random displacement of a patch's sampling grid, in patch px.
    Normal with standard deviation `strength` at control points spread evenly over the patch, at most `spacing` px
    apart (the centres of as many equal cells), cubic between them: the U-Net paper's elastic deformation for few
    annotated images. Smooth over a cell's length, it bends and stretches whole cells into shapes the frames do not
    hold, while an outline seen up close (the halo, the ramp to it) keeps its look."""
    points = -(-patch_size // spacing) + 1
    coarse = rng.normal(0.0, strength, (2, points, points))
    spread = cubic_zoom_matrix(points, patch_size)
    return tuple(spread @ c @ spread.T for c in coarse)


@functools.lru_cache(maxsize=8)
def cubic_zoom_matrix(points: int, size: int) -> np.ndarray:
    """(size, points): ndimage.zoom's cubic spline from `points` values to `size` as a matrix, so that the 2-D zoom
    of a small grid is two matrix products (separable), a few microseconds instead of milliseconds per patch."""
    unit = np.eye(points)
    return np.stack([ndimage.zoom(u, size / points, order=3, mode="nearest", grid_mode=True)[:size] for u in unit], 1)


def resample(image: np.ndarray, mask: np.ndarray, rows: np.ndarray, cols: np.ndarray):
    """Image sampled bilinearly at (rows, cols), mirrored beyond its edges; mask by nearest neighbour, 0 outside;
    and which grid points lie inside the frame. Only the window the grid covers is converted to float32 (frames are
    kept as float16): a patch costs its own size, not the frame's. The window reaches the frame's edge wherever the
    grid does, so mirroring about the window's edge is mirroring about the frame's."""
    top, left = max(int(np.floor(rows.min())) - 1, 0), max(int(np.floor(cols.min())) - 1, 0)
    bottom = min(int(np.ceil(rows.max())) + 2, image.shape[0])
    right = min(int(np.ceil(cols.max())) + 2, image.shape[1])
    window = image[top:bottom, left:right].astype(np.float32)
    patch = ndimage.map_coordinates(window, [rows - top, cols - left], order=1, mode="mirror")
    r, c = np.rint(rows).astype(np.int64), np.rint(cols).astype(np.int64)
    inside = (r >= 0) & (r < mask.shape[0]) & (c >= 0) & (c < mask.shape[1])
    labels = np.where(inside, mask[np.clip(r, 0, mask.shape[0] - 1), np.clip(c, 0, mask.shape[1] - 1)], 0)
    return patch, labels, inside


def random_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, contrast, brightness, defocus blur and noise on a 0..255 image: the ways one microscope's frames differ
    from another's. Each is applied with its own probability, so plain frames stay common."""
    x = image / 255.0
    if rng.random() < 0.5:
        x = np.clip(x, 0, None) ** np.exp(rng.uniform(np.log(0.7), np.log(1.5)))
    if rng.random() < 0.5:
        mean = x.mean()
        x = (x - mean) * rng.uniform(0.7, 1.3) + mean
    if rng.random() < 0.5:
        x = x + rng.uniform(-0.15, 0.15)
    if rng.random() < 0.25:
        x = ndimage.gaussian_filter(x, rng.uniform(0.3, 1.2))
    if rng.random() < 0.25:
        x = x + rng.normal(0, rng.uniform(0.005, 0.04), x.shape)
    return (np.clip(x, -0.5, 1.5) * 255.0).astype(np.float32)


def random_patch(image: np.ndarray, mask: np.ndarray, patch_size: int, rng: np.random.Generator,
                 foreground=None, augment: bool = True, scale_range=(0.7, 1.4), foreground_bias: float = 0.8,
                 intensity: bool = True, turn: bool = True, elastic: float = 0.0):
    """One training sample: (image patch float32 on the 0..255 scale, border-core targets uint8 with IGNORE outside
    the frame, the instance labels the targets were made from).

    The centre is a random foreground pixel with probability `foreground_bias` (cells are often a small part of a
    real frame; `foreground` is an (N, 2) array of candidate pixels, e.g. from `foreground_pixels`), else anywhere.
    With `augment`: scale log-uniform in `scale_range`, any rotation and a mirror half of the time (unless `turn` is
    False: data whose masks sit at a fixed sub-pixel offset from the cells, as when they were drawn on another
    channel, or whose look has a direction; turned, that offset points every way and cannot be learnt), and
    `random_intensity` (unless `intensity` is False), and with `elastic` > 0 an elastic deformation of about that
    many patch px (`elastic_offsets`). Without it the patch is an axis-aligned crop at scale 1.
    """
    height, width = mask.shape
    if foreground is not None and len(foreground) and rng.random() < foreground_bias:
        center = foreground[rng.integers(len(foreground))].astype(np.float64)
    else:
        center = np.array([rng.uniform(0, height - 1), rng.uniform(0, width - 1)])
    scale, angle, flip = 1.0, 0.0, False
    if augment:
        scale = float(np.exp(rng.uniform(*np.log(scale_range))))
        if turn:
            angle, flip = rng.uniform(0, 2 * np.pi), bool(rng.random() < 0.5)
    # keep the crop inside the frame where the frame is large enough, so that little of a patch is padding
    half = (patch_size - 1) / 2 / scale
    for axis, size in enumerate((height, width)):
        center[axis] = np.clip(center[axis], half, size - 1 - half) if size - 1 >= 2 * half else (size - 1) / 2
    rows, cols = sample_grid(center, patch_size, scale, angle, flip)
    if augment and elastic > 0:  # drawn last, so that a run without it samples as before
        dy, dx = elastic_offsets(patch_size, elastic, rng)
        rows, cols = rows + dy / scale, cols + dx / scale
    patch, labels, inside = resample(image, mask, rows, cols)
    targets = border_core_targets(labels)
    targets[~inside] = IGNORE
    if augment and intensity:
        patch = random_intensity(patch, rng)
    return patch, targets, labels


def foreground_pixels(mask: np.ndarray, stride: int = 4) -> np.ndarray:
    """(N, 2) int32 coordinates of foreground pixels on a stride x stride grid: candidate patch centres, small enough
    to keep for every frame in memory."""
    rows, cols = np.nonzero(mask[::stride, ::stride])
    return (np.stack([rows, cols], 1) * stride).astype(np.int32)
