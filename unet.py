"""The U-Net of the baseline (docs/baseline.md §4) as a LightningModule: model, loss, optimiser and the validation
score; and the one way every script reads a checkpoint (load_checkpoint, load_model)."""
import re

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassJaccardIndex

from augment import IGNORE
from border_core import drop_small_instances, instances_from_border_core, typical_cell_area
from data_files import DataError, atomic_write
from metrics import instance_dice
from views import view_of

# ------------------------------------------------------------------------------------------------------------------ model

def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


DEFAULT_WIDTHS = (32, 64, 128, 256)  # the baseline's U-Net: four levels, three poolings

# Candidates of the size filter: instances up to this fraction of the frame's typical cell area
# (border_core.typical_cell_area) are dropped. A fraction, not an area in px, so that the choice holds for frames
# whose cells are smaller or larger than the validation frames' (heterogeneous collections, a wrong scale).
MIN_AREA_FRACTIONS = (0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
SIZE_FILTER_TOLERANCE = 0.002  # the smallest candidate within this of the best wins: a filter only where it helps


class UNet(L.LightningModule):
    """1 -> 3 classes (background, core, border); 1,927,907 parameters with the default widths.

    Input sides must be multiples of 2 ** (len(widths) - 1). What a checkpoint records about how it sees frames:
    `view` ("resized": frames resized to input_size x input_size; "tiled": frames at the model's scale, where cells
    are `cell_width` px wide, predicted whole in tiles of tile_size; views.py), `intensity` (the normalisation rule,
    data_files.to_uint8_range). The postprocessing thresholds are in the model's pixels. `min_area_fraction` is the
    size filter (0: none, as the baseline); with `choose_size_filter` every validation scores each candidate of
    MIN_AREA_FRACTIONS and keeps the best in the hyperparameters, so each checkpoint carries the filter of its epoch.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, widths=DEFAULT_WIDTHS, lr: float = 1e-3,
                 num_epochs: int = 100, view: str = "resized", input_size: int = 512, tile_size: int = 512,
                 small_center_threshold: int = 30, isolated_border_threshold: int = 15,
                 cell_width: float | None = None, intensity: str = "baseline", min_area_fraction: float = 0,
                 choose_size_filter: bool = False, dice_weight: float = 0.0, test_flips: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.view = view_of(self.hparams)
        widths = list(widths)
        self.encoder = nn.ModuleList([double_conv(in_channels, widths[0])] +
                                     [double_conv(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.upsample = nn.ModuleList([nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(widths[:-1], widths[1:])])
        self.decoder = nn.ModuleList([double_conv(2 * a, a) for a in widths[:-1]])
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.val_iou = MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=IGNORE)
        fractions = MIN_AREA_FRACTIONS if choose_size_filter else (min_area_fraction,)
        self.size_filters = fractions
        self.val_dice = nn.ModuleList([MeanMetric() for _ in fractions])  # one per size filter candidate
        self.val_frames = SumMetric()  # frames scored, over all DDP processes: each val frame exactly once

    # inference sets this (from hparams.test_flips, the recipe's choice, unless told otherwise): the logits averaged
    # over the four mirror images of the input; validation in training stays one pass
    average_flips = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.average_flips and not self.training:
            flips = ((), (-1,), (-2,), (-2, -1))
            return sum(self.forward_once(x.flip(dims)).flip(dims) for dims in flips) / 4
        return self.forward_once(x)

    def forward_once(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, block in zip(reversed(self.upsample), reversed(self.decoder)):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)

    def training_step(self, batch, batch_idx):
        # the loss's weight per pixel: 0 outside the frame, more where touching cells meet (dataset.py)
        logits = self(batch["image"])
        pixel_loss = F.cross_entropy(logits, batch["target"], ignore_index=IGNORE, reduction="none")
        loss = (pixel_loss * batch["weight"]).sum() / batch["weight"].sum().clamp_min(1e-6)
        if self.hparams.dice_weight:
            loss = loss + self.hparams.dice_weight * soft_dice_loss(logits, batch["target"])
        # sync_dist: under DDP the epoch's loss is the mean over all processes (reduced once, at the epoch's end)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(pixel_loss),
                 sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self.view.logits(self, batch["image"])
        semantic = logits.argmax(1)
        self.log("val_loss", F.cross_entropy(logits, batch["target"], ignore_index=IGNORE), on_epoch=True,
                 batch_size=len(logits), sync_dist=True)
        self.val_iou.update(semantic, batch["target"])
        for pred_map, gt, shape in zip(semantic.cpu().numpy(), batch["instances"].cpu().numpy(),
                                       batch["shape"].tolist()):
            for metric, value in zip(self.val_dice, score_frame(self, pred_map, gt, shape, self.size_filters)):
                metric.update(value)
        self.val_frames.update(len(logits))
        self.log("val_iou", self.val_iou, on_epoch=True)
        self.log("val_frames", self.val_frames, on_epoch=True)

    def on_validation_epoch_end(self):
        scores = {fraction: float(metric.compute()) for fraction, metric in zip(self.size_filters, self.val_dice)}
        for metric in self.val_dice:
            metric.reset()
        fraction = best_size_filter(scores)
        if len(scores) > 1 and not self.trainer.sanity_checking:
            self.hparams.min_area_fraction = fraction  # saved with this epoch's checkpoints
        self.log("val_instance_dice", scores[fraction], prog_bar=True)

    def instances(self, semantic: np.ndarray, min_area_fraction: float | None = None) -> np.ndarray:
        """Instances of a border-core map in the model's pixels, with the model's size filter (or the one given)."""
        fraction = self.hparams.min_area_fraction if min_area_fraction is None else min_area_fraction
        return instances_from_border_core(semantic, self.hparams.small_center_threshold,
                                          self.hparams.isolated_border_threshold, fraction)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.num_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - the mean soft Dice of the foreground classes (every class but 0), each pooled over the whole batch's pixels
    that are not IGNORE (nnU-Net's batch Dice without the background). Cross-entropy is dominated by the many easy
    pixels; this term weighs the thin border class as much as the cores, which is what splits touching cells.

    >>> target = torch.tensor([[[0, 1], [2, IGNORE]]])
    >>> perfect = F.one_hot(target.clamp_max(2), 3).permute(0, 3, 1, 2).float() * 100
    >>> round(float(soft_dice_loss(perfect, target)), 4)
    0.0
    >>> # undecided: each of the 3 valid pixels 1/3 on each class; per class overlap 1/3, total 1 + 1: Dice 1/3
    >>> round(float(soft_dice_loss(torch.zeros(1, 3, 2, 2), target)), 4)
    0.6667
    """
    classes = logits.shape[1]
    valid = (target != IGNORE).unsqueeze(1)
    probabilities = logits.softmax(1) * valid
    one_hot = F.one_hot(target.masked_fill(~valid[:, 0], 0), classes).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    overlap = (probabilities * one_hot).sum(dims)[1:]
    total = (probabilities.sum(dims) + one_hot.sum(dims))[1:]
    return 1 - ((2 * overlap + smooth) / (total + smooth)).mean()


# ------------------------------------------------------------------------------------------------------------------ score

def score_frame(model: UNet, semantic: np.ndarray, gt: np.ndarray, frame_shape, fractions=(0,)) -> list[float]:
    """Instance Dice of one predicted border-core map against the frame's ground truth at the score size, once per
    size filter in `fractions`: the score of validation, of the size filter's choice and of the fine-tuning rate's.
    The instances go to the score size as the model's view says (as inference writes them)."""
    instances = model.instances(semantic, 0)
    typical = typical_cell_area(instances) if any(fractions) else 0
    return [instance_dice(gt, model.view.instances_at(drop_small_instances(instances, f * typical) if f else instances,
                                                      tuple(frame_shape), gt.shape))
            for f in fractions]


def best_size_filter(scores: dict) -> float:
    """The smallest candidate within SIZE_FILTER_TOLERANCE of the best score (StarDist's optimize_thresholds in
    spirit: a choice made on the validation frames)."""
    best = max(scores.values(), default=float("nan"))
    return float(next((f for f in sorted(scores) if scores[f] >= best - SIZE_FILTER_TOLERANCE), min(scores)))


@torch.inference_mode()
def validation_score(model: UNet, val_set, device="cpu") -> tuple[float, float]:
    """Mean Instance Dice of a model on a validation set with the best size filter, outside a Trainer, and that
    filter (a min_area_fraction)."""
    model = model.to(device).eval()
    scores = {fraction: [] for fraction in model.size_filters}  # the candidates its validation loop would weigh
    for item in val_set:
        semantic = model.view.logits(model, item["image"][None].to(device)).argmax(1)[0].cpu().numpy()
        for fraction, value in zip(model.size_filters, score_frame(model, semantic, item["instances"].numpy(),
                                                                   item["shape"].tolist(), model.size_filters)):
            scores[fraction].append(value)
    means = {fraction: float(np.mean(values)) for fraction, values in scores.items()}
    fraction = best_size_filter(means)
    return means[fraction], fraction


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


def load_model(path, map_location="cpu", test_flips: str = "auto") -> UNet:
    """The UNet of a checkpoint of train.py (what UNet.load_from_checkpoint gives, read through load_checkpoint) or of
    a weights file of export_weights (float16 weights, read back as float32), set to predict with test-time flips
    where its recipe chose them (hparams.test_flips; test_flips "on" or "off" overrides)."""
    checkpoint = load_checkpoint(path, map_location, keys=WEIGHTS_KEYS)
    hparams = legacy_hparams(dict(checkpoint["hyper_parameters"]))
    if hparams.get("cell_width") is not None and not np.isfinite(float(hparams["cell_width"])):
        raise CheckpointError(path, "cell_width is not a number")
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
    model.average_flips = bool(model.hparams.test_flips) if test_flips == "auto" else test_flips == "on"
    return model.to(map_location)


def legacy_hparams(hparams: dict) -> dict:
    """Hyperparameters of checkpoints written before views had names (the bundled model among them): patch_size > 0
    meant the tiled view; patch_size itself is a training setting, not the model's."""
    if "view" not in hparams:
        hparams["view"] = "tiled" if hparams.get("patch_size") else "resized"
    hparams.pop("patch_size", None)
    return hparams


def export_weights(checkpoint_path: str, out_path: str):
    """A checkpoint's weights as float16 with its hyperparameters, nothing else: half the size, and what load_model
    reads (how the bundled model is shipped)."""
    checkpoint = load_checkpoint(checkpoint_path)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()}
    hparams = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(checkpoint["hyper_parameters"]).items()}
    atomic_write(out_path, lambda tmp: torch.save({"hyper_parameters": hparams, "state_dict": weights}, tmp), ".pt.tmp")
