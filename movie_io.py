"""Reading a microscope movie: one channel of one position as a (T, Y, X) stack, with its pixel size.

    movie = read_movie("movie.tif")                                     # a TIFF stack: TYX, or one frame YX
    movie = read_movie("movie.ome.tif", channel=1, frames=slice(0, 50))  # OME-TIFF, ImageJ hyperstack: axes read
    movie = read_movie("movie.nd2", channel=0, position=2)               # ND2, CZI, LIF, OME-Zarr: through bioio

TIFF (plain, ImageJ, OME-TIFF) is read with tifffile and always works. ND2, CZI, LIF and OME-Zarr are read through
bioio and its reader plugins, an optional extra (`pip install -r requirements-movie.txt`).

Axes: time T, depth Z, channel C (and S, the samples of an RGB image), position P (a file's series or scenes), Y, X.
Singleton axes are dropped. An unnamed axis beside Y and X (a plain multi-page TIFF) is time. A file with more than
one channel (an RGB image included) needs `channel`; a z-stack needs `z`; an axis that cannot be told apart is refused
with the axes found, in one line, before anything is decoded. Three or four planes stored as RGB planes in front of
Y and X (SYX: how tifffile writes a short stack unless told otherwise) are read as frames, or as colours with
`channel`.

Pixel size (µm per pixel, None when the file does not say): OME's PhysicalSizeX, ImageJ's resolution with its unit,
a TIFF resolution in centimetres, or what bioio reads from the file's own metadata. A TIFF resolution in inches is a
printing density (72 or 300 dpi), not a pixel size, and is ignored.
"""
import math
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

import numpy as np
import tifffile

from data_files import DataError, check_labels, check_pixels

TIFF_SUFFIXES = (".tif", ".tiff")
BIOIO_SUFFIXES = (".nd2", ".czi", ".lif", ".zarr")
FORMATS = "TIFF (.tif, .tiff: plain, ImageJ, OME-TIFF) always; ND2, CZI, LIF and OME-Zarr with " \
          "`pip install -r requirements-movie.txt`"
MAX_FRAME_PIXELS = 2 ** 28  # a frame declaring more (16384 x 16384) is refused before it is decoded
# micrometres per unit, for the units microscope files write
MICROMETRES = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
               "micrometer": 1.0, "micrometre": 1.0, "\\u00b5m": 1.0, "nm": 1e-3, "å": 1e-4, "angstrom": 1e-4}
# tifffile's axis codes: every code but these is an unnamed axis (I: image sequence, Q: other, ...)
KNOWN_AXES = "TZCSYX"


@dataclass
class Movie:
    frames: np.ndarray  # (T, Y, X), the file's dtype
    pixel_size: float | None  # µm per pixel; None when the file does not say
    axes: str  # the file's axes (singletons dropped) before a channel, position and frames were picked
    shape: tuple  # their sizes
    path: str
    frame_numbers: list = field(default_factory=list)  # the file's frame index of each frame kept

    def describe(self) -> str:
        size = f"{self.pixel_size:.4g} µm/px" if self.pixel_size else "pixel size not in the file"
        return (f"{self.path}: axes {self.axes} {' x '.join(map(str, self.shape))}; {len(self.frames)} frames of "
                f"{self.frames.shape[1]} x {self.frames.shape[2]} {self.frames.dtype}; {size}")


def parse_frames(text: str) -> slice:
    """'START:STOP' (either may be left out; Python's slice rules, negative from the end) -> slice.

    >>> parse_frames("7:13"), parse_frames(":5"), parse_frames(":")
    (slice(7, 13, None), slice(None, 5, None), slice(None, None, None))
    >>> parse_frames("3")
    Traceback (most recent call last):
    ...
    ValueError: frames must be START:STOP (e.g. 0:20, 5:, :10), got '3'
    """
    start, colon, stop = text.partition(":")
    try:
        if not colon:
            raise ValueError
        return slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)
    except ValueError:
        raise ValueError(f"frames must be START:STOP (e.g. 0:20, 5:, :10), got {text!r}") from None


def unit_to_micrometres(unit: str | None, default: float | None = 1.0) -> float | None:
    """µm per `unit` (None or empty: `default`; an unknown unit: None).

    >>> unit_to_micrometres("nm"), unit_to_micrometres("micron"), unit_to_micrometres("pixel")
    (0.001, 1.0, None)
    """
    if not unit:
        return default
    return MICROMETRES.get(str(unit).strip().lower())


def ome_pixel_size(ome_xml: str, series: int = 0) -> float | None:
    """PhysicalSizeX (µm) of the series-th Image of an OME-XML document; None where absent."""
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        return None
    pixels = [element for element in root.iter() if element.tag.endswith("}Pixels") or element.tag == "Pixels"]
    if series >= len(pixels) or pixels[series].get("PhysicalSizeX") is None:
        return None
    try:
        size = float(pixels[series].get("PhysicalSizeX"))
    except ValueError:
        return None
    scale = unit_to_micrometres(pixels[series].get("PhysicalSizeXUnit"))
    return positive(size * scale) if scale else None


