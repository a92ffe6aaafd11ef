"""Tiled prediction: the class logits of a frame of any size from a fully convolutional model, tile by tile, blended
with centre-weighted maps as nnU-Net's sliding window does. Memory is bounded by a batch of tiles, not by the frame."""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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


def sliding_window_logits(model: nn.Module, images: torch.Tensor, tile_size: int = 512, overlap: float = 0.25,
                          batch_size: int = 4) -> torch.Tensor:
    """Class logits (classes x H x W, float32) of a frame of any size (channels x H x W, on the model's device), or
    B x classes x H x W of a batch of frames of one size (B x channels x H x W): each frame's logits are those it gets
    alone, its tiles only sharing forward passes with the other frames' tiles.

    The frames are padded to a multiple of 2 ** poolings (8 with the default widths); if they then fit one tile they
    are predicted whole, exactly as model(frames), `batch_size` frames at a time.
    Otherwise overlapping tiles of tile_size x tile_size (`batch_size` per forward pass, taken from all frames of the
    batch, so memory is bounded by the tile batch and the frames' logits) are predicted and their logits blended with
    centre-weighted maps (gaussian_weights).
    """
    if images.ndim == 3:
        return sliding_window_logits(model, images[None], tile_size, overlap, batch_size)[0]
    frames, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    multiple = 2 ** (len(model.hparams.widths) - 1) if hasattr(model, "hparams") else 8
    padded_h, padded_w = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    images = pad_to(images, padded_h, padded_w)
    tile_h, tile_w = min(tile_size, padded_h), min(tile_size, padded_w)
    corners = [(y, x) for y in tile_starts(padded_h, tile_h, overlap) for x in tile_starts(padded_w, tile_w, overlap)]
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
