"""Your own movie, end to end: one command from a microscope file to masks, tracks, lineage, a per-cell table and an
overlay movie.

    python segment.py movie.tif --out results/movie
    python segment.py movie.nd2 --out results/movie --channel 1 --position 0 --frames 0:50
    python segment.py movie.ome.tif --out results/movie --gt masks.tif       # also score against a mask stack
    python segment.py movie.tif --out results/movie --model runs/mine/checkpoints/best.ckpt --view

Reads TIFF (plain, ImageJ, OME-TIFF) always, and ND2, CZI, LIF, OME-Zarr through bioio (the optional extra
`pip install -r requirements-movie.txt`); picks one channel (--channel), position (--position), plane (--z) and the
frames START:STOP (--frames). The pixel size comes from the file (or --pixel_size, µm/px); with it, the cells' width in
px is --cell_width_um over the pixel size and the frames are rescaled to the model's own cell width; without it the
width is estimated from the frames. Predicts with the bundled model (or --model), registers consecutive frames to
follow stage drift, links the cells into tracks and writes, into --out (staged in a hidden folder beside it and
renamed into place whole):

    labels.ome.tif   the label stack, T x Y x X, labels = track ids, with the pixel size (napari opens it as Labels)
    res_track.txt    the tracks in the Cell Tracking Challenge's format: `label begin end parent`
    tracks.csv       one row per track: parent, generation, frames, division, area and length at birth and end,
                     growth rate (track.py's table)
    cells.csv        one row per cell per frame: frame, track, parent, generation, area / length / width in px and
                     µm, centroid, mean intensity, the frame's drift (cell_table.py); cells.parquet too where pandas
                     can write Parquet (pyarrow installed)
    drift.csv        per frame: the shift since the frame before and the drift since frame 0, px
    lineage.png      the lineage tree
    overlay.gif      the frames with each cell outlined in its track's colour and its track id (opens in a browser)
    segment.json     what was read and how (file, channel, frames, pixel size, cell width, model) and the counts
    instance_dice.csv   with --gt: the Instance Dice of every frame against the mask stack

`python view.py <out>` (or --view here) opens the image, labels and tracks in napari (optional extra).
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np

from cli_types import HelpFormatter, add_test_flips, non_negative_int, positive_float
from data_files import DataError, error_line, replace_folder, to_uint8_range
from movie_io import Movie, parse_frames, read_label_stack, read_movie

DEFAULT_CELL_WIDTH_UM = 1.0  # µm: E. coli and most rod-shaped bacteria are 0.5-1.5 µm wide
OVERLAY_MAX_SIDE = 2048  # px: larger frames are shrunk (by a whole factor) in overlay.gif
OVERLAY_FRAME_MS = 250


def frames_type(text: str) -> slice:
    try:
        return parse_frames(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("movie", help="the movie file (TIFF; ND2, CZI, LIF, OME-Zarr with requirements-movie.txt)")
    parser.add_argument("--out", "--out_dir", dest="out", required=True, help="result folder")
    parser.add_argument("--channel", type=non_negative_int, default=None,
                        help="channel to segment (0-based), needed where the file has several (RGB included) (default: none: one channel)")
    parser.add_argument("--position", type=non_negative_int, default=None,
                        help="position (series, scene) to segment, needed where the file has several (default: none: one position)")
    parser.add_argument("--z", type=non_negative_int, default=None, help="plane of a z-stack (0-based) (default: none: 2-D frames)")
    parser.add_argument("--frames", type=frames_type, default=":", metavar="START:STOP",
                        help="the frames to segment, e.g. 0:50; ':' is every frame (default: %(default)s)")
    parser.add_argument("--pixel_size", type=positive_float, default=None, metavar="UM",
                        help="µm per pixel (default: from the file's metadata; without either, the cells' width is "
                             "estimated from the frames)")
    parser.add_argument("--cell_width_um", type=positive_float, default=DEFAULT_CELL_WIDTH_UM,
                        help="the cells' width in µm, used with the pixel size")
    parser.add_argument("--cell_width", type=positive_float, default=None, metavar="PX",
                        help="the cells' width in px in these frames, overriding the pixel size and --cell_width_um "
                             "(default: from the pixel size, else estimated)")
    parser.add_argument("--model", default=None,
                        help="a checkpoint (.ckpt or exported .pt) (default: the bundled model "
                             "models/bacteria_generalist.pt)")
    add_test_flips(parser)
    parser.add_argument("--gt", default=None, metavar="MASKS",
                        help="a mask stack (same frames and size) to score the prediction against, Instance Dice "
                             "(default: none)")
    parser.add_argument("--register", choices=("masks", "none"), default="masks",
                        help="follow stage drift by registering consecutive frames' masks, or not")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing result folder")
    parser.add_argument("--view", action="store_true", help="open the result in napari afterwards (view.py)")
    return parser


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def frames_text(frames: slice) -> str:
    return f"{'' if frames.start is None else frames.start}:{'' if frames.stop is None else frames.stop}"


def check_out_folder(out: str, overwrite: bool):
    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"{out}: already exists; choose another --out, remove it or pass --overwrite")


def resolve_model(path: str | None) -> str:
    from inference import BUNDLED_MODEL
    if path is None:
        if not os.path.isfile(BUNDLED_MODEL):
            raise DataError(f"{BUNDLED_MODEL}: the bundled model is missing (make pretrained rebuilds it); or give "
                            f"--model")
        return BUNDLED_MODEL
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such checkpoint; leave --model out to use the bundled model "
                        f"(models/bacteria_generalist.pt)")
    return path


def cell_width_px(movie: Movie, args) -> tuple[float | None, str]:
    """The cells' width in px to predict at, and how it was found."""
    if args.cell_width:
        return args.cell_width, "given (--cell_width)"
    size, source = (args.pixel_size, "--pixel_size") if args.pixel_size else (movie.pixel_size, "the file")
    if size:
        return args.cell_width_um / size, f"{args.cell_width_um:g} µm at {size:.4g} µm/px from {source}"
    return None, "estimated from the frames (no pixel size in the file; --pixel_size gives one)"


