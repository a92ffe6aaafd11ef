"""Training data: labelled frames as the model's view sees them, border-core targets, the baseline's transforms and
the LightningDataModule. Files are read and written by data_files.py; how a view sees a frame is views.py.

    training_sets(frames, recipe, ...)   the one place where the recipe's view picks the training data
    ResizedFrames     the original baseline's: whole frames resized, flips and brightness/contrast (docs/baseline.md §4)
    ScaledFrames      frames at the model's scale: random augmented patches for training, whole frames for validation
    UnlabelledFrames  frames (files or arrays) for prediction, read lazily
"""
import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from augment import IGNORE, foreground_pixels, random_patch
from border_core import SCORE_SIZE, border_core_targets, contact_pixels, resize_nearest
from data_files import DataError, Frame, compact_labels, list_frames, read_mask, read_tiff_2d, rescale
from scale import median_cell_width, representable_width, training_scales
from views import Resized, Tiled


# -------------------------------------------------------------------------------------------------------------- transforms

def normalise(image: torch.Tensor) -> torch.Tensor:
    """The baseline's Normalize(mean=0.5, std=0.25, max_pixel_value=255)."""
    return (image / 255.0 - 0.5) / 0.25


def random_horizontal_flip(image: torch.Tensor, target: torch.Tensor, p: float = 0.5):
    if torch.rand(()) < p:
        return image.flip(-1), target.flip(-1)
    return image, target


def random_brightness_contrast(image: torch.Tensor, p: float = 0.2, limit: float = 0.2) -> torch.Tensor:
    """albumentations' RandomBrightnessContrast(0.2, 0.2, p=0.2) on a 0..255 image: x * contrast + brightness * 255."""
    if torch.rand(()) >= p:
        return image
    contrast = 1.0 + (torch.rand(()) * 2 - 1) * limit
    brightness = (torch.rand(()) * 2 - 1) * limit * 255.0
    return (image * contrast + brightness).clamp(0, 255)


# ---------------------------------------------------------------------------------------------------------------- datasets

def read_labelled(frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """(image, instance labels as int64) of a frame, each decoded and checked once."""
    image = read_tiff_2d(frame.image_path)
    return image, compact_labels(read_mask(frame.mask_path, image.shape, frame.image_path))


def validation_item(image: np.ndarray, labels: np.ndarray, frame_shape) -> dict:
    """A whole validation frame as the model sees it: image, its targets, the ground truth at the score size and the
    frame's own size (to go back there as inference does)."""
    return {"image": normalise(torch.from_numpy(np.asarray(image, np.float32))[None]),
            "target": torch.from_numpy(border_core_targets(labels).astype(np.int64)),
            "instances": torch.from_numpy(resize_nearest(labels, SCORE_SIZE)),
            "shape": torch.tensor(frame_shape)}


class ResizedFrames(Dataset):
    """Frames with masks, decoded, turned into targets and resized to input_size once, then kept in memory (float16
    images on the 0..255 scale: exact for uint8, 1/8 grey level for deeper data). As a training set each item gets
    the baseline's random flip and brightness/contrast; every pixel weighs the same in the loss."""

    def __init__(self, frames: list[Frame], view: Resized, intensity: str, train: bool = False):
        if not frames:
            raise DataError("no frames given")
        self.frames, self.train, size = frames, train, view.input_size
        self.images = np.empty((len(frames), size, size), np.float16)
        self.targets = np.empty((len(frames), size, size), np.uint8)
        self.instances = np.empty((len(frames), *SCORE_SIZE), np.int64)
        self.shapes = []
        for i, frame in enumerate(frames):
            image, labels = read_labelled(frame)
            self.images[i] = view.image(image, intensity)
            self.targets[i] = resize_nearest(border_core_targets(labels), (size, size))
            self.instances[i] = resize_nearest(labels, SCORE_SIZE)
            self.shapes.append(image.shape)

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, index):
        image = torch.from_numpy(self.images[index].astype(np.float32))[None]
        target = torch.from_numpy(self.targets[index].astype(np.int64))
        if self.train:
            image, target = random_horizontal_flip(image, target)
            image = random_brightness_contrast(image)
            return {"image": normalise(image), "target": target, "weight": torch.ones(target.shape)}
        return {"image": normalise(image), "target": target, "instances": torch.from_numpy(self.instances[index]),
                "shape": torch.tensor(self.shapes[index])}


