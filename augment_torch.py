"""Training patches sampled and augmented on the model's device, a whole batch at once: augment.random_patch's
resampling (crop, scale, rotation, mirror, elastic deformation), its intensity changes and the border-core targets of
the resampled mask, in torch, so that loader workers only hand over frames.

    patches, targets, labels = random_patches(frames, masks, 256, generator, foreground=foreground)

frames: a list of H x W float tensors (0..255; sizes may differ), masks: the list of their H x W integer instance
masks, on the device that does the work. The image is sampled bilinearly with grid_sample (mirrored at the frame's
edges, as augment.resample does), the mask by nearest neighbour, both on the same grid; the targets are computed on
the resampled mask (the border stays 4 model pixels wide at any scale); grid points outside the frame get IGNORE.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from augment import IGNORE, cubic_zoom_matrix
from border_core import BORDER, BORDER_WIDTH, CORE


def _shifted_and(mask: torch.Tensor) -> torch.Tensor:
    """A pixel and its 4 neighbours all True (binary erosion with the cross; beyond the edge counts as True)."""
    padded = F.pad(mask[:, None].to(torch.uint8), (1, 1, 1, 1), value=1)[:, 0].bool()
    return (mask & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:])


def border_core_targets_torch(labels: torch.Tensor) -> torch.Tensor:
    """B x H x W uint8 border-core maps of B x H x W instance masks: border_core.border_core_targets' rule (a pixel is
    core when every in-image pixel within city-block distance 4 carries its label), on the masks' device."""
    foreground = labels > 0
    uniform = foreground.clone()
    same_horizontal = labels[:, :, 1:] == labels[:, :, :-1]
    same_vertical = labels[:, 1:, :] == labels[:, :-1, :]
    uniform[:, :, 1:] &= same_horizontal
    uniform[:, :, :-1] &= same_horizontal
    uniform[:, 1:, :] &= same_vertical
    uniform[:, :-1, :] &= same_vertical
    core = uniform
    for _ in range(BORDER_WIDTH - 1):
        core = _shifted_and(core)
    targets = foreground.to(torch.uint8) * BORDER
    return torch.where(core, torch.full_like(targets, CORE), targets)


def sample_grids(centers: torch.Tensor, patch_size: int, scales: torch.Tensor, angles: torch.Tensor,
                 flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), each B x P x P: augment.sample_grid for a batch of centres (B x 2), scales, angles (radians) and
    left-right mirrors (bool), in the centres' dtype and device."""
    offsets = (torch.arange(patch_size, dtype=centers.dtype, device=centers.device) - (patch_size - 1) / 2)
    dy = offsets[None, :, None] / scales[:, None, None]
    dx = offsets[None, None, :] / scales[:, None, None]
    dx = torch.where(flips[:, None, None], -dx, dx).expand(-1, patch_size, -1)
    dy = dy.expand(-1, -1, patch_size)
    cos, sin = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    return centers[:, 0, None, None] + cos * dy - sin * dx, centers[:, 1, None, None] + sin * dy + cos * dx


def _mirror(coordinate: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Coordinates folded into 0..size-1 by mirroring about the edge pixels' centres (scipy's mode "mirror")."""
    period = (2 * (size - 1)).clamp_min(1)
    folded = torch.remainder(coordinate, period)
    folded = torch.where(folded > size - 1, period - folded, folded)
    return torch.where(size > 1, folded, torch.zeros_like(folded))


def stack_frames(frames: list, masks: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frames and masks of any sizes as one zero-padded batch (B x H x W each) and their sizes (B x 2)."""
    height, width = max(f.shape[0] for f in frames), max(f.shape[1] for f in frames)
    sizes = torch.tensor([tuple(f.shape) for f in frames], device=frames[0].device)
    images = torch.stack([F.pad(f, (0, width - f.shape[1], 0, height - f.shape[0])) for f in frames])
    labels = torch.stack([F.pad(m, (0, width - m.shape[1], 0, height - m.shape[0])) for m in masks])
    return images, labels, sizes