def tiff_pixel_size(tif: tifffile.TiffFile, series: int) -> float | None:
    """µm per pixel of a TIFF: OME-XML, else ImageJ's unit and XResolution, else a resolution in centimetres."""
    if tif.is_ome and tif.ome_metadata:
        size = ome_pixel_size(tif.ome_metadata, series)
        if size:
            return size
    page = tif.series[series].pages[0] if tif.series[series].pages else tif.pages[0]
    tags = page.tags
    if "XResolution" not in tags:
        return None
    numerator, denominator = tags["XResolution"].value
    if not numerator or not denominator:
        return None
    per_unit = numerator / denominator  # pixels per unit
    if tif.is_imagej:
        scale = unit_to_micrometres((tif.imagej_metadata or {}).get("unit"), default=None)
        return positive(scale / per_unit) if scale else None
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    return positive(1e4 / per_unit) if unit == 3 else None  # 3: centimetre; 2: inch, a printing density


def positive(value: float) -> float | None:
    return float(value) if value and math.isfinite(value) and value > 0 else None


def pick_axes(axes: str, shape: tuple, path: str, channel: int | None, z: int | None = None) -> tuple[dict, str]:
    """Which index to take on each axis that is not time, Y or X, and the time axis's name; refuses with one line
    naming the axes found. Axes are tifffile's codes (singletons already dropped)."""
    found = f"axes {axes} {' x '.join(map(str, shape))}"
    if "Y" not in axes or "X" not in axes:
        raise DataError(f"{path}: no Y and X axes ({found}); expected frames of Y x X pixels")
    size = dict(zip(axes, shape))
    unnamed = [a for a in axes if a not in KNOWN_AXES]
    time_axis = "T" if "T" in axes else None
    if time_axis is None and len(unnamed) == 1:
        time_axis = unnamed[0]  # a plain multi-page TIFF: its pages are the frames
    elif unnamed and (time_axis or len(unnamed) > 1):
        raise DataError(f"{path}: cannot tell which axis is time ({found}); save it with named axes (OME-TIFF or "
                        f"ImageJ hyperstack), or one frame per page")
    take = {}
    if "S" in axes and axes.index("S") < axes.index("Y") and channel is None and time_axis is None:
        # 3 or 4 planes stored as RGB planes in front of Y, X: how tifffile writes a short stack by default (its own
        # warning says so); without --channel they are the frames
        return take, "S"
    colour = [a for a in "CS" if a in axes]
    if len(colour) > 1:
        raise DataError(f"{path}: channels on two axes ({found}); save one channel per file")
    if colour:
        axis = colour[0]
        what = "an RGB image" if axis == "S" and size[axis] in (3, 4) and time_axis is None else \
            f"{size[axis]} channels"
        if channel is None:
            raise DataError(f"{path}: {what} ({found}); choose one with --channel 0..{size[axis] - 1}")
        if not 0 <= channel < size[axis]:
            raise DataError(f"{path}: --channel {channel} out of range: {size[axis]} channels (0..{size[axis] - 1}; "
                            f"{found})")
        take[axis] = channel
    if "Z" in axes:
        if z is None:
            raise DataError(f"{path}: a z-stack of {size['Z']} planes ({found}); segment.py takes 2-D frames: "
                            f"choose a plane with --z 0..{size['Z'] - 1}")
        if not 0 <= z < size["Z"]:
            raise DataError(f"{path}: --z {z} out of range: {size['Z']} planes ({found})")
        take["Z"] = z
    return take, time_axis


def select(array, axes: str, take: dict, time_axis: str | None, frames: slice):
    """(T, Y, X) view of `array` (numpy or dask) with the picked index on each other axis, frames sliced."""
    index = tuple(take.get(a, slice(None)) for a in axes)
    kept = [a for a in axes if a not in take]
    array = array[index]
    order = ([kept.index(time_axis)] if time_axis else []) + [kept.index("Y"), kept.index("X")]
    array = array.transpose(order)
    if not time_axis:
        array = array[None]
    return array[frames]


def check_frame_size(shape: tuple, path: str):
    if math.prod(shape[-2:]) > MAX_FRAME_PIXELS:
        raise DataError(f"{path}: frames of {shape[-2]} x {shape[-1]} pixels, more than the limit of "
                        f"{MAX_FRAME_PIXELS}; refused before decoding")


