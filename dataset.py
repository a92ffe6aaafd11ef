"""Data: finding frames on disk, reading them, border-core targets, transforms and the LightningDataModule.

Two on-disk layouts are read, told apart by the data root itself:

    challenge   root/a/t0000.tif   root/a_GT/man_seg0000.tif
    ctc         root/01/t0000.tif  root/01_GT/SEG/man_seg0000.tif   (Cell Tracking Challenge, the public dataset)

Images and masks are paired by sequence name and frame number, never by sorted order.
"""
import errno
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import lightning as L
import numpy as np
import tifffile
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from border_core import border_core_targets, resize_nearest

IMAGE_PATTERN = re.compile(r"^t(\d+)\.tiff?$")
MASK_PATTERN = re.compile(r"^man_seg(\d+)\.tiff?$")
PREDICTION_PATTERN = re.compile(r"^t(\d+)_256\.tiff?$")

# Default split of the challenge (a, b train; c validates; d, e are the test sequences without GT) and the same
# roles for the five sequences of the public dataset in CTC layout.
DEFAULT_SEQUENCES = {
    "challenge": {"train": ["a", "b"], "val": ["c"], "test": ["d", "e"]},
    "ctc": {"train": ["01", "02"], "val": ["03"], "test": ["04", "05"]},
}


class DataError(ValueError):
    """Bad input data: the message names the file (or folder) and what is wrong with it."""


def error_line(error: Exception) -> str:
    """The one line a script prints before exiting non-zero: 'error: <path>: <problem>', for a DataError and for an OS
    error of a file operation (disk full, permission denied, no such file)."""
    if isinstance(error, OSError):
        reason = "disk full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        return f"error: {error.filename}: {reason}" if error.filename else f"error: {reason}"
    message = str(error).strip()
    if "\nOriginal Traceback" in message:  # raised in a loader worker: torch wraps the message in the traceback
        message = message.splitlines()[-1].split(": ", 1)[-1]
    return f"error: {message}"


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


# The file names of the layouts: every script builds its paths with these, none spells them by hand.
def image_name(number: int) -> str:
    return f"t{number:04d}.tif"


def mask_name(number: int) -> str:
    return f"man_seg{number:04d}.tif"


def prediction_name(image_name_or_number) -> str:
    """The challenge's prediction file of a frame: t0042.tif (or its number 42) -> t0042_256.tif."""
    stem = image_name(image_name_or_number) if isinstance(image_name_or_number, int) else image_name_or_number
    return f"{os.path.splitext(stem)[0]}_256.tif"


def mask_dir(root_dir: str, sequence: str, layout: str | None = None) -> str:
    gt = os.path.join(root_dir, f"{sequence}_GT")
    return os.path.join(gt, "SEG") if (layout or detect_layout(root_dir)) == "ctc" else gt


def image_path(root_dir: str, sequence: str, number: int) -> str:
    return os.path.join(root_dir, sequence, image_name(number))


def mask_path(root_dir: str, sequence: str, number: int, layout: str | None = None) -> str:
    return os.path.join(mask_dir(root_dir, sequence, layout), mask_name(number))


def prediction_path(pred_dir: str, sequence: str, image_name_or_number) -> str:
    return os.path.join(pred_dir, sequence, prediction_name(image_name_or_number))


def numbered_files(folder: str, pattern: re.Pattern) -> dict[int, str]:
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
    images = numbered_files(image_folder, IMAGE_PATTERN)
    if not images:
        raise DataError(f"{image_folder}: empty sequence, no image named t<number>.tif")
    if not with_masks:
        return [Frame(sequence, n, images[n], None) for n in sorted(images)]

    folder = mask_dir(root_dir, sequence)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: ground-truth folder of sequence '{sequence}' is missing")
    masks = numbered_files(folder, MASK_PATTERN)
    for n in sorted(images):
        if n not in masks:
            raise DataError(f"{os.path.join(folder, mask_name(n))}: missing mask for image {images[n]}")
    for n in sorted(masks):
        if n not in images:
            raise DataError(f"{masks[n]}: mask without an image (expected {image_path(root_dir, sequence, n)})")
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


def check_labels(labels: np.ndarray, path: str, what: str = "instance labels") -> np.ndarray:
    """An instance label image as every reader takes it: integers (or bool), none negative. Returned as it is."""
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise DataError(f"{path}: {what} must be integers, got dtype {labels.dtype}")
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise DataError(f"{path}: negative instance label {labels.min()}")
    return labels


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """Labels as int64 whatever the file's width: uint32/uint64 ids above 2**31 - 1 are fine instance ids, but an
    int32 copy would turn them negative. Ids that do not fit int64 are renumbered 1..N, order kept."""
    if labels.dtype == np.uint64 and labels.size and labels.max() > np.iinfo(np.int64).max:
        ids, index = np.unique(labels, return_inverse=True)
        return (index.reshape(labels.shape) + (ids[0] != 0)).astype(np.int64)
    return labels.astype(np.int64)


