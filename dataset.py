"""Training data: the frames as the model sees them (resized, or at the model's scale in random augmented patches),
border-core targets, the baseline's transforms and the LightningDataModule. The files themselves are read and written
by data_files.py.
"""
import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from augment import IGNORE, foreground_pixels, random_patch
from border_core import border_core_targets, contact_pixels, resize_nearest
from data_files import (DataError, Frame, compact_labels, default_sequences, list_frames, read_mask, read_tiff_2d,
                        rescale, to_uint8_range)


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
# Two views of the frames. The faithful recipe (SPEC §4) resizes every frame to one square input_size. The patch
# recipe keeps each frame at the model's scale (its own, times `scale`), trains on random patches of it and predicts
# it whole, tile by tile.

def load_image(frame: Frame, input_size: int, intensity: str = "baseline") -> tuple[np.ndarray, tuple[int, int]]:
    """Image at input_size x input_size on the 0..255 scale (float32), and its size on disk (the faithful view)."""
    image = read_tiff_2d(frame.image_path)
    return resize_nearest(to_uint8_range(image, intensity), (input_size, input_size)), image.shape


def load_scaled(frame: Frame, scale: float = 1.0, intensity: str = "percentile") -> tuple[np.ndarray, tuple[int, int]]:
    """Image at the model's scale on the 0..255 scale (float32), and its size on disk (the patch recipe's view)."""
    image = read_tiff_2d(frame.image_path)
    return rescale(to_uint8_range(image, intensity), scale), image.shape


class LabelledFrames(Dataset):
    """Frames with masks, decoded, turned into targets and resized once, then kept in memory (the faithful recipe).

    Item: (image 1 x S x S float, target S x S long, gt instances at score_size x score_size int64).
    Images are kept as float16 on the 0..255 scale: exact for uint8 data, 1/8 grey level for deeper data.
    """

    def __init__(self, frames: list[Frame], input_size: int = 512, train: bool = False, score_size: int = 256,
                 intensity: str = "baseline"):
        if not frames:
            raise DataError("no frames given")
        self.frames, self.train = frames, train
        size = (input_size, input_size)
        self.images = np.empty((len(frames), input_size, input_size), np.float16)
        self.targets = np.empty((len(frames), input_size, input_size), np.uint8)
        self.instances = np.empty((len(frames), score_size, score_size), np.int64)
        for i, frame in enumerate(frames):
            image, shape = load_image(frame, input_size, intensity)
            mask = read_mask(frame.mask_path, shape, frame.image_path)
            self.images[i] = image
            self.targets[i] = resize_nearest(border_core_targets(mask), size)
            self.instances[i] = resize_nearest(compact_labels(mask), (score_size, score_size))

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, index):
        image = torch.from_numpy(self.images[index].astype(np.float32))[None]
        target = torch.from_numpy(self.targets[index].astype(np.int64))
        if self.train:
            image, target = random_horizontal_flip(image, target)
            image = random_brightness_contrast(image)
        return normalise(image), target, torch.from_numpy(self.instances[index])


class ScaledFrames(Dataset):
    """Frames with masks at the model's scale, read once and kept in memory (the patch recipe).

    `scale`: one factor for every frame, or one per sequence name ({sequence: factor}), so that sequences whose cells
    differ in width all reach the model's cell width. As a training set (`patches_per_epoch` given) an item is a
    random augmented patch (`augment.random_patch`; `photometric` False leaves out its gamma, contrast, brightness,
    blur and noise): (image 1 x P x P, target P x P with augment.IGNORE outside the frame, the loss's weights P x P:
    0 outside the frame, 1 + `contact_weight` where touching cells meet, 1 elsewhere); an epoch is that many patches,
    however few the frames. As a validation set an item is a whole frame: (image 1 x H x W, target H x W, gt
    instances at score_size x score_size, the frame's own size), H x W its size at the model's scale.
    """

    def __init__(self, frames: list[Frame], scale: float | dict = 1.0, intensity: str = "percentile",
                 patch_size: int = 256, patches_per_epoch: int | None = None, augment: bool = True,
                 score_size: int = 256, turn: bool = True, contact_weight: float = 0.0, elastic: float = 0.0,
                 photometric: bool = True):
        if not frames:
            raise DataError("no frames given")
        self.frames, self.patch_size, self.patches_per_epoch, self.augment = frames, patch_size, patches_per_epoch, augment
        self.turn, self.contact_weight, self.elastic, self.photometric = turn, contact_weight, elastic, photometric
        self.images, self.masks, self.foreground, self.instances, self.shapes = [], [], [], [], []
        for frame in frames:
            frame_scale = scale[frame.sequence] if isinstance(scale, dict) else scale
            image, shape = load_scaled(frame, frame_scale, intensity)
            mask = compact_labels(read_mask(frame.mask_path, shape, frame.image_path))
            self.images.append(image.astype(np.float16))
            self.masks.append(rescale(mask, frame_scale, order=0))
            self.foreground.append(foreground_pixels(self.masks[-1]))
            self.instances.append(resize_nearest(mask, (score_size, score_size)))
            self.shapes.append(shape)

    def __len__(self):
        return self.patches_per_epoch or len(self.frames)

    def __getitem__(self, index):
        if self.patches_per_epoch is None:
            image = torch.from_numpy(self.images[index].astype(np.float32))[None]
            target = torch.from_numpy(border_core_targets(self.masks[index]).astype(np.int64))
            return normalise(image), target, torch.from_numpy(self.instances[index]), torch.tensor(self.shapes[index])
        # torch's generator is seeded per loader worker (seed_everything(workers=True)): reproducible patches
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, ())))
        k = int(rng.integers(len(self.frames)))
        patch, target, labels = random_patch(self.images[k], self.masks[k], self.patch_size, rng, self.foreground[k],
                                             self.augment, turn=self.turn, elastic=self.elastic,
                                             intensity=self.photometric)
        # the loss's weight per pixel: 0 outside the frame, 1 + contact_weight where touching cells meet
        weights = (target != IGNORE).astype(np.float32)
        if self.contact_weight:
            weights[contact_pixels(labels) & (target != IGNORE)] += self.contact_weight
        return normalise(torch.from_numpy(patch)[None]), torch.from_numpy(target.astype(np.int64)), \
            torch.from_numpy(weights)


