"""How a model sees frames: its "view", chosen once by the recipe and recorded in the checkpoint (hparams.view).

    resized   the original baseline's (docs/baseline.md §4): every frame resized to input_size x input_size, frames
              batched; its instance map goes straight to the challenge's 256 x 256
    tiled     frames at the model's scale (resampled so that cells are the model's cell_width wide), predicted whole
              in overlapping tiles laid out for the device (tiling.py; tile_size bounds a GPU's tiles); the
              instances go back to the frame's own size before 256 x 256

Every layer that depends on the view (training data, validation, inference) asks the view object, never the recipe.
"""
import numpy as np
import torch

from border_core import instances_at_score_size, resize_nearest
from data_files import rescale, to_uint8_range
from tiling import TILES_PER_PASS, sliding_window_logits


class Resized:
    name, rescales = "resized", False

    def __init__(self, input_size: int = 512):
        self.input_size = input_size

    def image(self, image: np.ndarray, intensity: str, scale: float = 1.0) -> np.ndarray:
        """The frame as the model sees it, float32 on the 0..255 scale (`scale` does not apply)."""
        return resize_nearest(to_uint8_range(image, intensity), (self.input_size, self.input_size))

    def logits(self, model, images: torch.Tensor, tile_batch: int | None = None, tiling: str = "auto") -> torch.Tensor:
        """Logits of a batch of frames, `tile_batch` frames per forward pass (default: TILES_PER_PASS of the device:
        one at a time on a CPU, where a batch costs more per pixel than its frames one by one)."""
        per_pass = tile_batch or TILES_PER_PASS.get(images.device.type, TILES_PER_PASS["cpu"])
        if len(images) <= per_pass:
            return model(images)
        return torch.cat([model(images[start:start + per_pass]) for start in range(0, len(images), per_pass)])

    def instances_at(self, instances: np.ndarray, frame_shape, size) -> np.ndarray:
        return resize_nearest(instances, size)

    def input_shape(self, frame_shape, scale: float = 1.0) -> tuple[int, int]:
        """The size of the frame as the model sees it (self.image's shape), known before the frame is read."""
        return self.input_size, self.input_size


class Tiled:
    name, rescales = "tiled", True

    def __init__(self, tile_size: int = 512, tile_batch: int | None = None):
        self.tile_size, self.tile_batch = tile_size, tile_batch

    def image(self, image: np.ndarray, intensity: str, scale: float = 1.0) -> np.ndarray:
        return rescale(to_uint8_range(image, intensity), scale)

    def logits(self, model, images: torch.Tensor, tile_batch: int | None = None, tiling: str = "auto") -> torch.Tensor:
        """Logits of a batch of frames of one size, in the tile layout chosen for the images' device (tiling.py:
        "auto"; "fixed": tiles of tile_size), `tile_batch` tiles per forward pass (default: the view's, else
        tiling.TILES_PER_PASS of the device)."""
        return sliding_window_logits(model, images, self.tile_size, batch_size=tile_batch or self.tile_batch,
                                     tiling=tiling)

    def instances_at(self, instances: np.ndarray, frame_shape, size) -> np.ndarray:
        return instances_at_score_size(instances, frame_shape, size)

    def input_shape(self, frame_shape, scale: float = 1.0) -> tuple[int, int]:
        """The size of the frame as the model sees it (self.image's shape: data_files.rescale's rounding)."""
        if scale == 1:
            return tuple(frame_shape)
        return max(1, round(frame_shape[0] * scale)), max(1, round(frame_shape[1] * scale))


def view_of(hparams) -> Resized | Tiled:
    """The view a model records: hparams.view, or for checkpoints written before views had names, patch_size > 0."""
    name = hparams.get("view") or ("tiled" if hparams.get("patch_size") else "resized")
    if name == "tiled":
        return Tiled(hparams.get("tile_size", 512))
    if name == "resized":
        return Resized(hparams.get("input_size", 512))
    raise ValueError(f"unknown view {name!r}: 'resized' or 'tiled'")
