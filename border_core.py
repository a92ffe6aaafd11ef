"""The border-core representation (docs/baseline.md §2, §5): instance mask -> 3-class map for training, and the model's 3-class
map -> instances. Pure numpy/scipy, no I/O.

    0 background, 1 core (a cell's interior, 4 px away from anything else), 2 border (the rest of each cell)

The cores seed the instances and the border pixels are shared out between them, so touching cells come apart.
"""
import numpy as np
from scipy import ndimage

BACKGROUND, CORE, BORDER = 0, 1, 2
BORDER_WIDTH = 4  # erosions with the 3 x 3 cross, docs/baseline.md §2
CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connectivity, as acvl-utils 0.2.6
SCORE_SIZE = (256, 256)  # predictions are written and scored at 256 x 256 (docs/baseline.md §5, §6)


def border_core_targets(labels: np.ndarray) -> np.ndarray:
    """Border-core map of an instance mask (docs/baseline.md §2): 0 background, 1 core, 2 border.

    The baseline erodes each instance 4 times with the 3 x 3 cross, the image edge not eroding: a pixel is core when
    every in-image pixel within city-block distance 4 carries its label. Computed for all instances at once: a pixel
    is "uniform" when it is foreground and its in-image 4-neighbours carry its label; a pixel is core when every
    in-image pixel within distance 3 is uniform (3 binary erosions with the cross, beyond the edge counting as
    uniform). Chaining the equal-neighbour steps gives the same set as the distance-4 rule, with boolean work only.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"border_core_targets expects a 2-D label image, got shape {labels.shape}")
    foreground = labels > 0
    uniform = foreground.copy()
    # compare with each 4-neighbour; along the edge there is no neighbour, which never breaks uniformity
    same_horizontal = labels[:, 1:] == labels[:, :-1]
    same_vertical = labels[1:, :] == labels[:-1, :]
    uniform[:, 1:] &= same_horizontal
    uniform[:, :-1] &= same_horizontal
    uniform[1:, :] &= same_vertical
    uniform[:-1, :] &= same_vertical
    core = ndimage.binary_erosion(uniform, CROSS, iterations=BORDER_WIDTH - 1, border_value=1)
    targets = foreground.astype(np.uint8) * BORDER
    targets[core] = CORE
    return targets


def contact_pixels(labels: np.ndarray, reach: int = 2) -> np.ndarray:
    """Pixels with two different instances within `reach` px (chessboard distance): where touching cells meet, the
    pixels that decide whether they come apart. Two rank filters over the whole image, O(pixels)."""
    labels = np.asarray(labels)
    size = 2 * reach + 1
    highest = ndimage.maximum_filter(labels, size=size, mode="nearest")
    # background counts as above every label, so that the lowest label in reach is a cell's
    above = int(labels.max()) + 1 if labels.size else 1
    lowest = ndimage.minimum_filter(np.where(labels > 0, labels.astype(np.int64), above), size=size, mode="nearest")
    return (highest > 0) & (lowest != highest)


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes, source index floor(i * in / out) (OpenCV's INTER_NEAREST and
    torch's 'nearest'). Any dtype, so it serves images and label maps alike."""
    height, width = array.shape[-2:]
    rows = (np.arange(size[0]) * height) // size[0]
    cols = (np.arange(size[1]) * width) // size[1]
    return array[..., rows[:, None], cols[None, :]]


def resize_nearest_exact(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes with pixel centres aligned, source index
    floor((i + 0.5) * in / out) (torch's 'nearest-exact', PIL's NEAREST): the rule that keeps a label map on top of
    an image resampled bilinearly about pixel centres (data_files.rescale). resize_nearest's floor(i * in / out) shifts
    the content by up to half a source pixel, which costs several points of Instance Dice on 18 px wide cells; it
    stays only where the challenge's own 256 x 256 maps are made."""
    height, width = array.shape[-2:]
    rows = np.minimum(((np.arange(size[0]) + 0.5) * height / size[0]).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * width / size[1]).astype(np.int64), width - 1)
    return array[..., rows[:, None], cols[None, :]]


def instances_at_score_size(instances: np.ndarray, frame_shape, output_size=SCORE_SIZE) -> np.ndarray:
    """Instances predicted at the model's scale -> the challenge's 256 x 256 map: first back to the frame's own size
    (frame_shape) with pixel centres aligned, then the challenge's rule, the one its ground truth at 256 is made with
    from the frame's own mask."""
    if tuple(instances.shape) != tuple(frame_shape):
        instances = resize_nearest_exact(instances, frame_shape)
    return resize_nearest(instances, output_size)


