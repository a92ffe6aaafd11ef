"""The data on disk: finding frames, reading and writing images, masks, predictions and tracks. numpy and tifffile
only (no torch), so that the scripts that only read and write files (eval.py, track.py, pictures.py,
import_sequence.py, simulate.py) start in a second.

Two on-disk layouts are read, told apart by the data root itself:

    challenge   root/a/t0000.tif   root/a_GT/man_seg0000.tif
    ctc         root/01/t0000.tif  root/01_GT/SEG/man_seg0000.tif   (Cell Tracking Challenge, the public dataset)
                root/01_GT/TRA/man_track000.tif, man_track.txt      (tracking ground truth, where there is one)

The CTC numbers frames with 3 digits (4 from 1000 frames on); the readers pair by number whatever the digit count.

Images and masks are paired by sequence name and frame number, never by sorted order.
"""
import contextlib
import errno
import math
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
import tifffile
from scipy import ndimage

from border_core import resize_nearest_exact

IMAGE_PATTERN = re.compile(r"^t(\d+)\.tiff?$")
MASK_PATTERN = re.compile(r"^man_seg(\d+)\.tiff?$")
PREDICTION_PATTERN = re.compile(r"^t(\d+)_256\.tiff?$")
TRACK_MASK_PATTERN = re.compile(r"^man_track(\d+)\.tiff?$")
# a CTC tracking result's frames (labels = track ids), and inference.py --native's instance maps at the frame's size
RESULT_MASK_PATTERN = NATIVE_PREDICTION_PATTERN = re.compile(r"^mask(\d+)\.tiff?$")
TRACK_FILE = "man_track.txt"  # CTC tracking ground truth: one line `label begin end parent` per track
RESULT_TRACK_FILE = "res_track.txt"  # the same for a tracking result
INTENSITY_RULES = ("percentile", "baseline")
# The most pixels a frame may declare before it is decoded: a small compressed file can declare gigapixels and
# exhaust the memory when decoded. 2**28 pixels is 16384 x 16384; a script's flag raises it (read_tiff_2d's max_pixels).
MAX_PIXELS = 2 ** 28
MAX_STACK_PIXELS = 2 ** 32  # the same for a whole T x Y x X stack read at once (eval.py --gt/--pred)

# Default split of the challenge (a, b train; c validates; d, e are the test sequences without GT) and the same
# roles for the five sequences of the public dataset in CTC layout.
DEFAULT_SEQUENCES = {
    "challenge": {"train": ["a", "b"], "val": ["c"], "test": ["d", "e"]},
    "ctc": {"train": ["01", "02"], "val": ["03"], "test": ["04", "05"]},
}


class DataError(ValueError):
    """Bad input data: the message names the file (or folder) and what is wrong with it."""


# numpy's tofile (and so tifffile) reports a short write without an errno: the disk filled up during the write
SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def os_error_reason(error: OSError) -> str:
    """What went wrong in a file operation, in words a user acts on."""
    if error.errno == errno.ENOSPC or (error.errno is None and SHORT_WRITE.match(str(error))):
        return "disk full"
    return error.strerror or str(error)


def error_line(error: Exception) -> str:
    """The one line a script prints before exiting non-zero: 'error: <path>: <problem>', for a DataError and for an OS
    error of a file operation (disk full, permission denied, no such file)."""
    if isinstance(error, OSError):
        reason = os_error_reason(error)
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
def image_name(number: int, digits: int = 4) -> str:
    return f"t{number:0{digits}d}.tif"


def mask_name(number: int, digits: int = 4) -> str:
    return f"man_seg{number:0{digits}d}.tif"


def track_mask_name(number: int, digits: int = 3) -> str:
    return f"man_track{number:0{digits}d}.tif"


def result_mask_name(number: int, digits: int = 3) -> str:
    """A CTC tracking result's frame: mask000.tif, labels = track ids."""
    return f"mask{number:0{digits}d}.tif"


def ctc_digits(n_frames: int) -> int:
    """Digits of the CTC's frame numbers: 3 for sequences under 1000 frames, 4 from there on."""
    return 3 if n_frames < 1000 else 4


def track_dir(root_dir: str, sequence: str) -> str:
    return os.path.join(root_dir, f"{sequence}_GT", "TRA")


