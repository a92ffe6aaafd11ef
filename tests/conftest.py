"""Shared test helpers: tiny data roots written by the tests themselves."""
import os

import numpy as np
import tifffile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_REAL = os.path.join(ROOT, "..", "shared", "real")


def blob_frame(rng, shape=(60, 76), n_cells=6):
    """A label image of non-overlapping axis-aligned ellipses and a uint8 image with dark cells on grey."""
    labels = np.zeros(shape, np.uint16)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    label = 0
    for _ in range(n_cells * 4):
        if label == n_cells:
            break
        cy, cx = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)
        ry, rx = rng.integers(4, 8), rng.integers(6, 12)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        grown = ((yy - cy) / (ry + 2)) ** 2 + ((xx - cx) / (rx + 2)) ** 2 <= 1
        if (labels[grown] == 0).all():
            label += 1
            labels[inside] = label
    image = np.where(labels > 0, 60, 170) + rng.normal(0, 10, shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


def write_dataset(root, sequences=("a", "b", "c"), unlabelled=("d",), frames=4, shape=(60, 76), layout="challenge",
                  seed=0):
    rng = np.random.default_rng(seed)
    for seq in list(sequences) + list(unlabelled):
        os.makedirs(os.path.join(root, seq), exist_ok=True)
        gt = os.path.join(root, f"{seq}_GT", "SEG") if layout == "ctc" else os.path.join(root, f"{seq}_GT")
        if seq in sequences:
            os.makedirs(gt, exist_ok=True)
        for t in range(frames):
            image, labels = blob_frame(rng, shape)
            tifffile.imwrite(os.path.join(root, seq, f"t{t:04d}.tif"), image)
            if seq in sequences:
                tifffile.imwrite(os.path.join(gt, f"man_seg{t:04d}.tif"), labels)
    return str(root)


def dense_labels(seed, size=(256, 256), n_cells=120):
    """A dense random label image: a Voronoi tessellation of random points, 1-px background gaps between some
    neighbours and scattered background pixels, so instances touch, split and meet the image edge."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    points = rng.random((n_cells, 2)) * size
    yy, xx = np.mgrid[: size[0], : size[1]]
    distance, nearest = cKDTree(points).query(np.stack([yy.ravel(), xx.ravel()], 1), k=2)
    labels = (nearest[:, 0] + 1).reshape(size).astype(np.uint32)
    labels[((distance[:, 1] - distance[:, 0]) < rng.uniform(0, 2)).reshape(size)] = 0
    labels[rng.random(size) < 0.003] = 0
    return labels


def noisy_border_core(seed, size=(256, 256), n_cells=120, noise=0.05):
    """A border-core map as a model might predict it: exact targets of dense_labels with a fraction of pixels
    replaced by random classes (cores split and merge, stray border appears)."""
    from border_core import border_core_targets

    semantic = border_core_targets(dense_labels(seed, size, n_cells))
    rng = np.random.default_rng(seed + 1000)
    flip = rng.random(size) < noise
    semantic[flip] = rng.integers(0, 3, flip.sum())
    return semantic


def rods(shape=(120, 150)):
    """Three hand-placed cells: a horizontal rod, a vertical rod and an L, so that any mirror or turn shows."""
    mask = np.zeros(shape, np.int32)
    mask[20:32, 10:70] = 1
    mask[40:110, 100:112] = 2
    mask[70:82, 20:60] = 3
    mask[50:82, 20:32] = 3
    return mask