def score_against(gt: np.ndarray, labels: list) -> list[float]:
    from metrics import instance_dice
    return [instance_dice(g, p) for g, p in zip(gt, labels)]


# ---------------------------------------------------------------------------------------------------------- pictures

def overlay_frames(images, track_maps, max_side: int = OVERLAY_MAX_SIDE):
    """RGB frames (PIL images): the image in grey, each cell's outline in its track's colour, its track id beside
    its centre. Frames larger than max_side are shrunk by a whole factor (outlines drawn after shrinking)."""
    from PIL import Image, ImageDraw
    from skimage.segmentation import find_boundaries
    from cell_table import cell_measurements
    from pictures import track_colours
    top = max(int(np.max(m)) if np.size(m) else 0 for m in track_maps) if len(track_maps) else 0
    colours = (np.asarray(track_colours(top)) * 255).astype(np.uint8)
    step = max(1, math.ceil(max(np.shape(track_maps[0])) / max_side)) if len(track_maps) else 1
    frames = []
    for image, labels in zip(images, track_maps):  # O(frames); the text below is O(cells)
        grey = to_uint8_range(np.asarray(image), "percentile")[::step, ::step].astype(np.uint8)
        labels = np.asarray(labels)[::step, ::step]
        rgb = np.repeat(grey[..., None], 3, axis=2)
        edge = find_boundaries(labels, mode="inner")
        rgb[edge] = colours[labels[edge].astype(np.int64)]
        picture = Image.fromarray(rgb)
        draw = ImageDraw.Draw(picture)
        cells = cell_measurements(labels)
        for label, (y, x) in zip(cells["ids"], cells["centroid"]):
            draw.text((x - 4, y - 5), str(int(label)), fill=tuple(int(c) for c in colours[label]))
        frames.append(picture)
    return frames


def write_gif(path: str, frames):
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=OVERLAY_FRAME_MS, loop=0,
                   optimize=False)


def write_label_stack(path: str, track_maps, pixel_size: float | None):
    """labels.ome.tif: OME-TIFF, axes TYX, with PhysicalSizeX/Y where known; zlib-compressed (labels compress well)."""
    import tifffile
    stack = np.stack([np.asarray(m) for m in track_maps])
    metadata = {"axes": "TYX"}
    if pixel_size:
        metadata.update(PhysicalSizeX=pixel_size, PhysicalSizeY=pixel_size, PhysicalSizeXUnit="µm",
                        PhysicalSizeYUnit="µm")
    tifffile.imwrite(path, stack, ome=True, metadata=metadata, compression="zlib")


# ---------------------------------------------------------------------------------------------------------- writing

def write_outputs(out: str, overwrite: bool, write):
    """Call write(staging folder) and put the folder in place whole (data_files.replace_folder)."""
    replace_folder(out, write, "segment")