def instances_from_border_core(semantic: np.ndarray, small_center_threshold: int = 30,
                               isolated_border_threshold: int = 15, min_area_fraction: float = 0) -> np.ndarray:
    """Instance map (uint32, labels 1..N) from a 2-D border-core map (0 background, 1 core, 2 border).

    Pixel for pixel the output of acvl-utils 0.2.6 `convert_semantic_to_instanceseg(semantic[None],
    small_center_threshold=30, isolated_border_as_separate_instance_threshold=15)[0]`, computed for all cells at once:
    cores of at most `small_center_threshold` px become border; the remaining 4-connected cores are the seeds, numbered
    in raster order; a 4-connected foreground component without a seed becomes an instance of its own (numbered after
    the seeds) if it has more than `isolated_border_threshold` px; every other border pixel takes the seed nearest to it
    along 4-connected paths inside its component, ties going to the higher seed label. The input is not modified.

    min_area_fraction > 0 (not in the reference; a trained model's choice on its validation frames): instances of at
    most that fraction of the frame's typical cell area are dropped afterwards, the others renumbered 1..N in their
    order (drop_small_instances, typical_cell_area).
    """
    semantic = np.asarray(semantic)
    if semantic.ndim != 2:
        raise ValueError(f"instances_from_border_core expects a 2-D map, got shape {semantic.shape}")
    core = semantic == CORE
    foreground = core | (semantic == BORDER)
    core_labels, n_cores = ndimage.label(core, CROSS)
    # Dropping whole small cores leaves the other cores' connectivity and raster order as they were, so the seeds
    # are the large cores renumbered 1..n in order: no second labelling pass.
    large = np.bincount(core_labels[core], minlength=n_cores + 1) > small_center_threshold
    large[0] = False
    renumber = np.zeros(n_cores + 1, np.int32)
    renumber[large] = np.arange(1, large.sum() + 1)
    seeds, n_seeds = renumber[core_labels], int(large.sum())
    components, n_components = ndimage.label(foreground, CROSS)

    # Which component holds each seed, and how many seeds each component has.
    seed_pixels = seeds > 0
    component_of_seed = np.zeros(n_seeds + 1, np.int64)
    component_of_seed[seeds[seed_pixels]] = components[seed_pixels]
    seeds_per_component = np.bincount(component_of_seed[1:], minlength=n_components + 1)
    component_sizes = np.bincount(components[foreground], minlength=n_components + 1)

    # One seed: the whole component is that seed's instance. No seed: an instance of its own, numbered after the seeds
    # in component (raster) order, if larger than isolated_border_threshold.
    component_label = np.zeros(n_components + 1, np.int32)
    component_label[component_of_seed[1:]] = np.arange(1, n_seeds + 1)
    isolated = (seeds_per_component == 0) & (component_sizes > isolated_border_threshold)
    isolated[0] = False
    component_label[isolated] = n_seeds + 1 + np.arange(isolated.sum())
    component_label[seeds_per_component > 1] = 0
    labels = component_label[components]

    # Several seeds: grow them into the rest of their component one ring at a time. A pixel reached in ring k takes
    # the highest label among its already labelled 4-neighbours: those all lie at distance k - 1 from their seeds, so
    # this is "nearest seed, ties to the higher label", the reference's repeated grey dilation. Each ring is four
    # maxima of shifted views of the whole image: contiguous memory, cheaper than gathering the pixels still to fill.
    shared = seeds_per_component[components] > 1
    np.copyto(labels, seeds, where=shared)
    todo = shared & (seeds == 0)
    neighbour_max = np.empty_like(labels)
    while todo.any():
        neighbour_max.fill(0)
        np.maximum(neighbour_max[:, 1:], labels[:, :-1], out=neighbour_max[:, 1:])
        np.maximum(neighbour_max[:, :-1], labels[:, 1:], out=neighbour_max[:, :-1])
        np.maximum(neighbour_max[1:], labels[:-1], out=neighbour_max[1:])
        np.maximum(neighbour_max[:-1], labels[1:], out=neighbour_max[:-1])
        reached = todo & (neighbour_max > 0)
        if not reached.any():  # cannot happen (every such pixel is connected to a seed); never loop forever
            break
        np.copyto(labels, neighbour_max, where=reached)
        todo &= ~reached
    labels = labels.astype(np.uint32)
    if min_area_fraction > 0:
        labels = drop_small_instances(labels, min_area_fraction * typical_cell_area(labels))
    return labels


def typical_cell_area(instances: np.ndarray) -> float:
    """The area of the instance that holds the median foreground pixel (the area-weighted median): the size of the
    frame's cells, which many small fragments do not pull down as they would a plain median. 0 without instances."""
    sizes = np.bincount(instances.ravel())[1:]
    sizes = np.sort(sizes[sizes > 0])
    if sizes.size == 0:
        return 0.0
    cumulative = np.cumsum(sizes)
    return float(sizes[np.searchsorted(cumulative, cumulative[-1] / 2)])


def drop_small_instances(instances: np.ndarray, min_area: float) -> np.ndarray:
    """Instances of at most min_area px set to background, the others renumbered 1..N keeping their order: the
    debris and fragments that a model trained on few frames finds between the cells. min_area <= 0: unchanged."""
    if min_area <= 0 or instances.size == 0:
        return instances
    sizes = np.bincount(instances.ravel())
    keep = sizes > min_area
    keep[0] = False
    renumber = np.zeros(len(sizes), instances.dtype)
    renumber[keep] = np.arange(1, keep.sum() + 1)
    return renumber[instances]


def instances_at_size(semantic: np.ndarray, output_size=SCORE_SIZE, small_center_threshold: int = 30,
                      isolated_border_threshold: int = 15) -> np.ndarray:
    """Border-core map -> instances -> nearest-neighbour resize to output_size (what the challenge scores)."""
    instances = instances_from_border_core(semantic, small_center_threshold, isolated_border_threshold)
    return resize_nearest(instances, output_size)
