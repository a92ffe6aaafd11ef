"""The U-Net of the baseline (SPEC §4) as a LightningModule: model, loss, optimiser and the validation score."""
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassJaccardIndex

from border_core import instances_from_border_core, resize_nearest
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
