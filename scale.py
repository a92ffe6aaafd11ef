"""Scale: how wide the cells are, in px, and by how much frames are resampled so that cells reach the model's width.

A model trained on patches knows cells of one width (its `cell_width`, recorded in the checkpoint); its scale
augmentation teaches it widths about 0.7-1.4 times that. Frames whose cells are within SCALE_TOLERANCE of the model's
width are taken as they are: resampling them for a small mismatch costs more than it buys.

    median_cell_width(masks)               the cells' width in some label images
    frame_scale(model_width, cells_width)  the factor a frame is resampled by (1 within the tolerance)
    training_scales(widths, ...)           each training and validation sequence's factor, and the model's width
"""
import numpy as np
from scipy import ndimage

SCALE_TOLERANCE = (0.8, 1.25)


def within_tolerance(scale: float) -> bool:
    return SCALE_TOLERANCE[0] <= scale <= SCALE_TOLERANCE[1]


def frame_scale(model_width: float, cells_width: float) -> float:
    """The factor that brings cells `cells_width` px wide to the model's width, or 1 where they are within the
    tolerance (or either width is unknown).

    >>> frame_scale(16, 8), frame_scale(16, 15), frame_scale(16, float("nan"))
    (2.0, 1.0, 1.0)
    """
    if not (model_width and np.isfinite(cells_width) and cells_width > 0):
        return 1.0
    scale = model_width / cells_width
    return 1.0 if within_tolerance(scale) else float(scale)


def median_cell_width(masks) -> float:
    """Median width of the instances of some label images, in px: twice the largest distance from a cell's pixel to
    the nearest pixel outside it (background or another cell), minus one. For a rod that is its diameter (Cellpose
    states its scale as a diameter in the same spirit). One distance transform per cell, in its bounding box. NaN
    where there is no cell.

    >>> mask = np.zeros((20, 40), np.int32); mask[5:14, 5:35] = 1   # a rod 9 px wide
    >>> median_cell_width([mask])
    9.0
    """
    widths = []
    for mask in masks:
        mask = np.asarray(mask)
        if mask.dtype == bool:
            mask = mask.astype(np.uint8)  # one cell; find_objects takes integers only
        if mask.size and int(mask.max()) > mask.size:  # sparse huge ids (uint32 above 2**31): find_objects would
            mask = np.unique(mask, return_inverse=True)[1].reshape(mask.shape)  # allocate per id; renumber 0..N
        for label, box in enumerate(ndimage.find_objects(mask), start=1):
            if box is None:
                continue
            cell = np.pad(mask[box] == label, 1)
            widths.append(2 * ndimage.distance_transform_edt(cell).max() - 1)
    return float(np.median(widths)) if widths else float("nan")


def training_scales(widths: dict, requested: float | None = None, inherited: float | None = None,
                    validation_only=()) -> tuple[float, dict]:
    """(the model's cell width, {sequence: factor}) for training on sequences whose cells are `widths` px wide.

    requested: the width the user asked for (--model_cell_width): every training sequence is brought to it.
    inherited: the width of the model training starts from (fine-tuning): kept unless the data's cells are within
    the tolerance of it, in which case the frames keep their own pixels, as inference will, and the data's width
    becomes the model's. Neither: frames keep their own scale.
    Validation-only sequences are seen as inference will see them: a factor within the tolerance is 1, so that the
    best checkpoint is chosen on what inference makes of them.

    >>> training_scales({"a": 10.0, "b": 12.0}, requested=20)
    (20.0, {'a': 2.0, 'b': 1.6666666666666667})
    >>> training_scales({"a": 10.0}, inherited=11.0)
    (10.0, {'a': 1.0})
    """
    data_width = float(np.nanmedian(list(widths.values())))
    target = requested or inherited
    if not requested and target and within_tolerance(target / data_width):
        target = None
    scales = {}
    for sequence, width in widths.items():
        scale = target / width if target and width > 0 else 1.0
        scales[sequence] = 1.0 if sequence in validation_only and within_tolerance(scale) else float(scale)
    return float(target or data_width), scales