def segment(args) -> dict:
    """Read, predict, register, link, measure and write; returns the summary that segment.json holds."""
    import track
    from cell_table import cell_table
    say = print
    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    check_out_folder(args.out, args.overwrite)
    movie = read_movie(args.movie, args.channel, args.position, args.frames, args.z)
    gt = None
    if args.gt:
        gt = read_label_stack(args.gt, args.frames)
        if gt.shape != movie.frames.shape:
            raise DataError(f"{args.gt}: mask stack of {' x '.join(map(str, gt.shape))} (frames {frames_text(args.frames)}) "
                            f"differs from the movie's {' x '.join(map(str, movie.frames.shape))}")
    model_path = resolve_model(args.model)
    say(movie.describe())
    width, how = cell_width_px(movie, args)
    say(f"cell width: {f'{width:.1f} px, ' if width else ''}{how}")

    from inference import predict_images
    from unet import load_model
    model = load_model(model_path, test_flips=args.test_flips)
    say(f"model: {model_path} (trained at cells {model.hparams.cell_width or 'of the challenge frames'}"
        f"{' px wide' if model.hparams.cell_width else ''})")
    every = max(1, len(movie.frames) // 10)
    labels = predict_images(model, list(movie.frames), cell_width=width, device=args.device,
                            progress=lambda done, total: (done % every == 0 or done == total) and
                            say(f"predicted {done}/{total} frames"))

    shifts = track.register_frames(labels) if args.register == "masks" else np.zeros((len(labels), 2))
    track_maps, tracks = track.link_tracks(labels, shifts if args.register == "masks" else None)
    statistics = track.track_statistics(track_maps, tracks)
    drift = track.drift_table(shifts)
    warning = track.linking_warning(tracks, len(track_maps))
    divisions = int(statistics["divided"].sum())
    founders = int(np.count_nonzero((tracks[:, 1] == 0) & (tracks[:, 3] == 0))) if len(tracks) else 0
    say(f"tracked: {len(tracks)} tracks, {divisions} divisions, {founders} cells in frame 0 with no parent, "
        f"{len(np.unique(np.asarray(track_maps[-1]))) - 1} cells in the last frame; largest shift between frames "
        f"{np.abs(shifts).max(initial=0):.0f} px")
    if warning:
        print(warning, file=sys.stderr)
    pixel_size = args.pixel_size or movie.pixel_size
    cells = cell_table(track_maps, tracks, movie.frames, pixel_size, drift[["drift_y", "drift_x"]].values)

    scores = None
    if gt is not None:
        scores = score_against(gt, labels)
        say(f"Mean Instance Dice: {np.mean(scores):.6f} ({len(scores)} frames against {args.gt})")
    summary = {
        "movie": os.path.abspath(args.movie), "channel": args.channel, "position": args.position, "z": args.z,
        "frames": frames_text(args.frames), "frame_numbers": movie.frame_numbers, "axes": movie.axes,
        "shape": list(movie.shape), "pixel_size_um": pixel_size,
        "pixel_size_from": "--pixel_size" if args.pixel_size else ("file" if movie.pixel_size else None),
        "cell_width_px": width, "cell_width_how": how, "model": os.path.abspath(model_path),
        "register": args.register, "tracks": int(len(tracks)), "divisions": divisions, "founders": founders,
        "cells_last_frame": int(len(np.unique(np.asarray(track_maps[-1]))) - 1), "warning": warning,
        "mean_instance_dice": None if scores is None else float(np.mean(scores)),
        "gt": None if args.gt is None else os.path.abspath(args.gt)}

    def write(folder):
        from data_files import format_tracks
        from pictures import lineage_picture
        write_label_stack(os.path.join(folder, "labels.ome.tif"), track_maps, pixel_size)
        with open(os.path.join(folder, "res_track.txt"), "w") as file:
            file.write(format_tracks(tracks))
        statistics.to_csv(os.path.join(folder, "tracks.csv"), index=False)
        drift.to_csv(os.path.join(folder, "drift.csv"), index=False)
        cells.to_csv(os.path.join(folder, "cells.csv"), index=False)
        try:
            cells.to_parquet(os.path.join(folder, "cells.parquet"), index=False)
        except ImportError:
            say("cells.parquet not written: pandas needs pyarrow (or fastparquet) for Parquet; cells.csv has the same")
        if len(tracks):
            lineage_picture(folder, os.path.join(folder, "lineage.png"))
        write_gif(os.path.join(folder, "overlay.gif"), overlay_frames(movie.frames, track_maps))
        if scores is not None:
            import pandas as pd
            pd.DataFrame({"frame": np.arange(len(scores)), "instance_dice": scores}).to_csv(
                os.path.join(folder, "instance_dice.csv"), index=False)
        summary["cpu_seconds"] = round(cpu_seconds() - start_cpu, 1)
        summary["wall_seconds"] = round(time.perf_counter() - start_wall, 1)
        with open(os.path.join(folder, "segment.json"), "w") as file:
            json.dump(summary, file, indent=1, ensure_ascii=False)

    write_outputs(args.out, args.overwrite, write)
    say(f"wrote {args.out}: labels.ome.tif, res_track.txt, tracks.csv, cells.csv, drift.csv, lineage.png, "
        f"overlay.gif, segment.json; {summary['cpu_seconds']:.0f} CPU-seconds, {summary['wall_seconds']:.0f} s")
    return summary


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = segment(args)
    except (DataError, OSError) as error:
        sys.exit(error_line(error))
    if args.view:
        import view
        view.main([args.out])
    return summary


if __name__ == "__main__":
    main()
