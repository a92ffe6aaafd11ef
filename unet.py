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

from border_core import instances_from_border_core, resize_nearest
from dataset import DataError
from metrics import instance_dice


# ------------------------------------------------------------------------------------------------------------------ model

def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


class UNet(L.LightningModule):
    """1 → 3 classes (background, core, border); 1,927,907 parameters with the default widths.

    Input sides must be multiples of 2 ** (len(widths) - 1); the data module resizes every frame to input_size.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, widths=(32, 64, 128, 256), lr: float = 1e-3,
                 num_epochs: int = 100, input_size: int = 512, small_center_threshold: int = 30,
                 isolated_border_threshold: int = 15):
        super().__init__()
        self.save_hyperparameters()
        widths = list(widths)
        self.encoder = nn.ModuleList([double_conv(in_channels, widths[0])] +
                                     [double_conv(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.upsample = nn.ModuleList([nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(widths[:-1], widths[1:])])
        self.decoder = nn.ModuleList([double_conv(2 * a, a) for a in widths[:-1]])
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.val_iou = MulticlassJaccardIndex(num_classes=num_classes, average="macro")
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
        images, targets, _ = batch
        loss = F.cross_entropy(self(images), targets)
        # sync_dist: under DDP the epoch's loss is the mean over all processes (reduced once, at the epoch's end)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(images),
                 sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets, gt_instances = batch
        logits = self(images)
        semantic = logits.argmax(1)
        self.log("val_loss", F.cross_entropy(logits, targets), on_epoch=True, batch_size=len(images), sync_dist=True)
        self.val_iou.update(semantic, targets)
        for pred_map, gt in zip(semantic.cpu().numpy(), gt_instances.cpu().numpy()):
            instances = self.instances(pred_map)
            self.val_instance_dice.update(instance_dice(gt, resize_nearest(instances, gt.shape)))
        self.val_frames.update(len(images))
        self.log("val_iou", self.val_iou, on_epoch=True)
        self.log("val_instance_dice", self.val_instance_dice, on_epoch=True, prog_bar=True)
        self.log("val_frames", self.val_frames, on_epoch=True)

    def instances(self, semantic: np.ndarray) -> np.ndarray:
        return instances_from_border_core(semantic, self.hparams.small_center_threshold,
                                          self.hparams.isolated_border_threshold)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.num_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


# ------------------------------------------------------------------------------------------------------------ checkpoints

# What every checkpoint that train.py writes holds (Lightning's dump_checkpoint): the run's position, the model's
# arguments and weights. Optimiser, scheduler and callback states are there too but only Lightning reads them.
CHECKPOINT_KEYS = ("global_step", "loops", "hyper_parameters", "state_dict")


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


def load_checkpoint(path, map_location="cpu") -> dict:
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
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(path, f"no {', '.join(missing)}")
    return checkpoint


def load_model(path, map_location="cpu") -> UNet:
    """The UNet of a checkpoint of train.py (what UNet.load_from_checkpoint gives, read through load_checkpoint)."""
    checkpoint = load_checkpoint(path, map_location)
    hparams = checkpoint["hyper_parameters"]
    try:
        model = UNet(**hparams)
    except Exception as error:
        raise CheckpointError(path, f"hyper_parameters do not describe this U-Net: {error}") from error
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except Exception as error:
        first = str(error).strip().splitlines()
        raise CheckpointError(path, f"weights do not fit the U-Net: {first[1].strip() if len(first) > 1 else error}") \
            from error
    return model.to(map_location)
