"""Data: finding frames on disk, reading them, border-core targets, transforms and the LightningDataModule.

Two on-disk layouts are read, told apart by the data root itself:

    challenge   root/a/t0000.tif   root/a_GT/man_seg0000.tif
    ctc         root/01/t0000.tif  root/01_GT/SEG/man_seg0000.tif   (Cell Tracking Challenge, the public dataset)

Images and masks are paired by sequence name and frame number, never by sorted order.
"""
import os
import re
from dataclasses import dataclass

import lightning as L
import numpy as np
import tifffile
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

IMAGE_PATTERN = re.compile(r"^t(\d+)\.tiff?$")
MASK_PATTERN = re.compile(r"^man_seg(\d+)\.tiff?$")

# Default split of the challenge (a, b train; c validates; d, e are the test sequences without GT) and the same
# roles for the five sequences of the public dataset in CTC layout.
DEFAULT_SEQUENCES = {
    "challenge": {"train": ["a", "b"], "val": ["c"], "test": ["d", "e"]},
    "ctc": {"train": ["01", "02"], "val": ["03"], "test": ["04", "05"]},
}

BACKGROUND, CORE, BORDER = 0, 1, 2
BORDER_WIDTH = 4  # erosions with the 3 x 3 cross, SPEC §2
CROSS_STRUCTURE = ndimage.generate_binary_structure(2, 1)


class DataError(ValueError):
    """Bad input data: the message names the file (or folder) and what is wrong with it."""


# ----------------------------------------------------------------------------------------------------------- finding files

@dataclass(frozen=True)
class Frame:
    sequence: str
    number: int
    image_path: str
    mask_path: str | None  # None for sequences without ground truth

    @property
    def name(self) -> str:
        """The image's file name without extension (t0042), used to name the prediction."""
        return os.path.splitext(os.path.basename(self.image_path))[0]


def detect_layout(root_dir: str) -> str:
    """'ctc' if any sequence has a <seq>_GT/SEG folder, else 'challenge'."""
    if not os.path.isdir(root_dir):
        raise DataError(f"{root_dir}: data root does not exist or is not a folder")
    for entry in sorted(os.listdir(root_dir)):
        if entry.endswith("_GT") and os.path.isdir(os.path.join(root_dir, entry, "SEG")):
            return "ctc"
    return "challenge"


def default_sequences(root_dir: str, split: str) -> list[str]:
    return list(DEFAULT_SEQUENCES[detect_layout(root_dir)][split])


def mask_dir(root_dir: str, sequence: str) -> str:
    gt = os.path.join(root_dir, f"{sequence}_GT")
    return os.path.join(gt, "SEG") if detect_layout(root_dir) == "ctc" else gt


def _numbered_files(folder: str, pattern: re.Pattern) -> dict[int, str]:
    files = {}
    for name in sorted(os.listdir(folder)):
        match = pattern.match(name)
        if match:
            number = int(match.group(1))
            if number in files:
                raise DataError(f"{os.path.join(folder, name)}: frame {number} also stored as {files[number]}")
            files[number] = os.path.join(folder, name)
    return files


def list_frames(root_dir: str, sequence: str, with_masks: bool) -> list[Frame]:
    """All frames of one sequence, sorted by frame number; with_masks demands a mask for every image."""
    image_folder = os.path.join(root_dir, sequence)
    if not os.path.isdir(image_folder):
        available = sorted(e for e in os.listdir(root_dir) if os.path.isdir(os.path.join(root_dir, e))) \
            if os.path.isdir(root_dir) else []
        raise DataError(f"{image_folder}: sequence '{sequence}' not found (folders in the root: {available})")
    images = _numbered_files(image_folder, IMAGE_PATTERN)
    if not images:
        raise DataError(f"{image_folder}: empty sequence, no image named t<number>.tif")
    if not with_masks:
        return [Frame(sequence, n, images[n], None) for n in sorted(images)]

    folder = mask_dir(root_dir, sequence)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: ground-truth folder of sequence '{sequence}' is missing")
    masks = _numbered_files(folder, MASK_PATTERN)
    for n in sorted(images):
        if n not in masks:
            raise DataError(f"{os.path.join(folder, f'man_seg{n:04d}.tif')}: missing mask for image {images[n]}")
    for n in sorted(masks):
        if n not in images:
            raise DataError(f"{masks[n]}: mask without an image (expected {image_folder}/t{n:04d}.tif)")
    return [Frame(sequence, n, images[n], masks[n]) for n in sorted(images)]