def read_movie(path: str, channel: int | None = None, position: int | None = None, frames: slice = slice(None),
               z: int | None = None) -> Movie:
    """One channel of one position of a movie file as (T, Y, X); see the module's docstring."""
    if os.path.isdir(path) and not path.rstrip("/").lower().endswith(".zarr"):
        raise DataError(f"{path}: a folder; give a movie file (formats that work: {FORMATS}), or import a folder of "
                        f"frames with import_sequence.py")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    lower = path.rstrip("/").lower()
    if lower.endswith(TIFF_SUFFIXES):
        movie = read_tiff_movie(path, channel, position, frames, z)
    elif lower.endswith(BIOIO_SUFFIXES):
        movie = read_bioio_movie(path, channel, position, frames, z)
    else:
        raise DataError(f"{path}: unsupported format; formats that work: {FORMATS}")
    if not len(movie.frames):
        raise DataError(f"{path}: no frame selected by --frames (the file has {movie_length(movie)} frames)")
    check_pixels(movie.frames, path)
    return movie


def movie_length(movie: Movie) -> int:
    sizes = dict(zip(movie.axes, movie.shape))
    return next((sizes[a] for a in movie.axes if a not in "ZCSYX"), 1)


def read_tiff_movie(path: str, channel, position, frames: slice, z) -> Movie:
    try:
        tif = tifffile.TiffFile(path)
    except Exception as error:  # tifffile raises several types for broken files
        raise DataError(f"{path}: unreadable TIFF ({error}); formats that work: {FORMATS}") from error
    with tif:
        try:
            series = tif.series
            count = len(series)
            index = 0 if position is None else position
            if not 0 <= index < count:
                raise DataError(f"{path}: --position {index} out of range: {count} position(s) (0..{count - 1})")
            if position is None and sum(s.shape == series[0].shape for s in series) > 1:
                # several positions of one size (a thumbnail or a pyramid level is another size and is skipped)
                raise DataError(f"{path}: {count} positions (series); choose one with --position 0..{count - 1}")
            axes, shape = series[index].axes, tuple(series[index].shape)
        except DataError:
            raise
        except Exception as error:
            raise DataError(f"{path}: unreadable TIFF ({error})") from error
        check_frame_size(shape, path)
        take, time_axis = pick_axes(axes, shape, path, channel, z)
        pixel_size = tiff_pixel_size(tif, index)
        try:
            array = series[index].asarray()
        except Exception as error:
            raise DataError(f"{path}: unreadable TIFF ({error})") from error
    stack = np.ascontiguousarray(select(array, axes, take, time_axis, frames))
    numbers = list(range(dict(zip(axes, shape)).get(time_axis, 1)))[frames]
    return Movie(stack, pixel_size, axes, shape, path, numbers)


def read_bioio_movie(path: str, channel, position, frames: slice, z) -> Movie:
    suffix = os.path.splitext(path.rstrip("/"))[1].lower()
    try:
        from bioio import BioImage
    except ImportError:
        raise DataError(f"{path}: reading {suffix} files needs the optional reader bioio: "
                        f"pip install -r requirements-movie.txt (TIFF works without it)") from None
    try:
        image = BioImage(path)
        scenes = list(image.scenes)
    except Exception as error:  # bioio raises its own types, per plugin; the message names what is missing
        raise DataError(f"{path}: unreadable by bioio ({type(error).__name__}: {error}); formats that work: "
                        f"{FORMATS}") from error
    if position is None and len(scenes) > 1:
        raise DataError(f"{path}: {len(scenes)} positions (scenes); choose one with --position 0..{len(scenes) - 1}")
    index = 0 if position is None else position
    if not 0 <= index < len(scenes):
        raise DataError(f"{path}: --position {index} out of range: {len(scenes)} position(s) (0..{len(scenes) - 1})")
    try:
        image.set_scene(index)
        order = image.dims.order  # e.g. TCZYX, TCZYXS
        full_shape = tuple(image.dims.shape)
        sizes = list(full_shape)
        axes = "".join(a for a, s in zip(order, sizes) if s > 1 or a in "YX")
        shape = tuple(s for a, s in zip(order, sizes) if s > 1 or a in "YX")
        check_frame_size(shape, path)
        take, time_axis = pick_axes(axes, shape, path, channel, z)
        data = image.dask_data  # lazy: only the picked planes are decoded
        squeeze = tuple(k for k, (a, s) in enumerate(zip(order, sizes)) if s == 1 and a not in "YX")
        data = data.squeeze(axis=squeeze) if squeeze else data
        stack = np.ascontiguousarray(np.asarray(select(data, axes, take, time_axis, frames)))
        size = image.physical_pixel_sizes.X
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"{path}: unreadable by bioio ({type(error).__name__}: {error})") from error
    numbers = list(range(dict(zip(axes, shape)).get(time_axis, 1)))[frames]
    return Movie(stack, positive(size) if size else None, axes, shape, path, numbers)


def read_label_stack(path: str, frames: slice = slice(None)) -> np.ndarray:
    """A mask stack (T, Y, X) of integer instance labels (a TIFF, or a file bioio reads), frames sliced as the movie's."""
    movie = read_movie(path, frames=frames)
    return check_labels(movie.frames, path)