def prediction_name(image_name_or_number, native: bool = False) -> str:
    """The challenge's prediction file of a frame: t0042.tif (or its number 42) -> t0042_256.tif; with `native`,
    the instance map at the frame's own size, named as the Cell Tracking Challenge names results: mask0042.tif."""
    stem = image_name(image_name_or_number) if isinstance(image_name_or_number, int) else image_name_or_number
    stem = os.path.splitext(stem)[0]
    return f"mask{stem[1:]}.tif" if native else f"{stem}_256.tif"


def mask_dir(root_dir: str, sequence: str, layout: str | None = None) -> str:
    gt = os.path.join(root_dir, f"{sequence}_GT")
    return os.path.join(gt, "SEG") if (layout or detect_layout(root_dir)) == "ctc" else gt


def image_path(root_dir: str, sequence: str, number: int) -> str:
    return os.path.join(root_dir, sequence, image_name(number))


def mask_path(root_dir: str, sequence: str, number: int, layout: str | None = None) -> str:
    return os.path.join(mask_dir(root_dir, sequence, layout), mask_name(number))


def prediction_path(pred_dir: str, sequence: str, image_name_or_number, native: bool = False) -> str:
    return os.path.join(pred_dir, sequence, prediction_name(image_name_or_number, native))


def check_regular_file(path: str) -> str:
    """Refuse what is not a regular file (a FIFO, a device, a socket, a folder) before anything opens it: opening a
    FIFO waits for a writer forever, a device can be read without end. Looked at with stat, never opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise DataError(f"{path}: {os_error_reason(error)}") from error
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise DataError(f"{path}: {kind}, not a regular file; refused")
    return path


def numbered_files(folder: str, pattern: re.Pattern) -> dict[int, str]:
    """Files of a folder whose names match `pattern`, by the number the pattern captures; each a regular file."""
    files = {}
    for name in sorted(os.listdir(folder)):
        match = pattern.match(name)
        if match:
            check_regular_file(os.path.join(folder, name))
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

def check_pixel_count(shape: tuple, path: str, max_pixels: int | None = None):
    """Refuse a frame whose header declares more than max_pixels (default MAX_PIXELS) pixels, before it is decoded:
    a small compressed file can declare gigapixels."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if math.prod(shape) > limit:
        raise DataError(f"{path}: declares {' x '.join(map(str, shape))} = {math.prod(shape)} pixels, more than the "
                        f"limit of {limit}; refused before decoding")


def unreadable(path: str, error: Exception) -> DataError:
    return DataError(f"{path}: unreadable TIFF ({error})")


def decode_tiff(path: str, check_shape) -> np.ndarray:
    """The first series of a TIFF as an array, decoded only after check_shape(the shape its header declares) has
    passed; only a regular file is opened."""
    check_regular_file(path)
    try:  # tifffile raises several types for broken files
        tif = tifffile.TiffFile(path)
    except Exception as error:
        raise unreadable(path, error) from error
    with tif:
        try:
            shape = tuple(tif.series[0].shape)
        except Exception as error:
            raise unreadable(path, error) from error
        check_shape(shape)
        try:
            return tif.asarray()
        except Exception as error:
            raise unreadable(path, error) from error


def read_tiff_2d(path: str, max_pixels: int | None = None) -> np.ndarray:
    """One frame as a 2-D array; singleton axes are dropped, anything else that is not 2-D is an error. Only a
    regular file is opened, and it is decoded only when its header declares at most max_pixels (default MAX_PIXELS)."""
    array = decode_tiff(path, lambda shape: check_pixel_count(shape, path, max_pixels))
    array = np.squeeze(array)
    if array.ndim != 2:
        raise DataError(f"{path}: expected one 2-D single-channel frame, got an array of shape {array.shape}")
    return check_pixels(array, path)


