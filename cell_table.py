"""Per-cell measurements of a tracked movie: one row per cell per frame.

    table = cell_table(track_maps, tracks, images, pixel_size=0.065, drift=drift)

Columns (CELL_COLUMNS): frame, track, parent, generation; area, length and width in px and in µm (µm columns NaN when
the pixel size is unknown); centroid_y, centroid_x (px, in the frame); mean_intensity (of the image under the cell);
drift_y, drift_x (px the frame's content moved since frame 0, from the registration: centroid - drift is the cell's
position in frame 0's coordinates).

Length and width of a rod: the length is the extent of its pixels along its major axis (the span of the pixel
centres plus one pixel; the axis from the cell's second moments), so a bent cell measures its chord; the width is
that of the capsule (a rectangle with half-disc caps) of this length and the cell's area,
area = width * length - (1 - pi/4) * width^2, which a bend does not widen. Every quantity comes from np.bincount and
scipy.ndimage's labelled reductions over whole frames, no loop over cells.
"""
import numpy as np
import pandas as pd
from scipy import ndimage

CELL_COLUMNS = ["frame", "track", "parent", "generation", "area_px", "area_um2", "length_px", "length_um", "width_px",
                "width_um", "centroid_y", "centroid_x", "mean_intensity", "drift_y", "drift_x"]


def cell_measurements(labels: np.ndarray, image: np.ndarray | None = None) -> dict:
    """Per label of one frame: ids, area, centroid, length, width (px) and the image's mean under it.

    >>> rod = np.zeros((12, 30), np.uint16); rod[3:8, 4:24] = 7                 # 5 px wide, 20 px long
    >>> m = cell_measurements(rod, np.full(rod.shape, 2.0))
    >>> m["ids"].tolist(), m["area"].tolist(), m["length"].tolist(), m["mean_intensity"].tolist()
    ([7], [100.0], [20.0], [2.0])
    >>> round(float(m["width"][0]), 2)                  # a rectangle is a little wider than a capsule of its area
    5.3
    >>> m["centroid"].tolist()
    [[5.0, 13.5]]
    """
    labels = np.asarray(labels)
    flat = labels.ravel().astype(np.int64)
    area = np.bincount(flat)
    ids = np.flatnonzero(area)
    ids = ids[ids > 0]
    if not len(ids):
        empty = np.zeros(0)
        return {"ids": ids, "area": empty, "centroid": np.zeros((0, 2)), "length": empty, "width": empty,
                "mean_intensity": empty}
    yy, xx = np.indices(labels.shape, dtype=np.float64)
    yy, xx = yy.ravel(), xx.ravel()
    n = len(area)
    safe = np.maximum(area, 1).astype(np.float64)
    my, mx = np.bincount(flat, yy, n) / safe, np.bincount(flat, xx, n) / safe
    cyy = np.bincount(flat, yy * yy, n) / safe - my ** 2
    cxx = np.bincount(flat, xx * xx, n) / safe - mx ** 2
    cxy = np.bincount(flat, xx * yy, n) / safe - mx * my
    angle = 0.5 * np.arctan2(2 * cxy, cxx - cyy)  # of the major axis, from the x axis
    cos, sin = np.cos(angle), np.sin(angle)
    along = (xx - mx[flat]) * cos[flat] + (yy - my[flat]) * sin[flat]
    inside = flat > 0
    length = span(along[inside], flat[inside], ids) + 1
    width = capsule_width(area[ids].astype(np.float64), length)
    if image is None:
        mean = np.full(len(ids), np.nan)
    else:
        mean = np.bincount(flat, np.asarray(image, np.float64).ravel(), n)[ids] / area[ids]
    return {"ids": ids, "area": area[ids].astype(np.float64), "centroid": np.stack([my[ids], mx[ids]], 1),
            "length": length, "width": width, "mean_intensity": mean}


def capsule_width(area, length):
    """Width of the capsule of this area and length: the smaller root of (1 - pi/4) w^2 - length w + area = 0
    (a cell too short for its area, a disc at most, gets the width of the square of its area).

    >>> w, l = 10.0, 50.0
    >>> round(float(capsule_width(w * (l - w) + np.pi * w ** 2 / 4, l)), 6)
    10.0
    """
    cap = 1 - np.pi / 4
    discriminant = np.maximum(length ** 2 - 4 * cap * area, 0)
    width = (length - np.sqrt(discriminant)) / (2 * cap)
    return np.minimum(width, np.sqrt(area) * np.where(discriminant > 0, np.inf, 1))


def span(values, labels, ids) -> np.ndarray:
    """max - min of `values` per label in `ids`."""
    return np.asarray(ndimage.maximum(values, labels, ids)) - np.asarray(ndimage.minimum(values, labels, ids))


def cell_table(track_maps, tracks, images=None, pixel_size: float | None = None, drift=None) -> pd.DataFrame:
    """One row per cell per frame (CELL_COLUMNS). track_maps: frames labelled by track id; tracks: the CTC table
    (id, first, last, parent); images: the frames (None: mean_intensity NaN); pixel_size: µm per px (None: µm
    columns NaN); drift: (T, 2) px since frame 0 (None: zeros).

    >>> maps = [np.zeros((10, 30), np.uint8) for _ in range(2)]
    >>> maps[0][2:6, 2:22] = 1; maps[1][2:6, 2:12] = 2; maps[1][2:6, 13:23] = 3
    >>> tracks = np.array([[1, 0, 0, 0], [2, 1, 1, 1], [3, 1, 1, 1]])
    >>> t = cell_table(maps, tracks, pixel_size=0.1, drift=[[0, 0], [0, 1]])
    >>> t[["frame", "track", "parent", "generation"]].values.tolist()
    [[0, 1, 0, 0], [1, 2, 1, 1], [1, 3, 1, 1]]
    >>> t[["area_px", "length_px", "drift_x"]].values.tolist()
    [[80.0, 20.0, 0.0], [40.0, 10.0, 1.0], [40.0, 10.0, 1.0]]
    """
    from track import generations  # the lineage rules live with the tracking
    tracks = np.asarray(tracks, np.int64).reshape(-1, 4)
    top = int(tracks[:, 0].max(initial=0))
    parent_of = np.zeros(top + 1, np.int64)
    parent_of[tracks[:, 0]] = tracks[:, 3]
    generation = generations(tracks)
    drift = np.zeros((len(track_maps), 2)) if drift is None else np.asarray(drift, np.float64).reshape(-1, 2)
    scale = float(pixel_size) if pixel_size else np.nan
    parts = []
    for t, track_map in enumerate(track_maps):  # O(frames)
        m = cell_measurements(track_map, None if images is None else images[t])
        ids = m["ids"]
        if ids.size and ids.max() > top:
            raise ValueError(f"frame {t}: track id {ids.max()} is not in the track table")
        parts.append(pd.DataFrame({
            "frame": np.full(len(ids), t), "track": ids, "parent": parent_of[ids], "generation": generation[ids],
            "area_px": m["area"], "area_um2": m["area"] * scale ** 2, "length_px": m["length"],
            "length_um": m["length"] * scale, "width_px": m["width"], "width_um": m["width"] * scale,
            "centroid_y": m["centroid"][:, 0], "centroid_x": m["centroid"][:, 1],
            "mean_intensity": m["mean_intensity"], "drift_y": np.full(len(ids), drift[t, 0]),
            "drift_x": np.full(len(ids), drift[t, 1])}, columns=CELL_COLUMNS))
    if not parts:
        return pd.DataFrame(columns=CELL_COLUMNS)
    return pd.concat(parts, ignore_index=True)