def resample_batch(images: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor, rows: torch.Tensor,
                   cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """augment.resample for a batch: images (B x H x W, each frame its `sizes` row's top-left part) sampled bilinearly
    at (rows, cols) (B x P x P), mirrored beyond each frame's own edges; labels by nearest neighbour, 0 outside; and
    which grid points lie inside their frame."""
    heights, widths = sizes[:, 0, None, None].to(rows.dtype), sizes[:, 1, None, None].to(rows.dtype)
    mirrored_rows, mirrored_cols = _mirror(rows, heights), _mirror(cols, widths)
    height, width = images.shape[-2:]
    # align_corners: -1 and 1 are the centres of the first and last pixel, so a coordinate maps linearly
    grid = torch.stack([2 * mirrored_cols / max(width - 1, 1) - 1, 2 * mirrored_rows / max(height - 1, 1) - 1], -1)
    patches = F.grid_sample(images[:, None].to(grid.dtype), grid, mode="bilinear", padding_mode="border",
                            align_corners=True)[:, 0]
    r, c = torch.round(rows), torch.round(cols)  # round half to even, as numpy's rint
    inside = (r >= 0) & (r < heights) & (c >= 0) & (c < widths)
    r = r.clamp(0, height - 1).long()
    c = c.clamp(0, width - 1).long()
    batch = torch.arange(len(labels), device=labels.device)[:, None, None]
    picked = labels[batch, r, c]
    return patches, torch.where(inside, picked, torch.zeros_like(picked)), inside


def elastic_offsets_batch(count: int, patch_size: int, strength: float, generator: torch.Generator,
                          device, dtype=torch.float32, spacing: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, dx), each B x P x P: augment.elastic_offsets for a batch (normal control points, cubic between them)."""
    points = -(-patch_size // spacing) + 1
    coarse = torch.randn(count, 2, points, points, generator=generator, dtype=torch.float64) * strength
    spread = torch.from_numpy(cubic_zoom_matrix(points, patch_size))
    offsets = (spread @ coarse @ spread.T).to(device=device, dtype=dtype)
    return offsets[:, 0], offsets[:, 1]


def _gaussian_blur(patches: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each patch blurred with its own sigma (0: unchanged), as scipy's gaussian_filter (truncated at 4 sigma,
    edges reflected with the edge pixel repeated), separable, one grouped convolution per axis for the batch."""
    radius = max(int(4 * float(sigmas.max()) + 0.5), 1)
    x = torch.arange(-radius, radius + 1, dtype=patches.dtype, device=patches.device)
    safe = sigmas.clamp_min(1e-6)[:, None]
    kernels = torch.exp(-0.5 * (x[None] / safe) ** 2)
    kernels = torch.where(x[None].abs() <= (4 * safe + 0.5).floor(), kernels, torch.zeros_like(kernels))
    identity = (x == 0).to(patches.dtype)[None].expand_as(kernels)
    kernels = torch.where(sigmas[:, None] > 0, kernels / kernels.sum(1, keepdim=True), identity)
    count = len(patches)
    out = patches[None]  # 1 x B x P x P: the batch as channels, one kernel per channel
    for axis in (2, 3):
        head = out.narrow(axis, 0, radius).flip(axis)
        tail = out.narrow(axis, out.shape[axis] - radius, radius).flip(axis)
        padded = torch.cat([head, out, tail], axis)
        weight = kernels.view(count, 1, -1, 1) if axis == 2 else kernels.view(count, 1, 1, -1)
        out = F.conv2d(padded, weight, groups=count)
    return out[0]


def random_intensity_batch(patches: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """augment.random_intensity for a batch (B x P x P, 0..255): gamma, contrast, brightness, defocus blur and
    noise, each with its own probability and strength per patch."""
    count, device, dtype = len(patches), patches.device, patches.dtype
    draw = lambda: torch.rand(count, generator=generator, dtype=torch.float64).to(device, dtype)[:, None, None]
    uniform = lambda low, high: low + (high - low) * draw()
    x = patches / 255.0
    gamma = torch.exp(uniform(math.log(0.7), math.log(1.5)))
    x = torch.where(draw() < 0.5, x.clamp_min(0) ** gamma, x)
    mean = x.mean((1, 2), keepdim=True)
    x = torch.where(draw() < 0.5, (x - mean) * uniform(0.7, 1.3) + mean, x)
    x = torch.where(draw() < 0.5, x + uniform(-0.15, 0.15), x)
    sigmas = torch.where(draw() < 0.25, uniform(0.3, 1.2), torch.zeros_like(draw()))[:, 0, 0]
    if bool((sigmas > 0).any()):
        x = _gaussian_blur(x, sigmas)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(device, dtype)
    x = torch.where(draw() < 0.25, x + noise * uniform(0.005, 0.04), x)
    return x.clamp(-0.5, 1.5) * 255.0


def random_patches(frames: list, masks: list, patch_size: int, generator: torch.Generator, foreground=None,
                   augment: bool = True, scale_range=(0.7, 1.4), foreground_bias: float = 0.8,
                   intensity: bool = True, turn: bool = True, elastic: float = 0.0, dtype=torch.float32):
    """One patch per frame: (patches B x P x P float on the 0..255 scale, targets B x P x P uint8 with IGNORE outside
    the frame, the resampled instance labels), all on the frames' device; augment.random_patch's rules and
    arguments (`foreground`: a list of (N, 2) candidate centres per frame, e.g. augment.foreground_pixels). The
    random draws come from `generator` (a CPU generator: small per-patch numbers, the same on every device)."""
    device, count = frames[0].device, len(frames)
    images, labels, sizes = stack_frames(frames, masks)
    rand = lambda: torch.rand(count, generator=generator, dtype=torch.float64)
    sizes_cpu = sizes.cpu().to(torch.float64)
    centers = torch.stack([rand() * (sizes_cpu[:, 0] - 1), rand() * (sizes_cpu[:, 1] - 1)], 1)
    if foreground is not None:
        pick, choice = rand() < foreground_bias, rand()
        for k, candidates in enumerate(foreground):
            if len(candidates) and bool(pick[k]):
                centers[k] = torch.as_tensor(candidates[int(choice[k] * len(candidates))], dtype=torch.float64)
    scales, angles = torch.ones(count, dtype=torch.float64), torch.zeros(count, dtype=torch.float64)
    flips = torch.zeros(count, dtype=torch.bool)
    if augment:
        low, high = np.log(scale_range)
        scales = torch.exp(low + (high - low) * rand())
        if turn:
            angles, flips = rand() * 2 * math.pi, rand() < 0.5
    # keep the crop inside the frame where the frame is large enough, so that little of a patch is padding
    half = (patch_size - 1) / 2 / scales
    for axis in range(2):
        size = sizes_cpu[:, axis]
        fits = size - 1 >= 2 * half
        centers[:, axis] = torch.where(fits, torch.minimum(torch.maximum(centers[:, axis], half), size - 1 - half),
                                       (size - 1) / 2)
    rows, cols = sample_grids(centers.to(device, dtype), patch_size, scales.to(device, dtype),
                              angles.to(device, dtype), flips.to(device))
    if augment and elastic > 0:
        dy, dx = elastic_offsets_batch(count, patch_size, elastic, generator, device, dtype)
        zoom = scales.to(device, dtype)[:, None, None]
        rows, cols = rows + dy / zoom, cols + dx / zoom
    patches, patch_labels, inside = resample_batch(images, labels, sizes, rows, cols)
    targets = border_core_targets_torch(patch_labels)
    targets = torch.where(inside, targets, torch.full_like(targets, IGNORE))
    if augment and intensity:
        patches = random_intensity_batch(patches, generator)
    return patches, targets, patch_labels
