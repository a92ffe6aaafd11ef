"""Tiled prediction: the class logits of a frame of any size from a fully convolutional model, tile by tile, blended
with centre-weighted maps as nnU-Net's sliding window does. Memory is bounded by a batch of tiles, not by the frame.

The tile layout is chosen for the device, once per frame size (choose_layout):

    fixed   tiles of the model's recorded tile_size overlapping by a quarter, many per forward pass: a GPU's layout,
            and the only one before layouts were chosen ("auto" on a GPU)
    auto    on a CPU, the layout that needs the least predicted CPU time (cheapest_cpu_layout): per pixel the network
            costs more in large tiles (their activations leave the cache) and in small ones, and overlapping pixels
            are paid twice, so it weighs one against the other, one tile per pass, neighbours overlapping by at least
            min_overlap; the whole frame where that is cheapest

    logits = sliding_window_logits(model, images)                      # auto, for the images' device
    logits = sliding_window_logits(model, images, tiling="fixed")      # the recorded tile_size, a quarter overlap
"""
import functools
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TILINGS = ("auto", "fixed")
# tiles (or whole frames) per forward pass: one on a CPU, where a batch of tiles costs more per pixel than the same
# tiles one at a time (cache), many on a GPU, where one tile leaves the chip mostly idle
TILES_PER_PASS = {"cpu": 1, "cuda": 64}
# CPU-seconds per million input pixels of one forward pass of the default U-Net (widths 32..256) by tile side, one
# tile per pass, one thread (/proc/cpuinfo: AMX, 2 MiB L2 per core; niced, beside a training), by arithmetic: bf16
# autocast or float32, weights channels_last (as inference runs them) or not (NCHW: training's validation). Per pixel a
# pass costs more in larger tiles (their activations outgrow the caches; in NCHW bf16 past 192 px) and in small ones
# (the per-pass work around the convolutions), so on a CPU a layout weighs that against the overlap that smaller
# tiles pay twice. Only the shape of these curves matters: other widths and CPUs scale them, and a layout's choice
# compares costs on one curve.
CPU_TILE_SIDES = (64, 96, 128, 160, 192, 224, 256, 320, 384, 512, 640, 768)
CPU_COST_PER_MEGAPIXEL = {
    "bf16 channels_last": (0.98, 0.65, 0.53, 0.50, 0.48, 0.44, 0.46, 0.52, 0.52, 0.54, 0.63, 0.74),
    "fp32 channels_last": (2.00, 1.82, 1.75, 1.68, 1.65, 1.65, 1.66, 1.81, 1.91, 2.05, 2.24, 2.28),
    "bf16 nchw": (1.63, 1.18, 1.06, 1.04, 1.15, 1.40, 1.56, 1.61, 1.76, 2.05, 2.18, 2.31),
    "fp32 nchw": (2.53, 2.30, 2.24, 2.17, 2.19, 2.26, 2.24, 2.35, 2.47, 2.96, 3.22, 3.53),
}
DEFAULT_ARITHMETIC = "bf16 channels_last"
CPU_MAX_TILE = CPU_TILE_SIDES[-1]  # larger tiles only cost more per pixel; the bound keeps a pass's memory small
# layouts predicted within this share of the cheapest count as equally cheap (the table's own noise on a shared
# machine); of those the one with the fewest tiles is taken, which has the least per-tile work around the network
COST_TOLERANCE = 0.05


class Layout(NamedTuple):
    """Tiles of tile_h x tile_w at every (y, x) of ys x xs, covering a frame padded to a multiple of 2 ** poolings."""
    tile_h: int
    tile_w: int
    ys: tuple
    xs: tuple

    @property
    def corners(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]

    def input_pixels(self) -> int:
        """Pixels the network sees to predict one frame (the overlap counted as often as it is predicted)."""
        return len(self.ys) * len(self.xs) * self.tile_h * self.tile_w