# ----------------------------------------------------------------------------------------------------------------- reading

def read_tiff_2d(path: str) -> np.ndarray:
    """One frame as a 2-D array; singleton axes are dropped, anything else that is not 2-D is an error."""
    try:
        array = tifffile.imread(path)
    except Exception as error:  # tifffile raises several types for broken files
        raise DataError(f"{path}: unreadable TIFF ({error})") from error
    array = np.squeeze(array)
    if array.ndim != 2:
        raise DataError(f"{path}: expected one 2-D single-channel frame, got an array of shape {array.shape}")
    return array


def read_mask(path: str, image_shape: tuple[int, int] | None = None, image_path: str | None = None) -> np.ndarray:
    mask = read_tiff_2d(path)
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise DataError(f"{path}: instance labels must be integers, got dtype {mask.dtype}")
    if np.issubdtype(mask.dtype, np.signedinteger) and mask.min() < 0:
        raise DataError(f"{path}: negative instance label {mask.min()}")
    if image_shape is not None and mask.shape != tuple(image_shape):
        raise DataError(f"{path}: mask size {mask.shape} differs from image size {tuple(image_shape)} of {image_path}")
    return mask


def to_uint8_range(image: np.ndarray) -> np.ndarray:
    """Map a frame of any dtype to float32 on the 0..255 scale that the baseline's normalisation expects.

    uint8 (and bool, as 0/255) is taken as is, exactly as the baseline does. Every other dtype (uint16, int, float)
    is stretched linearly so that its 0.1st percentile maps to 0 and its 99.9th to 255, then clipped: per frame, so
    that drifting illumination and any bit depth land in the same range. A constant frame maps to 0.
    """
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    if image.dtype == bool:
        return image.astype(np.float32) * 255
    image = image.astype(np.float32)
    low, high = np.percentile(image, (0.1, 99.9))
    if high <= low:
        return np.zeros_like(image)
    return np.clip((image - np.float32(low)) * np.float32(255.0 / (high - low)), 0, 255)


# ---------------------------------------------------------------------------------------------------- targets and resizing

def border_core_targets(labels: np.ndarray) -> np.ndarray:
    """Border-core map of an instance mask (SPEC §2): 0 background, 1 core, 2 border.

    The baseline erodes each instance 4 times with the 3 x 3 cross, the image edge not eroding: a pixel is core when
    every in-image pixel within city-block distance 4 carries its label. Computed for all instances at once: a pixel
    is "uniform" when it is foreground and its in-image 4-neighbours carry its label; a pixel is core when every
    in-image pixel within distance 3 is uniform (3 binary erosions with the cross, beyond the edge counting as
    uniform). Chaining the equal-neighbour steps gives the same set as the distance-4 rule, with boolean work only.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"border_core_targets expects a 2-D label image, got shape {labels.shape}")
    foreground = labels > 0
    uniform = foreground.copy()
    # compare with each 4-neighbour; along the edge there is no neighbour, which never breaks uniformity
    same_horizontal = labels[:, 1:] == labels[:, :-1]
    same_vertical = labels[1:, :] == labels[:-1, :]
    uniform[:, 1:] &= same_horizontal
    uniform[:, :-1] &= same_horizontal
    uniform[1:, :] &= same_vertical
    uniform[:-1, :] &= same_vertical
    core = ndimage.binary_erosion(uniform, CROSS_STRUCTURE, iterations=BORDER_WIDTH - 1, border_value=1)
    targets = foreground.astype(np.uint8) * BORDER
    targets[core] = CORE
    return targets


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes, source index floor(i * in / out) (OpenCV's INTER_NEAREST and
    torch's 'nearest'). Any dtype, so it serves images and label maps alike."""
    height, width = array.shape[-2:]
    rows = (np.arange(size[0]) * height) // size[0]
    cols = (np.arange(size[1]) * width) // size[1]
    return array[..., rows[:, None], cols[None, :]]


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

