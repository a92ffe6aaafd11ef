"""The U-Net of the baseline (SPEC §4) as a LightningModule, and the border-core → instances postprocessing (SPEC §5)."""
from collections import deque
from functools import partial

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassJaccardIndex

from dataset import BORDER, CORE, resize_nearest
from eval import instance_dice

SCORE_SIZE = (256, 256)  # predictions are written and scored at 256 x 256 (SPEC §5, §6)
CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connectivity, as acvl-utils 0.2.6


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


# --------------------------------------------------------------------------------------------------------- postprocessing

def instances_from_border_core(semantic: np.ndarray, small_center_threshold: int = 30,
                               isolated_border_threshold: int = 15) -> np.ndarray:
    """Instance map (uint32, labels 1..N) from a 2-D border-core map (0 background, 1 core, 2 border).

    Pixel for pixel the output of acvl-utils 0.2.6 `convert_semantic_to_instanceseg(semantic[None],
    small_center_threshold=30, isolated_border_as_separate_instance_threshold=15)[0]`, computed for all cells at once:
    cores of at most `small_center_threshold` px become border; the remaining 4-connected cores are the seeds, numbered
    in raster order; a 4-connected foreground component without a seed becomes an instance of its own (numbered after
    the seeds) if it has more than `isolated_border_threshold` px; every other border pixel takes the seed nearest to it
    along 4-connected paths inside its component, ties going to the higher seed label. The input is not modified.
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
    return labels.astype(np.uint32)


# -------------------------------------------------------------------------------------------------------------- inference

def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.inference_mode()
def border_core_maps(model: UNet, loader, device: str | torch.device = "auto"):
    """Yield (indices, uint8 border-core maps) per batch of a loader of (images, indices).

    On the GPU when there is one (the baseline left the model on the CPU), there in float16 autocast and
    channels_last, the layout its tensor cores prefer. Only the argmax (1 byte per pixel) comes back to the host.
    """
    device = pick_device(device) if isinstance(device, str) else device
    cuda = device.type == "cuda"
    model = model.to(device).eval()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    for images, indices in loader:
        images = images.to(device, non_blocking=True)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            semantic = model(images).argmax(1).to(torch.uint8)
        yield indices.tolist(), semantic.cpu().numpy()


def instances_at_size(semantic: np.ndarray, output_size=SCORE_SIZE, small_center_threshold: int = 30,
                      isolated_border_threshold: int = 15) -> np.ndarray:
    """Border-core map -> instances -> nearest-neighbour resize to output_size (what the challenge scores)."""
    instances = instances_from_border_core(semantic, small_center_threshold, isolated_border_threshold)
    return resize_nearest(instances, output_size)


def predict_instance_segmentation_from_border_core(model: UNet, loader, device: str | torch.device = "auto",
                                                   output_size: tuple[int, int] = SCORE_SIZE, pool=None):
    """Run the model over a loader of (images, indices) batches; yield (index, instance map at output_size) in order.

    With a multiprocessing pool, a batch's postprocessing runs in the pool while the model works on the next batch.
    """
    postprocess = partial(instances_at_size, output_size=output_size,
                          small_center_threshold=model.hparams.small_center_threshold,
                          isolated_border_threshold=model.hparams.isolated_border_threshold)
    pending = deque()
    for indices, maps in border_core_maps(model, loader, device):
        if pool is None:
            yield from zip(indices, map(postprocess, maps))
            continue
        pending.append((indices, pool.map_async(postprocess, list(maps))))
        while pending and (len(pending) > 2 or pending[0][1].ready()):
            done_indices, result = pending.popleft()
            yield from zip(done_indices, result.get())
    for done_indices, result in pending:
        yield from zip(done_indices, result.get())