def gaussian_weights(height: int, width: int, device=None) -> torch.Tensor:
    """Centre-weighted blending map of a tile (sigma = 1/8 of its side, as nnU-Net's sliding window): a pixel's
    prediction counts more where it had more context. Never zero, so every pixel gets a weight."""
    def axis(n):
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        return torch.exp(-0.5 * (x / (n / 8)) ** 2)
    weights = axis(height)[:, None] * axis(width)[None, :]
    return (weights / weights.max()).clamp_min(1e-3)


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of side `tile` covering `length`, neighbours overlapping by at least `overlap`."""
    if length <= tile:
        return [0]
    count = int(np.ceil((length - tile) / (tile * (1 - overlap)))) + 1
    return sorted(set(np.round(np.linspace(0, length - tile, count)).astype(int).tolist()))


def spread_starts(length: int, tile: int, count: int) -> tuple:
    """`count` start offsets of tiles of side `tile` spread evenly over `length`, the first at 0, the last at the end.
    Neighbours overlap by at least count * tile - length over count - 1, rounded down to a whole pixel."""
    if count == 1:
        return (0,)
    return tuple(int(start) for start in np.round(np.linspace(0, length - tile, count)).astype(int))


def fixed_layout(height: int, width: int, tile_size: int, overlap: float = 0.25) -> Layout:
    """Tiles of tile_size (the frame's side where smaller), neighbours overlapping by at least `overlap` of a tile."""
    tile_h, tile_w = min(tile_size, height), min(tile_size, width)
    return Layout(tile_h, tile_w, tuple(tile_starts(height, tile_h, overlap)),
                  tuple(tile_starts(width, tile_w, overlap)))


def min_overlap(multiple: int) -> int:
    """The least overlap of neighbouring tiles on a CPU, px: 4 x 2 ** poolings (32 for three poolings). The zero
    padding at a tile's edge changes the predictions within a few 2 ** poolings of it (its reach grows with the
    receptive field, which doubles with each pooling); the middle of an overlap lies 2 x 2 ** poolings inside both
    tiles, where the bundled model's argmax already matches the whole frame's almost everywhere."""
    return 4 * multiple


def cpu_cost_per_pixel(tile_pixels, arithmetic: str = DEFAULT_ARITHMETIC):
    """Predicted CPU-seconds per input pixel of a tile of `tile_pixels` pixels (interpolated by the side of the square
    of that area: thin tiles cost a little less than that, a conservative rule)."""
    sides = np.sqrt(np.asarray(tile_pixels, dtype=float))
    return np.interp(sides, CPU_TILE_SIDES, CPU_COST_PER_MEGAPIXEL[arithmetic]) * 1e-6


def axis_choices(length: int, multiple: int, overlap: int) -> list[tuple[int, int]]:
    """(tiles, tile side) along an axis of `length` (a multiple of `multiple`): one tile of the whole length where it is
    at most CPU_MAX_TILE, and for every count of 2 or more the least side (a multiple of `multiple`) at which that
    many tiles cover the length with neighbours overlapping by at least `overlap`, from CPU_MAX_TILE down to the
    smallest measured side."""
    choices = [(1, length)] if length <= CPU_MAX_TILE else []
    for count in range(2, length // multiple + 1):
        side = -(-math.ceil((length + (count - 1) * overlap) / count) // multiple) * multiple
        if side >= length or side > CPU_MAX_TILE:
            continue
        if side < max(CPU_TILE_SIDES[0], overlap + multiple):
            break
        choices.append((count, side))
    return choices


@functools.lru_cache(maxsize=256)
def cheapest_cpu_layout(height: int, width: int, multiple: int = 8, arithmetic: str = DEFAULT_ARITHMETIC) -> Layout:
    """The layout of a frame of height x width (multiples of `multiple`) that needs the least predicted CPU time, one
    tile per forward pass (cpu_cost_per_pixel x the pixels of all tiles), neighbours overlapping by at least
    min_overlap(multiple); the whole frame where that is cheapest. Of the layouts within COST_TOLERANCE of the
    cheapest, the one with the fewest tiles (then the cheapest of those)."""
    overlap = min_overlap(multiple)
    rows, columns = axis_choices(height, multiple, overlap), axis_choices(width, multiple, overlap)
    counts_y, sides_y = np.array(rows).T
    counts_x, sides_x = np.array(columns).T
    tile_pixels = sides_y[:, None] * sides_x[None, :]
    tiles = counts_y[:, None] * counts_x[None, :]
    cost = tiles * tile_pixels * cpu_cost_per_pixel(tile_pixels, arithmetic)
    near = cost.ravel() <= cost.min() * (1 + COST_TOLERANCE)
    best = np.lexsort((cost.ravel(), np.where(near, tiles.ravel(), np.iinfo(np.int64).max)))[0]
    i, j = np.unravel_index(best, cost.shape)
    (count_y, tile_h), (count_x, tile_w) = rows[i], columns[j]
    return Layout(tile_h, tile_w, spread_starts(height, tile_h, count_y), spread_starts(width, tile_w, count_x))


def arithmetic_of(model: nn.Module, device_type: str) -> str:
    """The arithmetic a forward pass of the model on this device runs in now (a key of CPU_COST_PER_MEGAPIXEL): bf16
    under a bf16 autocast, else float32; channels_last where the model's weights are (border_core_maps makes them)."""
    dtype = "bf16" if (torch.is_autocast_enabled(device_type)
                       and torch.get_autocast_dtype(device_type) == torch.bfloat16) else "fp32"
    # a weight with one input channel is contiguous in both formats: only one that is not tells them apart
    channels_last = any(p.ndim == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                        for p in model.parameters())
    return f"{dtype} {'channels_last' if channels_last else 'nchw'}"


def choose_layout(height: int, width: int, device_type: str, tile_size: int, multiple: int = 8,
                  tiling: str = "auto", overlap: float = 0.25, arithmetic: str = DEFAULT_ARITHMETIC) -> Layout:
    """The tile layout of a frame of height x width (multiples of `multiple`): on a CPU with tiling "auto" the
    cheapest (cheapest_cpu_layout, for the `arithmetic`); else ("fixed", or a GPU) tiles of tile_size, the
    model's recorded bound on a GPU's memory, neighbours overlapping by `overlap` of a tile."""
    if tiling not in TILINGS:
        raise ValueError(f"tiling {tiling!r}: one of {', '.join(TILINGS)}")
    if tiling == "auto" and device_type == "cpu":
        return cheapest_cpu_layout(height, width, multiple, arithmetic)
    return fixed_layout(height, width, tile_size, overlap)


def pad_to(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad the last two axes at the bottom and right, mirrored where the frame is large enough, else repeated
    (channels x H x W or a batch B x channels x H x W)."""
    pad = (0, width - image.shape[-1], 0, height - image.shape[-2])
    if pad[1] == 0 and pad[3] == 0:
        return image
    mode = "reflect" if pad[1] < image.shape[-1] and pad[3] < image.shape[-2] else "replicate"
    if image.ndim == 3:
        return F.pad(image[None], pad, mode=mode)[0]
    return F.pad(image, pad, mode=mode)


def size_multiple(model: nn.Module) -> int:
    """The multiple a frame's sides must have for the model's poolings: 2 ** poolings (8 with the default widths)."""
    return 2 ** (len(model.hparams.widths) - 1) if hasattr(model, "hparams") else 8


def frame_layout(model: nn.Module, height: int, width: int, device_type: str, tile_size: int = 512,
                 tiling: str = "auto", overlap: float = 0.25) -> Layout:
    """The layout sliding_window_logits uses for frames of height x width on this device in the model's arithmetic
    now (arithmetic_of), on the frame padded to the model's size multiple."""
    multiple = size_multiple(model)
    padded_h, padded_w = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    return choose_layout(padded_h, padded_w, device_type, tile_size, multiple, tiling, overlap,
                         arithmetic_of(model, device_type))


def sliding_window_logits(model: nn.Module, images: torch.Tensor, tile_size: int = 512, overlap: float = 0.25,
                          batch_size: int | None = None, tiling: str = "auto") -> torch.Tensor:
    """Class logits (classes x H x W, float32) of a frame of any size (channels x H x W, on the model's device), or
    B x classes x H x W of a batch of frames of one size (B x channels x H x W): each frame's logits are those it gets
    alone, its tiles only sharing forward passes with the other frames' tiles.

    The frames are padded to a multiple of 2 ** poolings (8 with the default widths) and laid out in tiles for their
    device (choose_layout: `tiling`; tile_size and overlap are the fixed layout's). Where one tile holds a frame it is
    predicted whole, exactly as model(frames). Otherwise the overlapping tiles (taken from all frames of the batch) are
    predicted and their logits blended with centre-weighted maps (gaussian_weights). `batch_size` tiles or frames per
    forward pass (default: TILES_PER_PASS of the device), so memory is bounded by them and the frames' logits.
    """
    if images.ndim == 3:
        return sliding_window_logits(model, images[None], tile_size, overlap, batch_size, tiling)[0]
    frames, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    device_type = images.device.type
    batch_size = batch_size or TILES_PER_PASS.get(device_type, TILES_PER_PASS["cpu"])
    layout = frame_layout(model, height, width, device_type, tile_size, tiling, overlap)
    multiple = size_multiple(model)
    padded_h, padded_w = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    images = pad_to(images, padded_h, padded_w)
    tile_h, tile_w, corners = layout.tile_h, layout.tile_w, layout.corners
    if len(corners) == 1:
        return torch.cat([model(images[start:start + batch_size]).float()
                          for start in range(0, frames, batch_size)])[:, :, :height, :width]
    weights = gaussian_weights(tile_h, tile_w, images.device)
    weight_sum = torch.zeros(padded_h, padded_w, device=images.device)
    for y, x in corners:  # the same for every frame of the batch
        weight_sum[y:y + tile_h, x:x + tile_w] += weights
    # frame-major, then the tile order of one frame: each pixel's sum is added up in the same order as frame by frame
    tiles = [(frame, y, x) for frame in range(frames) for y, x in corners]
    total = None
    for start in range(0, len(tiles), batch_size):
        batch = tiles[start:start + batch_size]
        logits = model(torch.stack([images[frame, :, y:y + tile_h, x:x + tile_w] for frame, y, x in batch])).float()
        if total is None:
            total = torch.zeros(frames, logits.shape[1], padded_h, padded_w, device=images.device)
        for (frame, y, x), tile_logits in zip(batch, logits):
            total[frame, :, y:y + tile_h, x:x + tile_w] += tile_logits * weights
    return (total / weight_sum)[:, :, :height, :width]