def read_tiff_stack(path: str, max_pixels: int | None = None) -> np.ndarray:
    """A TIFF of one 2-D frame or a T x Y x X stack, as a (T, Y, X) array; singleton axes are dropped. Refused like
    read_tiff_2d before decoding: a frame above max_pixels (default MAX_PIXELS), the stack above MAX_STACK_PIXELS."""
    def check_shape(shape):
        check_pixel_count(tuple(s for s in shape if s != 1)[-2:], path, max_pixels)
        check_pixel_count(shape, path, MAX_STACK_PIXELS)

    array = decode_tiff(path, check_shape)
    array = np.squeeze(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise DataError(f"{path}: expected one 2-D frame or a stack of them (T x Y x X), got an array of shape "
                        f"{array.shape}")
    return check_pixels(array, path)


def check_pixels(array: np.ndarray, path: str) -> np.ndarray:
    """Pixels every reader can use: real numbers, none NaN or infinite (a float frame exported with gaps would
    otherwise turn the percentile stretch, and every prediction after it, into NaN). Returned as it is."""
    if array.dtype.kind == "c":
        raise DataError(f"{path}: complex pixel values ({array.dtype}), expected real intensities")
    if array.dtype.kind == "f":
        bad = array.size - np.count_nonzero(np.isfinite(array))
        if bad:
            raise DataError(f"{path}: {bad} pixel(s) are NaN or infinite")
    return array


def frame_shape(path: str, max_pixels: int | None = None) -> tuple[int, int]:
    """A frame's 2-D size from its TIFF header, without reading the pixels (refused as read_tiff_2d refuses it)."""
    check_regular_file(path)
    try:
        with tifffile.TiffFile(path) as tif:
            shape = tuple(tif.series[0].shape)
    except Exception as error:
        raise unreadable(path, error) from error
    check_pixel_count(shape, path, max_pixels)
    shape = tuple(s for s in shape if s != 1)
    if len(shape) != 2:
        raise DataError(f"{path}: expected one 2-D single-channel frame, got an array of shape {shape}")
    return shape


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


def to_uint8_range(image: np.ndarray, intensity: str = "baseline") -> np.ndarray:
    """Map a frame of any dtype to float32 on the 0..255 scale that the normalisation expects. Two rules:

    - "percentile" (the default of the patch recipe): every dtype, uint8 included, is stretched linearly per frame so
      that its 0.1st percentile maps to 0 and its 99.9th to 255, then clipped. A linear change of the grey values
      (a uint8 and a uint16 copy of the same pixels, another exposure or offset) gives the same result.
    - "baseline" (the faithful recipe): uint8 (and bool, as 0/255) is taken as is, exactly as the baseline does;
      every other dtype is stretched as above.
    A constant frame maps to 0.
    """
    if intensity not in INTENSITY_RULES:
        raise ValueError(f"intensity rule must be one of {INTENSITY_RULES}, got {intensity!r}")
    if intensity == "baseline" and image.dtype == np.uint8:
        return image.astype(np.float32)
    if intensity == "baseline" and image.dtype == bool:
        return image.astype(np.float32) * 255
    image = image.astype(np.float32)
    low, high = np.percentile(image, (0.1, 99.9))
    if high <= low:
        return np.zeros_like(image)
    return np.clip((image - np.float32(low)) * np.float32(255.0 / (high - low)), 0, 255)


def rescale(image: np.ndarray, scale: float, order: int = 1) -> np.ndarray:
    """A frame resized by `scale` (to round(side * scale)): bilinear for images (order 1), nearest for labels (order
    0); both about pixel centres, so a mask stays on its image (border_core.resize_nearest_exact). scale 1 returns the
    array itself."""
    if scale == 1:
        return image
    size = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
    if order == 0:
        return resize_nearest_exact(image, size)
    rows = (np.arange(size[0]) + 0.5) * image.shape[0] / size[0] - 0.5
    cols = (np.arange(size[1]) + 0.5) * image.shape[1] / size[1] - 0.5
    grid = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(image.astype(np.float32, copy=False), grid, order=1, mode="nearest")


# ----------------------------------------------------------------------------------------------------------------- writing

def new_file_mode() -> int:
    """0666 less the process's umask: what open() gives a new file (mkstemp gives 0600 whatever the umask)."""
    try:
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def fsync_folder(folder: str):
    """Make a rename in `folder` durable (where the OS lets a folder be opened; not on every platform)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename is done all the same
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write, suffix: str = ".tmp", durable: bool = False):
    """Call write(temporary path) beside `path`, then rename it into place: the file is whole or absent, never half
    written, and gets the mode the umask gives. `durable`: the file is fsynced before the rename and the folder
    after it, so that it survives a power cut too (checkpoints; a prediction is cheap to make again). OS errors (disk
    full, permission denied) become a DataError naming the file. The one writer of every script."""
    tmp = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=suffix)
        os.close(fd)
        write(tmp)
        if durable:
            with open(tmp, "rb+") as file:
                os.fsync(file.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
        tmp = None
        if durable:
            fsync_folder(folder)
    except OSError as error:
        raise DataError(f"{path}: cannot write ({os_error_reason(error)})") from error
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


# --------------------------------------------------------------------------------------- staging, and SIGTERM during it

_sigterm = {"deferred": 0, "pending": False}


def _raise_on_sigterm(signum, frame):
    if _sigterm["deferred"]:
        _sigterm["pending"] = True
        return
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_raises():
    """While active, SIGTERM raises SystemExit(143) instead of ending the process on the spot, so that `finally`
    blocks run and remove what was staged. Only where SIGTERM still has its default action (a script that handles
    SIGTERM itself, train.py, keeps its handler) and only in the main thread (where Python runs signal handlers)."""
    install = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if install:
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def sigterm_deferred():
    """A SIGTERM that arrives inside the block (under sigterm_raises) takes effect when the block is done: for the
    renames that put a finished result in place, which must all happen or none."""
    _sigterm["deferred"] += 1
    try:
        yield
    finally:
        _sigterm["deferred"] -= 1
        if not _sigterm["deferred"] and _sigterm["pending"]:
            _sigterm["pending"] = False
            raise SystemExit(128 + signal.SIGTERM)


STAGING_OWNER = re.compile(r"^(\d+)@(.+)-[^-]+$")  # after the prefix: <pid>@<host>-<mkdtemp's random part>


def remove_stale_staging(parent: str, prefix: str) -> list[str]:
    """Remove the staging folders `.<prefix>-<pid>@<host>-*` in parent that a process of this host left behind
    and that no longer runs (killed with SIGKILL, or the machine went down). Returns the folders removed."""
    host, removed = socket.gethostname(), []
    if not os.path.isdir(parent):
        return removed
    for entry in os.listdir(parent):
        if not entry.startswith(f".{prefix}-"):
            continue
        owner = STAGING_OWNER.match(entry[len(prefix) + 2:])
        if owner is None or owner.group(2) != host or process_alive(int(owner.group(1))):
            continue
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        removed.append(os.path.join(parent, entry))
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


@contextlib.contextmanager
def staging_folder(parent: str, prefix: str):
    """A hidden folder `.<prefix>-<pid>@<host>-XXXXXXXX` in parent to write a result into before it is renamed into
    place. It is gone afterwards whatever happened: removed on an exception and on SIGTERM (sigterm_raises), and, where
    a process was killed outright, by the next run with the same prefix (remove_stale_staging). A caller that renames
    the folder itself into place leaves nothing to remove."""
    with sigterm_raises():
        os.makedirs(parent, exist_ok=True)
        remove_stale_staging(parent, prefix)
        staging = tempfile.mkdtemp(dir=parent, prefix=f".{prefix}-{os.getpid()}@{socket.gethostname()}-")
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_sequence(root_dir: str, name: str, targets: dict):
    """A hidden staging folder in root_dir for writing a sequence whose folders will be `targets` (name -> path):
    an existing target is refused before anything is written, OS errors become a DataError naming the sequence, and
    the staging folder is gone afterwards whatever happened, SIGTERM included (what was complete was moved out of it;
    see staging_folder)."""
    for target in targets.values():
        if os.path.exists(target):
            raise DataError(f"{target}: already exists; choose another name or remove it first")
    try:
        with staging_folder(root_dir, f"write-{name}") as staging:
            yield staging
    except OSError as error:
        raise DataError(f"{os.path.join(root_dir, name)}: cannot write the sequence ({os_error_reason(error)})") \
            from error


def write_sequence(root_dir: str, name: str, frames, with_gt: bool = True, layout: str = "challenge") -> int:
    """Write one sequence numbered from 0; `frames` is an iterable of (image, mask) pairs (mask ignored without GT),
    consumed one at a time. Everything goes into a hidden staging folder first and is moved into place when complete;
    an existing sequence is never overwritten. Masks are stored as uint16, wider where a frame's labels need it.
    Returns the number of frames."""
    targets = {"images": os.path.join(root_dir, name)}
    if with_gt:
        targets["masks"] = mask_dir(root_dir, name, layout)
    count = 0
    with staged_sequence(root_dir, name, targets) as staging:
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
        with sigterm_deferred():  # both folders or neither
            if with_gt:
                os.makedirs(os.path.dirname(targets["masks"]), exist_ok=True)
                os.replace(os.path.join(staging, "masks"), targets["masks"])
            os.replace(os.path.join(staging, "images"), targets["images"])
    return count


def format_tracks(tracks) -> str:
    """A CTC track file's text: one line `label begin end parent` per row of an (n, 4) integer table."""
    return "".join(f"{int(l)} {int(b)} {int(e)} {int(p)}\n" for l, b, e, p in np.asarray(tracks).reshape(-1, 4))


def read_tracks(path: str) -> np.ndarray:
    """A CTC track file as an (n, 4) int64 table (label, begin, end, parent), checked by check_tracks: every line four
    whole numbers, every value one the CTC's format allows, no lineage that loops."""
    check_regular_file(path)
    problem = "not a track file of lines `label begin end parent`"
    rows = []
    try:
        with open(path) as file:
            for number, line in enumerate(file, 1):
                values = line.split()
                if not values:
                    continue
                if len(values) != 4:
                    raise DataError(f"{path}: {problem} (line {number} has {len(values)} values)")
                try:
                    row = [int(v) for v in values]
                except ValueError:
                    raise DataError(f"{path}: {problem} (line {number} is not four whole numbers)") from None
                if not all(-2 ** 63 <= v < 2 ** 63 for v in row):
                    raise DataError(f"{path}: line {number}: a value beyond the 64-bit range")
                rows.append(row)
    except (OSError, UnicodeDecodeError) as error:
        reason = os_error_reason(error) if isinstance(error, OSError) else "not a text file"
        raise DataError(f"{path}: {problem} ({reason})") from error
    return check_tracks(np.array(rows, np.int64).reshape(-1, 4), path)


def check_tracks(tracks: np.ndarray, path: str) -> np.ndarray:
    """A track table as the CTC defines it: labels from 1 and unique, 0 <= begin <= end, a parent 0 (none) or the
    label of another track, and no track its own ancestor (a cycle would make every walk up a lineage endless).
    Returned as it is."""
    label, begin, end, parent = tracks.T
    def refuse(rows, what):
        row = tracks[np.flatnonzero(rows)[0]]
        raise DataError(f"{path}: track {' '.join(map(str, row))}: {what}")
    if (label < 1).any():
        refuse(label < 1, "a track label must be at least 1")
    if (begin < 0).any() or (end < begin).any():
        refuse((begin < 0) | (end < begin), "begin must be at least 0 and end at least begin")
    if (parent < 0).any():
        refuse(parent < 0, "a parent label must be at least 0 (0: no parent)")
    if (parent == label).any():
        refuse(parent == label, "a track is its own parent")
    order = np.argsort(label, kind="stable")
    repeated = np.zeros(len(label), bool)
    repeated[order[1:][np.diff(label[order]) == 0]] = True
    if repeated.any():
        refuse(repeated, "its label names another track too")
    sorted_labels = label[order]
    at = np.minimum(np.searchsorted(sorted_labels, parent), max(len(label) - 1, 0))
    known = (parent == 0) | (sorted_labels[at] == parent) if len(label) else parent == 0
    if not known.all():
        refuse(~known, "its parent is not a track of the file")
    # a cycle: follow every track's parent pointer; pointer doubling reaches the root (index n) from every track
    # in log2(n) steps unless the track's ancestors loop
    n = len(label)
    up = np.append(np.where(parent == 0, n, order[at] if n else 0), n)
    for _ in range(max(n, 1).bit_length() + 1):
        up = up[up]
    if (up[:n] != n).any():
        refuse(up[:n] != n, "its ancestors form a cycle (a track is its own ancestor)")
    return tracks


def tracks_from_presence(first: dict, last: dict, parent_of: dict) -> np.ndarray:
    """The CTC track table of labels seen from frame first[label] to last[label], parents from parent_of (label ->
    parent label, absent for a root). A parent never seen (born and divided within one frame step) is skipped for its
    nearest seen ancestor."""
    rows = []
    for label in sorted(first):
        parent = parent_of.get(label, 0)
        while parent and parent not in first:
            parent = parent_of.get(parent, 0)
        rows.append((label, first[label], last[label], parent))
    return np.array(rows, np.int64).reshape(-1, 4)


def write_ctc_sequence(root_dir: str, name: str, frames, parent_of: dict, with_gt: bool = True,
                       digits: int = 3) -> int:
    """Write one sequence in the Cell Tracking Challenge layout with tracking ground truth:

        root/<name>/t000.tif   root/<name>_GT/SEG/man_seg000.tif   root/<name>_GT/TRA/man_track000.tif, man_track.txt

    `frames` yields (image, mask) whose mask labels are track ids (a label from birth to division or to leaving);
    `parent_of` maps a daughter's label to its mother's and is read once all frames are consumed (a simulation fills
    it as it runs). A track is the frames in which its label is present; a label that vanishes and comes back would
    break the CTC's rules and is refused. Staged in a hidden folder and moved into place when complete, as
    write_sequence does. Returns the number of frames."""
    targets = {"images": os.path.join(root_dir, name)}
    if with_gt:
        targets["gt"] = os.path.join(root_dir, f"{name}_GT")
    count, first, last = 0, {}, {}
    with staged_sequence(root_dir, name, targets) as staging:
        for folder in ("images", os.path.join("gt", "SEG"), os.path.join("gt", "TRA")):
            os.makedirs(os.path.join(staging, folder))
        for t, (image, mask) in enumerate(frames):
            tifffile.imwrite(os.path.join(staging, "images", image_name(t, digits)), image)
            if with_gt:
                mask = np.asarray(mask)
                mask = narrowest_unsigned(mask) if mask.size and mask.max() > np.iinfo(np.uint16).max \
                    else mask.astype(np.uint16)
                tifffile.imwrite(os.path.join(staging, "gt", "SEG", mask_name(t, digits)), mask)
                tifffile.imwrite(os.path.join(staging, "gt", "TRA", track_mask_name(t, digits)), mask)
                present = np.flatnonzero(np.bincount(mask.ravel().astype(np.int64))) if mask.size else []
                for label in (int(label) for label in present if label):
                    if label in last and last[label] != t - 1:
                        raise DataError(f"{os.path.join(targets['gt'], 'TRA', track_mask_name(t, digits))}: label "
                                        f"{label} comes back after a gap (last seen in frame {last[label]})")
                    first.setdefault(label, t)
                    last[label] = t
            count = t + 1
        if with_gt:
            tracks = tracks_from_presence(first, last, parent_of)
            with open(os.path.join(staging, "gt", "TRA", TRACK_FILE), "w") as file:
                file.write(format_tracks(tracks))
        with sigterm_deferred():  # both folders or neither
            if with_gt:
                os.replace(os.path.join(staging, "gt"), targets["gt"])
            os.replace(os.path.join(staging, "images"), targets["images"])
    return count


def write_marked_block(path: str, name: str, text: str):
    """Replace what lies between `<!-- name:start -->` and `<!-- name:end -->` in a text file (docs/results.md),
    leaving the rest as it is; a file without the markers gets the block at its end, a missing file just the block.
    How a benchmark script regenerates its own table in a document others write too."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = open(path).read() if os.path.isfile(path) else ""
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in old and end in old.split(start, 1)[1]:
        before, rest = old.split(start, 1)
        new = before + block + rest.split(end, 1)[1]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + ("\n" if old else "") + block + "\n"

    def write(temporary):
        with open(temporary, "w") as file:
            file.write(new)
    atomic_write(path, write, ".md.tmp")


def replace_folder(out: str, write, prefix: str):
    """Call write(staging folder) in a hidden folder beside `out`, then put it in out's place whole: `out` is either
    the complete new result or what it was before (a SIGTERM during the renames waits for them; staging_folder
    cleans up otherwise). OS errors become a DataError naming `out`."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    try:
        with staging_folder(parent, f"{prefix}-{os.path.basename(out)}") as staging:
            write(staging)
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the result from the group
            with sigterm_deferred(), staging_folder(parent, f"old-{os.path.basename(out)}") as old:
                if os.path.exists(out):
                    os.replace(out, os.path.join(old, "result"))
                os.replace(staging, out)
    except OSError as error:
        raise DataError(f"{out}: cannot write the result ({os_error_reason(error)})") from error


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
