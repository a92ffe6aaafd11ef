"""Bring your own movie into the challenge layout, as one named sequence.

    python import_sequence.py --images movie.tif --masks masks.tif --root_dir data --name a
    python import_sequence.py --images frames/ --masks masks/ --root_dir data --name c --crop 320 320
    python import_sequence.py --images movie.tif --root_dir data --name d            # no GT: a test sequence
    python import_sequence.py --images movie.tif --masks masks.tif --root_dir data --name b --frames 7:13

--images / --masks: a movie file or a folder of single-frame TIFFs, ordered by the last number in each file name
(paired by that number when both are folders; two names with the same number, img_1.tif and img_01.tif, are refused).
A movie file is read as segment.py reads it (movie_io.py): TIFF stacks, OME-TIFF and ImageJ hyperstacks always, ND2,
CZI, LIF through the optional extra requirements-movie.txt; --channel, --position and --z pick one channel, position
and plane (a single RGB or multi-channel image without --channel is refused, naming its axes). Writes root_dir/<name>/t0000.tif ... and,
with masks, root_dir/<name>_GT/man_seg0000.tif ...; images keep their dtype, masks become uint16 (uint32 above 65535
labels). --crop H W cuts a window of H x W that follows the labelled colony: centred on the bounding box of each
frame's mask (the last one seen for a frame without labels), shifted to stay inside the frame.

The sequence is written to a temporary folder and moved into place when complete; an existing sequence is never
overwritten.
"""
import argparse
import os
import re
import sys

import numpy as np

from cli_types import HelpFormatter
from data_files import DataError, check_labels, error_line, read_tiff_2d, write_sequence
from movie_io import parse_frames, read_movie


def frame_number(name: str):
    numbers = re.findall(r"\d+", os.path.splitext(name)[0])
    return int(numbers[-1]) if numbers else None


def read_frames(path: str, channel=None, position=None, z=None) -> tuple[list[int], list]:
    """(frame numbers, 2-D arrays) of a movie file or of a folder of single-frame TIFFs."""
    if os.path.isdir(path) and not path.rstrip("/").lower().endswith(".zarr"):
        names = [n for n in os.listdir(path) if n.lower().endswith((".tif", ".tiff"))]
        if not names:
            raise DataError(f"{path}: no TIFF file in the folder")
        numbers = [frame_number(n) for n in names]
        if None in numbers:
            order = sorted(range(len(names)), key=lambda k: names[k])
            print(f"note: {path}: {names[numbers.index(None)]} has no number in its name: frames ordered by name")
            numbers = list(range(len(names)))
        else:
            first = {}
            for name, number in sorted(zip(names, numbers)):
                if number in first:
                    raise DataError(f"{path}: {first[number]} and {name} both are frame {number}; rename one")
                first[number] = name
            order = sorted(range(len(names)), key=lambda k: numbers[k])
        return [numbers[k] for k in order], [read_tiff_2d(os.path.join(path, names[k])) for k in order]
    movie = read_movie(path, channel, position, slice(None), z)
    return movie.frame_numbers, list(movie.frames)


def colony_windows(masks, crop):
    """Per frame, the (top, left) of a crop x crop window centred on the labelled pixels' bounding box."""
    windows, centre = [], None
    for mask in masks:
        rows, cols = np.nonzero(mask)
        if len(rows):
            centre = ((rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2)
        if centre is None:
            centre = (mask.shape[0] // 2, mask.shape[1] // 2)
        top = int(np.clip(centre[0] - crop[0] // 2, 0, mask.shape[0] - crop[0]))
        left = int(np.clip(centre[1] - crop[1] // 2, 0, mask.shape[1] - crop[1]))
        windows.append((top, left))
    return windows


def import_sequence(images_path: str, root_dir: str, name: str, masks_path: str | None = None, crop=None,
                    frames: slice = slice(None), channel=None, position=None, z=None) -> int:
    """Write one sequence in the challenge layout (`frames`: which of the input frames, in order; channel, position,
    z: what to take from a movie file with several); returns the number of frames written."""
    for target in [os.path.join(root_dir, name)] + ([os.path.join(root_dir, f"{name}_GT")] if masks_path else []):
        if os.path.exists(target):
            raise DataError(f"{target}: already exists; choose another --name or remove it first")
    if crop is not None and min(crop) <= 0:
        raise DataError(f"{images_path}: --crop must be two positive sizes, got {tuple(crop)}")
    numbers, images = read_frames(images_path, channel, position, z)
    numbers, images = numbers[frames], images[frames]
    if not images:
        raise DataError(f"{images_path}: no frame selected")
    masks = None
    if masks_path:
        mask_numbers, masks = read_frames(masks_path)
        mask_numbers, masks = mask_numbers[frames], masks[frames]
        if mask_numbers != numbers:
            missing = sorted(set(numbers) ^ set(mask_numbers))
            raise DataError(f"{masks_path}: frames do not pair with {images_path} (unpaired frame numbers {missing[:10]})")
        for number, image, mask in zip(numbers, images, masks):
            if mask.shape != image.shape:
                raise DataError(f"{masks_path}: frame {number} mask size {mask.shape} differs from image {image.shape}")
            check_labels(mask, f"{masks_path}: frame {number}")
    if crop is not None:
        if masks is None:
            raise DataError("--crop follows the labelled colony and needs --masks")
        height, width = images[0].shape
        if crop[0] > height or crop[1] > width:
            raise DataError(f"{images_path}: crop {tuple(crop)} is larger than the frames ({height}, {width})")
        windows = [np.s_[top:top + crop[0], left:left + crop[1]] for top, left in colony_windows(masks, crop)]
        images = [image[w] for image, w in zip(images, windows)]
        masks = [mask[w] for mask, w in zip(masks, windows)]

    pairs = zip(images, masks if masks is not None else [None] * len(images))
    return write_sequence(root_dir, name, pairs, with_gt=masks is not None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--images", required=True, help="TIFF stack or folder of single-frame TIFFs")
    parser.add_argument("--masks", default=None, help="instance masks, same form; omit for a sequence without GT")
    parser.add_argument("--root_dir", required=True, help="data root to write into (challenge layout)")
    parser.add_argument("--name", required=True, help="sequence name, e.g. a, c or trpL")
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="cut an H x W window that follows the labelled colony")
    parser.add_argument("--frames", default=":", metavar="START:STOP", help="a range of the input frames (default: all)")
    parser.add_argument("--channel", type=int, default=None, help="channel of a multi-channel movie file (0-based)")
    parser.add_argument("--position", type=int, default=None, help="position (series, scene) of a movie file")
    parser.add_argument("--z", type=int, default=None, help="plane of a z-stack")
    args = parser.parse_args(argv)
    try:
        frames = parse_frames(args.frames)
    except ValueError as error:
        parser.error(f"argument --frames: {error}")
    try:
        count = import_sequence(args.images, args.root_dir, args.name, args.masks, args.crop, frames, args.channel,
                                args.position, args.z)
    except (DataError, OSError) as error:
        sys.exit(error_line(error))
    print(f"wrote {count} frames to {os.path.join(args.root_dir, args.name)}"
          + (f" and {args.name}_GT" if args.masks else ""))


if __name__ == "__main__":
    main()