def read_mask(path: str, image_shape: tuple[int, int] | None = None, image_path: str | None = None) -> np.ndarray:
    mask = check_labels(read_tiff_2d(path), path)
    if image_shape is not None and mask.shape != tuple(image_shape):
        raise DataError(f"{path}: mask size {mask.shape} differs from image size {tuple(image_shape)} of {image_path}")
    return mask


def read_prediction(path: str) -> np.ndarray:
    return check_labels(read_tiff_2d(path), path, "predicted instance labels")


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


# ----------------------------------------------------------------------------------------------------------------- writing

def _file_mode() -> int:
    """0666 less the process's umask: what open() gives a new file (mkstemp gives 0600 whatever the umask)."""
    try:
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write, suffix: str = ".tmp"):
    """Call write(temporary path) beside `path`, then rename it into place: the file is whole or absent, never half
    written, and gets the mode the umask gives. OS errors (disk full, permission denied) become a DataError naming
    the file."""
    tmp = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=suffix)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except OSError as error:
        reason = "disk full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise DataError(f"{path}: cannot write ({reason})") from error
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_tiff_atomically(path: str, array: np.ndarray):
    atomic_write(path, lambda tmp: tifffile.imwrite(tmp, array), ".tif.tmp")


def narrowest_unsigned(labels: np.ndarray) -> np.ndarray:
    """Labels in the narrowest unsigned dtype that holds them (uint8 wraps above 255 cells)."""
    top = int(labels.max()) if labels.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return labels.astype(dtype)
    return labels.astype(np.uint64)


def write_sequence(root_dir: str, name: str, frames, with_gt: bool = True, layout: str = "challenge") -> int:
    """Write one sequence numbered from 0; `frames` is an iterable of (image, mask) pairs (mask ignored without GT),
    consumed one at a time. Everything goes into a hidden staging folder first and is moved into place when complete;
    an existing sequence is never overwritten. Masks are stored as uint16, wider where a frame's labels need it.
    Returns the number of frames."""
    targets = {"images": os.path.join(root_dir, name)}
    if with_gt:
        targets["masks"] = mask_dir(root_dir, name, layout)
    for target in targets.values():
        if os.path.exists(target):
            raise DataError(f"{target}: already exists; choose another name or remove it first")
    staging, count = None, 0
    try:
        os.makedirs(root_dir, exist_ok=True)
        staging = tempfile.mkdtemp(dir=root_dir, prefix=f".write-{name}-")
        for kind in targets:
            os.makedirs(os.path.join(staging, kind))
        for t, (image, mask) in enumerate(frames):
            tifffile.imwrite(os.path.join(staging, "images", image_name(t)), image)
            if with_gt:
                mask = np.asarray(mask)
                wide = mask.size and int(mask.max()) > np.iinfo(np.uint16).max
                tifffile.imwrite(os.path.join(staging, "masks", mask_name(t)),
                                 narrowest_unsigned(mask) if wide else mask.astype(np.uint16))
            count = t + 1
        if with_gt:
            os.makedirs(os.path.dirname(targets["masks"]), exist_ok=True)
            os.replace(os.path.join(staging, "masks"), targets["masks"])
        os.replace(os.path.join(staging, "images"), targets["images"])
    except OSError as error:
        reason = "disk full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise DataError(f"{os.path.join(root_dir, name)}: cannot write the sequence ({reason})") from error
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return count


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
        self.instances = np.empty((len(frames), score_size, score_size), np.int64)
        for i, frame in enumerate(frames):
            image, shape = load_image(frame, input_size)
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
    """Train and val loaders over sequences chosen by name (defaults by layout, see DEFAULT_SEQUENCES)."""

    def __init__(self, root_dir: str, train_seqs=None, val_seqs=None, batch_size: int = 16, input_size: int = 512,
                 num_workers: int = 2):
        super().__init__()
        self.root_dir, self.batch_size, self.input_size, self.num_workers = root_dir, batch_size, input_size, num_workers
        self.sequences = {
            "train": list(train_seqs or default_sequences(root_dir, "train")),
            "val": list(val_seqs or default_sequences(root_dir, "val")),
        }

    def frames(self, split: str) -> list[Frame]:
        return [f for seq in self.sequences[split] for f in list_frames(self.root_dir, seq, with_masks=True)]

    def load(self):
        """Read and check every train and val frame now (DataError on the first bad one), so that a script can fail
        before it creates anything; setup then uses these."""
        self.train_set = LabelledFrames(self.frames("train"), self.input_size, train=True)
        self.val_set = LabelledFrames(self.frames("val"), self.input_size)

    def setup(self, stage: str):
        if stage == "fit" and getattr(self, "train_set", None) is None:
            self.train_set = LabelledFrames(self.frames("train"), self.input_size, train=True)
        if stage in ("fit", "validate") and getattr(self, "val_set", None) is None:
            self.val_set = LabelledFrames(self.frames("val"), self.input_size)

    def _loader(self, dataset, shuffle: bool = False, sampler=None):
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, sampler=sampler,
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