def load_image(frame: Frame, input_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Image at input_size on the 0..255 scale (float32), and its size on disk."""
    image = read_tiff_2d(frame.image_path)
    return resize_nearest(to_uint8_range(image), (input_size, input_size)), image.shape


class LabelledFrames(Dataset):
    """Frames with masks, decoded, turned into targets and resized once, then kept in memory.

    Item: (image 1 x S x S float, target S x S long, gt instances at score_size x score_size int64).
    Images are kept as float16 on the 0..255 scale: exact for uint8 data, 1/8 grey level for deeper data.
    """

    def __init__(self, frames: list[Frame], input_size: int = 512, train: bool = False, score_size: int = 256):
        if not frames:
            raise DataError("no frames given")
        self.frames, self.train = frames, train
        size = (input_size, input_size)
        self.images = np.empty((len(frames), input_size, input_size), np.float16)
        self.targets = np.empty((len(frames), input_size, input_size), np.uint8)
        self.instances = np.empty((len(frames), score_size, score_size), np.int32)
        for i, frame in enumerate(frames):
            image, shape = load_image(frame, input_size)
            mask = read_mask(frame.mask_path, shape, frame.image_path)
            self.images[i] = image
            self.targets[i] = resize_nearest(border_core_targets(mask), size)
            self.instances[i] = resize_nearest(mask, (score_size, score_size))

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, index):
        image = torch.from_numpy(self.images[index].astype(np.float32))[None]
        target = torch.from_numpy(self.targets[index].astype(np.int64))
        if self.train:
            image, target = random_horizontal_flip(image, target)
            image = random_brightness_contrast(image)
        return normalise(image), target, torch.from_numpy(self.instances[index].astype(np.int64))


class UnlabelledFrames(Dataset):
    """Frames for prediction, read lazily (in the loader's workers). Item: (image 1 x S x S float, index)."""

    def __init__(self, frames: list[Frame], input_size: int = 512):
        if not frames:
            raise DataError("no frames given")
        self.frames, self.input_size = frames, input_size

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, index):
        image, _ = load_image(self.frames[index], self.input_size)
        return normalise(torch.from_numpy(image)[None]), index


# ---------------------------------------------------------------------------------------------------------- data module

class CellDataModule(L.LightningDataModule):
    """Train / val / test loaders over sequences chosen by name (defaults by layout, see DEFAULT_SEQUENCES)."""

    def __init__(self, root_dir: str, train_seqs=None, val_seqs=None, test_seqs=None, batch_size: int = 16,
                 input_size: int = 512, num_workers: int = 2):
        super().__init__()
        self.root_dir, self.batch_size, self.input_size, self.num_workers = root_dir, batch_size, input_size, num_workers
        self.sequences = {
            "train": list(train_seqs or default_sequences(root_dir, "train")),
            "val": list(val_seqs or default_sequences(root_dir, "val")),
            "test": list(test_seqs or default_sequences(root_dir, "test")),
        }

    def frames(self, split: str, with_masks: bool) -> list[Frame]:
        return [f for seq in self.sequences[split] for f in list_frames(self.root_dir, seq, with_masks)]

    def setup(self, stage: str):
        if stage == "fit":
            self.train_set = LabelledFrames(self.frames("train", True), self.input_size, train=True)
        if stage in ("fit", "validate"):
            self.val_set = LabelledFrames(self.frames("val", True), self.input_size)
        if stage == "predict":
            self.predict_set = UnlabelledFrames(self.frames("test", False), self.input_size)

    def _loader(self, dataset, shuffle: bool):
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self):
        return self._loader(self.predict_set, shuffle=False)