class UnlabelledFrames(Dataset):
    """Frames for prediction, read lazily (in the loader's workers). Item: (image 1 x H x W float, index): resized to
    input_size x input_size (faithful view) or, with `scale` (one for all frames, or a list with one per frame), at
    the model's scale (patch view)."""

    def __init__(self, frames: list[Frame], input_size: int = 512, scale: float | list[float] | None = None,
                 intensity: str = "baseline"):
        if not frames:
            raise DataError("no frames given")
        self.frames, self.input_size, self.scale, self.intensity = frames, input_size, scale, intensity

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, index):
        if self.scale is None:
            image, _ = load_image(self.frames[index], self.input_size, self.intensity)
        else:
            scale = self.scale[index] if isinstance(self.scale, (list, tuple)) else self.scale
            image, _ = load_scaled(self.frames[index], scale, self.intensity)
        return normalise(torch.from_numpy(image)[None]), index


# ---------------------------------------------------------------------------------------------------------- data module

class CellDataModule(L.LightningDataModule):
    """Train and val loaders over sequences chosen by name (defaults by layout, see DEFAULT_SEQUENCES).

    patch_size 0: the faithful recipe, whole frames resized to input_size. Otherwise the patch recipe: frames at the
    model's scale (their own times `scale`), patches_per_epoch random augmented patches per epoch; validation on
    whole frames, one per batch (frames of different sequences may differ in size).
    """

    def __init__(self, root_dir: str, train_seqs=None, val_seqs=None, batch_size: int = 16, input_size: int = 512,
                 num_workers: int = 2, patch_size: int = 0, patches_per_epoch: int = 512, scale: float = 1.0,
                 intensity: str = "baseline", augment: bool = True, turn: bool = True, contact_weight: float = 0.0,
                 elastic: float = 0.0, photometric: bool = True):
        super().__init__()
        self.root_dir, self.batch_size, self.input_size, self.num_workers = root_dir, batch_size, input_size, num_workers
        self.patch_size, self.patches_per_epoch, self.scale = patch_size, patches_per_epoch, scale
        self.intensity, self.augment, self.turn, self.contact_weight = intensity, augment, turn, contact_weight
        self.elastic, self.photometric = elastic, photometric
        self.sequences = {
            "train": list(train_seqs or default_sequences(root_dir, "train")),
            "val": list(val_seqs or default_sequences(root_dir, "val")),
        }

    def frames(self, split: str) -> list[Frame]:
        return [f for seq in self.sequences[split] for f in list_frames(self.root_dir, seq, with_masks=True)]

    def dataset(self, split: str) -> Dataset:
        if self.patch_size and split == "train":
            return ScaledFrames(self.frames("train"), self.scale, self.intensity, self.patch_size,
                                self.patches_per_epoch, self.augment, turn=self.turn,
                                contact_weight=self.contact_weight, elastic=self.elastic,
                                photometric=self.photometric)
        if self.patch_size:
            return ScaledFrames(self.frames(split), self.scale, self.intensity)
        return LabelledFrames(self.frames(split), self.input_size, train=split == "train", intensity=self.intensity)

    def load(self):
        """Read and check every train and val frame now (DataError on the first bad one), so that a script can fail
        before it creates anything; setup then uses these."""
        self.train_set, self.val_set = self.dataset("train"), self.dataset("val")

    def setup(self, stage: str):
        if stage == "fit" and getattr(self, "train_set", None) is None:
            self.train_set = self.dataset("train")
        if stage in ("fit", "validate") and getattr(self, "val_set", None) is None:
            self.val_set = self.dataset("val")

    def _loader(self, dataset, shuffle: bool = False, sampler=None):
        batch_size = 1 if self.patch_size and dataset is getattr(self, "val_set", None) else self.batch_size
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        """Each val frame exactly once. Under DDP Lightning would give the val loader a DistributedSampler, which pads
        the val set with repeated frames to a multiple of the number of processes: those would be scored twice.
        Lightning's UnrepeatedDistributedSampler (the one it uses for predict) gives each process a disjoint share
        instead. Shares may differ by a batch; safe in validation, which runs no collective per step (DDP syncs no
        buffers without grad; the metrics are reduced once, at the epoch's end)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size == 1:
            return self._loader(self.val_set)
        sampler = UnrepeatedDistributedSampler(self.val_set, shuffle=False, **trainer.distributed_sampler_kwargs)
        return self._loader(self.val_set, sampler=sampler)