class ScaledFrames(Dataset):
    """Frames with masks at the model's scale, kept in memory. `labelled`: (sequence, image, labels) triples at the
    frames' own size; `scales`: {sequence: factor}, so that sequences whose cells differ in width all reach the
    model's cell width.

    With `patches_per_epoch` (a training set) an item is a random augmented patch (augment.random_patch): image,
    target (IGNORE outside the frame) and the loss's weight per pixel (0 outside the frame, 1 + contact_weight where
    touching cells meet, 1 elsewhere); an epoch is that many patches, however few the frames. Without it (a
    validation set) an item is a whole frame (validation_item).
    """

    def __init__(self, labelled: list, scales: dict, intensity: str, patch_size: int = 256,
                 patches_per_epoch: int | None = None, augment: bool = True, turn: bool = True,
                 photometric: bool = True, contact_weight: float = 0.0, zoom: tuple = (0.7, 1.4)):
        if not labelled:
            raise DataError("no frames given")
        self.scales, self.patch_size, self.patches_per_epoch, self.augment = scales, patch_size, patches_per_epoch, \
            augment
        self.turn, self.photometric, self.contact_weight, self.zoom = turn, photometric, contact_weight, zoom
        view = Tiled()
        self.images, self.masks, self.foreground, self.instances, self.shapes = [], [], [], [], []
        for sequence, image, labels in labelled:
            self.images.append(view.image(image, intensity, scales[sequence]).astype(np.float16))
            self.masks.append(rescale(labels, scales[sequence], order=0))
            self.foreground.append(foreground_pixels(self.masks[-1]))
            self.instances.append(resize_nearest(labels, SCORE_SIZE))
            self.shapes.append(image.shape)

    def __len__(self):
        return self.patches_per_epoch or len(self.images)

    def __getitem__(self, index):
        if self.patches_per_epoch is None:
            item = validation_item(self.images[index], self.masks[index], self.shapes[index])
            item["instances"] = torch.from_numpy(self.instances[index])
            return item
        # torch's generator is seeded per loader worker (seed_everything(workers=True)): reproducible patches
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, ())))
        k = int(rng.integers(len(self.images)))
        patch, target, labels = random_patch(self.images[k], self.masks[k], self.patch_size, rng, self.foreground[k],
                                             self.augment, scale_range=self.zoom, turn=self.turn,
                                             intensity=self.photometric)
        weight = (target != IGNORE).astype(np.float32)
        if self.contact_weight:
            weight[contact_pixels(labels) & (target != IGNORE)] += self.contact_weight
        return {"image": normalise(torch.from_numpy(patch)[None]), "target": torch.from_numpy(target.astype(np.int64)),
                "weight": torch.from_numpy(weight)}


