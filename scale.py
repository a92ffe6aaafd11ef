"""Scale: how wide the cells are, in px, and by how much frames are resampled so that cells reach the model's width.

A model trained on patches knows cells of one width (its `cell_width`, recorded in the checkpoint); its scale
augmentation teaches it widths about 0.7-1.4 times that. Frames whose cells are within SCALE_TOLERANCE of the model's
width are taken as they are: resampling them for a small mismatch costs more than it buys.

    median_cell_width(masks)               the cells' width in some label images
    frame_scale(model_width, cells_width)  the factor a frame is resampled by (1 within the tolerance)
    representable_width(masks)             the narrowest width at which the border-core representation holds the cells
    training_scales(widths, ...)           each training and validation sequence's factor, and the model's width
"""
import numpy as np
from scipy import ndimage

from border_core import border_core_targets, instances_from_border_core
from data_files import rescale
from metrics import instance_dice

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


# Upscalings tried by representable_width, smallest first: the border (4 px) and the small-core threshold (30 px) are
# fixed in the model's pixels, so narrow cells lose their cores at their own scale and keep them when enlarged.
UPSCALINGS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


def representation_ceiling(masks, scale: float = 1.0) -> float:
    """Mean Instance Dice of ground truth passed through border-core targets and postprocessing at `scale`: what a
    perfect model scores there.

    >>> rods = np.zeros((30, 60), np.int32); rods[8:14, 5:55] = 1; rods[14:20, 5:55] = 2  # touching, 6 px wide
    >>> representation_ceiling([rods]), representation_ceiling([rods], 2.0)   # at 1x no core: one merged cell
    (0.3333333333333333, 1.0)
    """
    scores = []
    for mask in masks:
        scaled = rescale(np.asarray(mask), scale, order=0).astype(np.int64)
        scores.append(instance_dice(scaled, instances_from_border_core(border_core_targets(scaled)).astype(np.int64)))
    return float(np.mean(scores)) if scores else float("nan")


def representable_width(masks, width: float, floor: float = 0.97, tolerance: float = 0.005) -> tuple[float, dict]:
    """(the model's cell width, {upscaling: ceiling}) for cells `width` px wide in `masks`: the smallest upscaling
    (UPSCALINGS) whose representation ceiling reaches `floor`, or, where none does (cells the representation cannot
    hold at any scale, such as labels split into pieces), the smallest within `tolerance` of the best. Upscaling
    costs pixels, so frames keep their own scale wherever it already holds the cells."""
    masks = list(masks)
    ceilings = {}
    for factor in UPSCALINGS:
        ceilings[factor] = representation_ceiling(masks, factor)
        if ceilings[factor] >= floor:
            return width * factor, ceilings
    best = max(ceilings.values())
    return width * next(f for f in UPSCALINGS if ceilings[f] >= best - tolerance), ceilings
