"""The border-core postprocessing in torch, for a batch of maps on the model's device (a GPU): the same instances as
border_core.instances_from_border_core, pixel for pixel, without sending the maps to the host first.

    instances = instances_from_border_core_torch(semantic)   # B x H x W uint8 (0 background, 1 core, 2 border)

Connected components are found by propagating the smallest linear index through each component (4-neighbourhood),
with pointer jumping so that long components converge in a few dozen steps; a component's id is then its first pixel
in raster order, which is how scipy's ndimage.label numbers them. On a CPU the numpy version is faster.
"""
import torch
import torch.nn.functional as F

CORE, BORDER = 1, 2


def _neighbour_min(labels: torch.Tensor, fill: int) -> torch.Tensor:
    padded = F.pad(labels, (1, 1, 1, 1), value=fill)
    return torch.minimum(torch.minimum(padded[:, :-2, 1:-1], padded[:, 2:, 1:-1]),
                         torch.minimum(padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]))


def _neighbour_max(labels: torch.Tensor) -> torch.Tensor:
    padded = F.pad(labels, (1, 1, 1, 1), value=0)
    return torch.maximum(torch.maximum(padded[:, :-2, 1:-1], padded[:, 2:, 1:-1]),
                         torch.maximum(padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]))


def component_ids(mask: torch.Tensor) -> torch.Tensor:
    """B x H x W int64: for each pixel of `mask` the linear index (+1) of the first pixel of its 4-connected component
    in raster order over the whole batch, 0 outside the mask."""
    total = mask.numel()
    index = torch.arange(1, total + 1, device=mask.device, dtype=torch.int64).view(mask.shape)
    labels = torch.where(mask, index, total + 1)
    flat_mask = mask.reshape(-1)
    while True:
        smaller = torch.where(mask, torch.minimum(labels, _neighbour_min(labels, total + 1)), total + 1)
        # pointer jumping: a label is the index of a pixel of the same component; take that pixel's label
        flat = smaller.reshape(-1)
        jumped = torch.where(flat_mask, flat[(flat.clamp(max=total) - 1)], total + 1).view(mask.shape)
        if torch.equal(jumped, labels):
            return torch.where(mask, labels, 0)
        labels = jumped


def _rank_within_images(ids: torch.Tensor, pixels_per_image: int) -> torch.Tensor:
    """For sorted component ids (linear index + 1), their 1-based rank among the ids of the same image."""
    image = (ids - 1) // pixels_per_image
    first = torch.searchsorted(image, image, right=False)
    return torch.arange(1, len(ids) + 1, device=ids.device) - first


def instances_from_border_core_torch(semantic: torch.Tensor, small_center_threshold: int = 30,
                                     isolated_border_threshold: int = 15, min_area_fraction: float = 0
                                     ) -> torch.Tensor:
    """B x H x W int32 instance maps of B x H x W border-core maps: border_core.instances_from_border_core's rules
    (small cores become border, seeds numbered in raster order, seedless components above the isolated threshold
    become instances after the seeds, border pixels take the nearest seed along 4-connected paths, ties to the
    higher label; then the size filter)."""
    if semantic.ndim == 2:
        return instances_from_border_core_torch(semantic[None], small_center_threshold, isolated_border_threshold,
                                                min_area_fraction)[0]
    batch, height, width = semantic.shape
    pixels = height * width
    core, foreground = semantic == CORE, (semantic == CORE) | (semantic == BORDER)
    size_of = lambda ids: torch.bincount(ids.reshape(-1), minlength=batch * pixels + 1)

    cores = component_ids(core)
    core_size = size_of(cores)
    seed_ids = torch.nonzero(core_size > small_center_threshold).reshape(-1)
    seed_ids = seed_ids[seed_ids > 0]
    seed_label = torch.zeros(batch * pixels + 1, dtype=torch.int64, device=semantic.device)
    seed_label[seed_ids] = _rank_within_images(seed_ids, pixels)
    seeds = seed_label[cores]
    seeds_per_image = torch.bincount((seed_ids - 1) // pixels, minlength=batch)

    components = component_ids(foreground)
    component_size = size_of(components)
    component_of_seed = components.reshape(-1)[seed_ids - 1]  # a seed's first pixel lies in its component
    seeds_in = torch.bincount(component_of_seed, minlength=batch * pixels + 1)

    label_of_component = torch.zeros(batch * pixels + 1, dtype=torch.int64, device=semantic.device)
    single = seeds_in[component_of_seed] == 1
    label_of_component[component_of_seed[single]] = seed_label[seed_ids[single]]
    isolated = torch.nonzero((seeds_in == 0) & (component_size > isolated_border_threshold)).reshape(-1)
    isolated = isolated[isolated > 0]
    label_of_component[isolated] = seeds_per_image[(isolated - 1) // pixels] + _rank_within_images(isolated, pixels)
    labels = label_of_component[components]

    # several seeds in a component: grow them one ring at a time, the highest labelled 4-neighbour winning
    shared = seeds_in[components] > 1
    labels = torch.where(shared, seeds, labels)
    todo = shared & (seeds == 0)
    while bool(todo.any()):
        reached = todo & (_neighbour_max(labels) > 0)
        if not bool(reached.any()):
            break
        labels = torch.where(reached, _neighbour_max(labels), labels)
        todo &= ~reached
    if min_area_fraction > 0:
        labels = torch.stack([drop_small_instances_torch(image, min_area_fraction) for image in labels])
    return labels.to(torch.int32)


def drop_small_instances_torch(labels: torch.Tensor, min_area_fraction: float) -> torch.Tensor:
    """border_core.drop_small_instances with border_core.typical_cell_area, for one map on the device."""
    sizes = torch.bincount(labels.reshape(-1))
    sizes[0] = 0
    present = torch.sort(sizes[sizes > 0]).values
    if len(present) == 0:
        return labels
    cumulative = torch.cumsum(present, 0)
    typical = present[torch.searchsorted(cumulative, cumulative[-1] / 2)].item()
    keep = sizes > min_area_fraction * typical
    keep[0] = False
    renumber = torch.zeros(len(sizes), dtype=labels.dtype, device=labels.device)
    renumber[keep] = torch.arange(1, int(keep.sum()) + 1, dtype=labels.dtype, device=labels.device)
    return renumber[labels]
