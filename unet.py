"""The U-Net of the baseline (SPEC §4) as a LightningModule: model, loss, optimiser and the validation score; and the
one way every script reads a checkpoint (load_checkpoint, load_model)."""
import re

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassJaccardIndex

from augment import IGNORE
from border_core import (drop_small_instances, instances_at_score_size, instances_from_border_core,
                         typical_cell_area)
from data_files import DataError, atomic_write
from metrics import instance_dice

# A model trained with the patch recipe's scale augmentation (0.7-1.4) takes cells this much narrower or wider than
# its own as they are: resampling the frames for a small mismatch costs more than it buys (docs/real_microscopy.md).
SCALE_TOLERANCE = (0.8, 1.25)

# ------------------------------------------------------------------------------------------------------------------ model

def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


DEFAULT_WIDTHS = (32, 64, 128, 256)  # the baseline's U-Net: four levels, three poolings


class UNet(L.LightningModule):
    """1 → 3 classes (background, core, border); 1,927,907 parameters with the default widths.

    Input sides must be multiples of 2 ** (len(widths) - 1). What a checkpoint records about how it sees frames:
    patch_size 0 (the faithful recipe): frames resized to input_size x input_size. patch_size > 0 (the patch recipe):
    frames at the model's scale, where cells are `cell_width` px wide, predicted whole in tiles of tile_size;
    `intensity` names the normalisation rule (data_files.to_uint8_range). The postprocessing thresholds are in the
    model's pixels; `min_area_fraction` (0: none, as the baseline) is chosen on the validation frames after training
    (train.py --min_area_fraction).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, widths=DEFAULT_WIDTHS, lr: float = 1e-3,
                 num_epochs: int = 100, input_size: int = 512, small_center_threshold: int = 30,
                 isolated_border_threshold: int = 15, patch_size: int = 0, tile_size: int = 512,
                 cell_width: float | None = None, intensity: str = "baseline", min_area_fraction: float = 0):
        super().__init__()
        self.save_hyperparameters()
        widths = list(widths)
        self.encoder = nn.ModuleList([double_conv(in_channels, widths[0])] +
                                     [double_conv(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.upsample = nn.ModuleList([nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(widths[:-1], widths[1:])])
        self.decoder = nn.ModuleList([double_conv(2 * a, a) for a in widths[:-1]])
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.val_iou = MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=IGNORE)
        self.val_instance_dice = MeanMetric()
        self.val_frames = SumMetric()  # frames scored, over all DDP processes: each val frame exactly once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, block in zip(reversed(self.upsample), reversed(self.decoder)):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)

    def training_step(self, batch, batch_idx):
        images, targets = batch[:2]
        if self.hparams.patch_size:  # patches come with the loss's weight per pixel (ScaledFrames)
            weights = batch[2]
            pixel_loss = F.cross_entropy(self(images), targets, ignore_index=IGNORE, reduction="none")
            loss = (pixel_loss * weights).sum() / weights.sum().clamp_min(1e-6)
        else:
            loss = F.cross_entropy(self(images), targets, ignore_index=IGNORE)
        # sync_dist: under DDP the epoch's loss is the mean over all processes (reduced once, at the epoch's end)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(images),
                 sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets, gt_instances = batch[:3]
        if self.hparams.patch_size:  # whole frames at the model's scale, one per batch, tile by tile as in inference
            logits = sliding_window_logits(self, images[0], self.hparams.tile_size)[None]
        else:
            logits = self(images)
        semantic = logits.argmax(1)
        self.log("val_loss", F.cross_entropy(logits, targets, ignore_index=IGNORE), on_epoch=True,
                 batch_size=len(images), sync_dist=True)
        self.val_iou.update(semantic, targets)
        # patch recipe: the frame's own size comes with it, to go back there as inference does (instances_at_score_size)
        shapes = batch[3].tolist() if len(batch) > 3 else [None] * len(images)
        for pred_map, gt, shape in zip(semantic.cpu().numpy(), gt_instances.cpu().numpy(), shapes):
            instances = self.instances(pred_map)
            self.val_instance_dice.update(instance_dice(gt, instances_at_score_size(instances, shape or instances.shape,
                                                                                  gt.shape)))
        self.val_frames.update(len(images))
        self.log("val_iou", self.val_iou, on_epoch=True)
        self.log("val_instance_dice", self.val_instance_dice, on_epoch=True, prog_bar=True)
        self.log("val_frames", self.val_frames, on_epoch=True)

    def instances(self, semantic: np.ndarray) -> np.ndarray:
        return instances_from_border_core(semantic, *postprocess_thresholds(self))

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.num_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


# Candidates of choose_min_area_fraction: instances up to this fraction of the frame's typical cell area
# (border_core.typical_cell_area) are dropped. A fraction, not an area in px, so that the choice holds for frames
# whose cells are smaller or larger than the validation frames' (heterogeneous collections, a wrong scale).
MIN_AREA_FRACTIONS = (0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


@torch.inference_mode()
def choose_min_area_fraction(model: UNet, val_set, tolerance: float = 0.002) -> tuple[float, dict]:
    """(min_area_fraction, {candidate: mean val Instance Dice}) for a patch model: its validation frames predicted
    once, as validation_step does, then scored with each candidate of MIN_AREA_FRACTIONS. The smallest candidate
    within `tolerance` of the best wins, so a filter is kept only where it measurably helps. A post-training choice
    on validation data, in the spirit of StarDist's optimize_thresholds."""
    model.eval()
    device = next(model.parameters()).device
    scores = {fraction: [] for fraction in MIN_AREA_FRACTIONS}
    for image, _, gt, shape in val_set:
        semantic = sliding_window_logits(model, image.to(device), model.hparams.tile_size).argmax(0).cpu().numpy()
        instances = instances_from_border_core(semantic, model.hparams.small_center_threshold,
                                               model.hparams.isolated_border_threshold)
        typical = typical_cell_area(instances)
        for fraction in MIN_AREA_FRACTIONS:
            kept = drop_small_instances(instances, fraction * typical)
            scores[fraction].append(instance_dice(gt.numpy(), instances_at_score_size(kept, tuple(shape.tolist()),
                                                                                      tuple(gt.shape))))
    means = {fraction: float(np.mean(values)) if values else float("nan") for fraction, values in scores.items()}
    best = max(means.values(), default=float("nan"))
    chosen = next((fraction for fraction in MIN_AREA_FRACTIONS if means[fraction] >= best - tolerance), 0)
    return float(chosen), means