def training_sets(train_frames: list[Frame], val_frames: list[Frame], recipe, model_cell_width: float | None = None,
                  inherited_cell_width: float | None = None):
    """(train set, val set, the model's cell width or None) as the recipe's view sees the labelled frames. Every
    frame is decoded and checked here, before a run folder exists (DataError on the first bad one).

    Resized view: frames resized to the recipe's input_size, no scale. Tiled view: the cells' width is measured in
    each sequence's masks and each sequence rescaled to the model's width (scale.training_scales)."""
    if not train_frames or not val_frames:
        raise DataError("no frames given")
    if recipe.view == "resized":
        view = Resized(recipe.input_size)
        return (ResizedFrames(train_frames, view, recipe.intensity, train=True),
                ResizedFrames(val_frames, view, recipe.intensity), None)
    train = [(f.sequence, *read_labelled(f)) for f in train_frames]
    val = [(f.sequence, *read_labelled(f)) for f in val_frames]
    widths = {}
    for sequence, _, labels in train + val:
        widths.setdefault(sequence, []).append(labels)
    widths = {sequence: median_cell_width(masks) for sequence, masks in widths.items()}
    if not np.isfinite([widths[f.sequence] for f in train_frames]).any():
        raise DataError(f"{train_frames[0].mask_path}: the training masks hold no cell")
    validation_only = {f.sequence for f in val_frames} - {f.sequence for f in train_frames}
    own_width = float(np.nanmedian(list(widths.values())))
    from_scratch = model_cell_width is None and inherited_cell_width is None
    if from_scratch and recipe.max_cell_width and own_width > recipe.max_cell_width:
        # from scratch, large cells: shrunk to max_cell_width, where a patch holds several cells and a frame costs
        # fewer pixels (Cellpose brings every cell to one diameter the same way)
        model_cell_width = float(recipe.max_cell_width)
    elif from_scratch and recipe.min_ceiling:
        # from scratch: the narrowest scale at which the representation holds the training cells (a sample of frames)
        sample = [labels for _, _, labels in train[::max(1, len(train) // 8)]]
        width, _ = representable_width(sample, own_width, recipe.min_ceiling)
        model_cell_width = width if width > own_width else None
    cell_width, scales = training_scales(widths, model_cell_width, inherited_cell_width, validation_only)
    train_set = ScaledFrames(train, scales, recipe.intensity, recipe.patch_size, recipe.patches_per_epoch,
                             recipe.augment, turn=recipe.turn, photometric=recipe.photometric,
                             contact_weight=recipe.contact_weight, zoom=(recipe.min_zoom, recipe.max_zoom))
    return train_set, ScaledFrames(val, scales, recipe.intensity), cell_width


class UnlabelledFrames(Dataset):
    """Frames for prediction, read lazily (in the loader's workers): files (Frame) or arrays, as `view` sees them, at
    `scale` (one for all frames, or one per frame; tiled view). Item: (image 1 x H x W float, index)."""

    def __init__(self, frames: list, view, intensity: str, scale: float | list[float] = 1.0):
        if not len(frames):
            raise DataError("no frames given")
        self.frames, self.view, self.intensity, self.scale = frames, view, intensity, scale

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, index):
        frame = self.frames[index]
        image = read_tiff_2d(frame.image_path) if isinstance(frame, Frame) else np.asarray(frame)
        scale = self.scale[index] if isinstance(self.scale, (list, tuple)) else self.scale
        return normalise(torch.from_numpy(self.view.image(image, self.intensity, scale))[None]), index


# ---------------------------------------------------------------------------------------------------------- data module

def labelled_frames(root_dir: str, sequences) -> list[Frame]:
    return [f for sequence in sequences for f in list_frames(root_dir, sequence, with_masks=True)]


class CellDataModule(L.LightningDataModule):
    """Loaders over a train and a val set made beforehand (training_sets): every frame is read and checked before
    the Trainer exists. Validation frames go one per batch in the tiled view (frames may differ in size)."""

    def __init__(self, train_set: Dataset, val_set: Dataset, batch_size: int, val_batch_size: int,
                 num_workers: int = 2):
        super().__init__()
        self.train_set, self.val_set = train_set, val_set
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers

    def _loader(self, dataset, batch_size: int, shuffle: bool = False, sampler=None):
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self):
        """Each val frame exactly once. Under DDP Lightning would give the val loader a DistributedSampler, which pads
        the val set with repeated frames to a multiple of the number of processes: those would be scored twice.
        Lightning's UnrepeatedDistributedSampler (the one it uses for predict) gives each process a disjoint share
        instead. Shares may differ by a batch; safe in validation, which runs no collective per step (DDP syncs no
        buffers without grad; the metrics are reduced once, at the epoch's end)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size == 1:
            return self._loader(self.val_set, self.val_batch_size)
        sampler = UnrepeatedDistributedSampler(self.val_set, shuffle=False, **trainer.distributed_sampler_kwargs)
        return self._loader(self.val_set, self.val_batch_size, sampler=sampler)