def postprocess_thresholds(model: UNet) -> tuple:
    """The arguments of instances_from_border_core after the semantic map, as the model records them."""
    return model.hparams.small_center_threshold, model.hparams.isolated_border_threshold, model.hparams.min_area_fraction


# ------------------------------------------------------------------------------------------------------------ checkpoints

# What every checkpoint that train.py writes holds (Lightning's dump_checkpoint): the run's position, the model's
# arguments and weights. Optimiser, scheduler and callback states are there too but only Lightning reads them.
CHECKPOINT_KEYS = ("global_step", "loops", "hyper_parameters", "state_dict")
WEIGHTS_KEYS = ("hyper_parameters", "state_dict")  # a weights file of export_weights (the bundled model)


class CheckpointError(DataError):
    """A file that is not a checkpoint written by train.py; the message names it and says why."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: not a checkpoint of this project ({reason})")


def _file_kind(head: bytes) -> str:
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "a TIFF image"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return f"unknown format, starts with {head[:8]!r}"


def load_checkpoint(path, map_location="cpu", keys=CHECKPOINT_KEYS) -> dict:
    """A checkpoint of train.py as a dict, read with torch.load(weights_only=True): the unpickler builds tensors and
    plain containers only and refuses any other Python object, so a planted file cannot run code. (Lightning's
    checkpoints of this model hold nothing else; no extra safe globals are needed.) Anything else raises
    CheckpointError, an unreadable file a DataError."""
    try:
        with open(path, "rb") as file:
            head = file.read(64)
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from error
    if not head:
        raise CheckpointError(path, "empty file")
    if not head.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive
        raise CheckpointError(path, f"not a PyTorch zip archive: {_file_kind(head)}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for broken files
        text = str(error)
        refused = re.search(r"GLOBAL (\S+)", text)
        if refused:
            reason = f"it holds a Python object, {refused.group(1)}, that loading would have to run; refused"
        elif isinstance(error, (RuntimeError, OSError, EOFError)):  # the zip reader's errors (it starts as a zip)
            reason = "truncated or corrupt archive"
        else:
            reason = f"unreadable: {type(error).__name__}"
        raise CheckpointError(path, reason) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(path, f"holds a {type(checkpoint).__name__}, not Lightning's checkpoint dict")
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        raise CheckpointError(path, f"no {', '.join(missing)}")
    return checkpoint


def load_model(path, map_location="cpu") -> UNet:
    """The UNet of a checkpoint of train.py (what UNet.load_from_checkpoint gives, read through load_checkpoint) or of
    a weights file of export_weights (float16 weights, read back as float32)."""
    checkpoint = load_checkpoint(path, map_location, keys=WEIGHTS_KEYS)
    hparams = checkpoint["hyper_parameters"]
    try:
        model = UNet(**hparams)
    except Exception as error:
        raise CheckpointError(path, f"hyper_parameters do not describe this U-Net: {error}") from error
    try:
        model.load_state_dict({name: value.float() if value.is_floating_point() else value
                               for name, value in checkpoint["state_dict"].items()})
    except Exception as error:
        first = str(error).strip().splitlines()
        raise CheckpointError(path, f"weights do not fit the U-Net: {first[1].strip() if len(first) > 1 else error}") \
            from error
    return model.to(map_location)

def export_weights(checkpoint_path: str, out_path: str):
    """A checkpoint's weights as float16 with its hyperparameters, nothing else: half the size, and what load_model
    reads (how the bundled model is shipped)."""
    checkpoint = load_checkpoint(checkpoint_path)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()}
    hparams = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(checkpoint["hyper_parameters"]).items()}
    atomic_write(out_path, lambda tmp: torch.save({"hyper_parameters": hparams, "state_dict": weights}, tmp), ".pt.tmp")


def record_hparams(checkpoint_path: str, **values):
    """Set hyperparameters of a checkpoint in place (atomically): what was chosen after training, such as
    min_area_fraction, travels with the weights to inference and to --export_to."""
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint["hyper_parameters"].update(values)
    atomic_write(checkpoint_path, lambda tmp: torch.save(checkpoint, tmp), ".ckpt.tmp")


# ------------------------------------------------------------------------------------------------------ tiled prediction

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
    """Pad the last two axes at the bottom and right, mirrored where the frame is large enough, else repeated."""
    pad = (0, width - image.shape[-1], 0, height - image.shape[-2])
    if pad[1] == 0 and pad[3] == 0:
        return image
    mode = "reflect" if pad[1] < image.shape[-1] and pad[3] < image.shape[-2] else "replicate"
    return F.pad(image[None], pad, mode=mode)[0]


def sliding_window_logits(model: nn.Module, image: torch.Tensor, tile_size: int = 512, overlap: float = 0.25,
                          batch_size: int = 4) -> torch.Tensor:
    """Class logits (classes x H x W, float32) of a frame of any size (channels x H x W, on the model's device).

    The frame is padded to a multiple of 2 ** poolings (8 with the default widths); if it then fits one tile it is
    predicted whole, exactly as model(frame).
    Otherwise overlapping tiles of tile_size x tile_size (`batch_size` at a time, so memory is bounded by the tile
    batch, not the frame) are predicted and their logits blended with centre-weighted maps (gaussian_weights).
    """
    height, width = image.shape[-2:]
    multiple = 2 ** (len(model.hparams.widths) - 1) if hasattr(model, "hparams") else 8
    padded_h, padded_w = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    image = pad_to(image, padded_h, padded_w)
    tile_h, tile_w = min(tile_size, padded_h), min(tile_size, padded_w)
    corners = [(y, x) for y in tile_starts(padded_h, tile_h, overlap) for x in tile_starts(padded_w, tile_w, overlap)]
    if len(corners) == 1:
        return model(image[None])[0, :, :height, :width].float()
    weights = gaussian_weights(tile_h, tile_w, image.device)
    total, weight_sum = None, torch.zeros(padded_h, padded_w, device=image.device)
    for start in range(0, len(corners), batch_size):
        batch = corners[start:start + batch_size]
        logits = model(torch.stack([image[:, y:y + tile_h, x:x + tile_w] for y, x in batch])).float()
        if total is None:
            total = torch.zeros(logits.shape[1], padded_h, padded_w, device=image.device)
        for (y, x), tile_logits in zip(batch, logits):
            total[:, y:y + tile_h, x:x + tile_w] += tile_logits * weights
            weight_sum[y:y + tile_h, x:x + tile_w] += weights
    return (total / weight_sum)[:, :height, :width]
