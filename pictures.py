"""Pictures of data, predictions and training, for people who would rather look than read.

    python pictures.py sample  --root_dir demo_data --seq c --frame 39 --out_dir readme_imgs   # img.png, mask.png
    python pictures.py overlay --root_dir demo_data --pred_dir pred/demo --seq c --frames 10,39 --out_dir readme_imgs
    python pictures.py curves  --metrics runs/demo/metrics.csv --out readme_imgs/curves.png
    python pictures.py lineage --track_dir track/01_RES --out readme_imgs/lineage.png
    python pictures.py tracks  --track_dir track/01_RES --frames 50,100,150 --out readme_imgs/tracks.png

overlay: the image at the prediction's size (256 x 256), predicted instance outlines in yellow, GT outlines in cyan
(where they coincide, the prediction's colour wins), one file overlay_<seq>_<frame>.png per frame.
curves: train_loss, val_loss and val_instance_dice per epoch from a run's metrics.csv.
lineage: the lineage tree of a tracking result (track.py's res_track.txt): time across, one horizontal line per track,
a vertical connector from each mother's end to its daughters; the trees of the founders one below the other.
tracks: a few frames of a tracking result side by side, each cell filled with its track's colour (the same colour in
every frame), with the image underneath where --root_dir and --seq name the sequence.
"""
import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no screen needed
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd
from skimage.color import label2rgb
from skimage.segmentation import find_boundaries
from skimage.transform import resize

from border_core import resize_nearest
from cli_types import HelpFormatter, Renamed, int_list, non_negative_int, positive_int
from data_files import (RESULT_MASK_PATTERN, RESULT_TRACK_FILE, DataError, atomic_write, check_regular_file,
                        compact_labels, error_line, list_frames, mask_dir, numbered_files, prediction_path, read_mask,
                        read_prediction, read_tiff_2d, read_tracks, to_uint8_range)

PRED_COLOUR, GT_COLOUR = (255, 220, 0), (0, 220, 255)


def grey_to_rgb(image: np.ndarray, size=None) -> np.ndarray:
    grey = to_uint8_range(image)
    if size is not None:
        grey = resize(grey, size, order=1, preserve_range=True, anti_aliasing=True)
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


def save_png(path: str, rgb: np.ndarray):
    atomic_write(path, lambda tmp: plt.imsave(tmp, rgb, format="png"), ".png.tmp")


def save_figure(fig, out: str):
    """A figure written whole or not at all (a full disk leaves no cut file), in the format of out's extension."""
    extension = os.path.splitext(out)[1]
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format=extension[1:] or "png"), ".tmp" + extension)
    except DataError:
        raise
    except ValueError as error:  # an extension matplotlib has no writer for
        raise DataError(f"{out}: {error}") from error
    finally:
        plt.close(fig)


def read_metrics(metrics_csv: str) -> pd.DataFrame:
    """A run's metrics.csv, refused with one line when it is not one (empty, binary, without an epoch column)."""
    check_regular_file(metrics_csv)
    try:
        metrics = pd.read_csv(metrics_csv)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{metrics_csv}: not a metrics.csv of a run ({str(error).splitlines()[0]})") from error
    if "epoch" not in metrics or not pd.api.types.is_numeric_dtype(metrics["epoch"]):
        raise DataError(f"{metrics_csv}: not a metrics.csv of a run (no numeric epoch column; columns "
                        f"{list(metrics.columns)[:6]})")
    if metrics["epoch"].isna().all():
        raise DataError(f"{metrics_csv}: no epoch logged yet")
    return metrics


def sample_pictures(root_dir: str, sequence: str, frame: int, out_dir: str):
    """img.png (the frame) and mask.png (its instances in random colours) of one GT frame."""
    match = [f for f in list_frames(root_dir, sequence, with_masks=True) if f.number == frame]
    if not match:
        raise DataError(f"{os.path.join(root_dir, sequence)}: no frame {frame} with ground truth")
    image = read_tiff_2d(match[0].image_path)
    mask = read_mask(match[0].mask_path, image.shape)
    save_png(os.path.join(out_dir, "img.png"), grey_to_rgb(image))
    colours = label2rgb(mask, bg_label=0, colors=plt.get_cmap("tab20").colors)
    save_png(os.path.join(out_dir, "mask.png"), (colours * 255).astype(np.uint8))


def overlay(image: np.ndarray, prediction: np.ndarray, gt: np.ndarray | None) -> np.ndarray:
    """The image at the prediction's size with GT outlines and then predicted outlines drawn over it."""
    rgb = grey_to_rgb(image, prediction.shape)
    if gt is not None:
        rgb[find_boundaries(resize_nearest(gt, prediction.shape), mode="inner")] = GT_COLOUR
    rgb[find_boundaries(prediction, mode="inner")] = PRED_COLOUR
    return rgb


def overlay_pictures(root_dir: str, pred_dir: str, sequence: str, frames: list[int], out_dir: str,
                     native: bool = False) -> list[str]:
    """One PNG per asked frame, at the prediction's size: the challenge's 256 x 256, or with `native` the frame's own
    (inference.py --native). Every frame is checked (image, prediction, GT) before the first picture is written."""
    has_gt = os.path.isdir(mask_dir(root_dir, sequence))
    by_number = {f.number: f for f in list_frames(root_dir, sequence, with_masks=has_gt)}
    absent = [n for n in frames if n not in by_number]
    if absent:
        raise DataError(f"{os.path.join(root_dir, sequence)}: no frame {', '.join(map(str, absent))} "
                        f"(frames {min(by_number)}..{max(by_number)})")
    for number in frames:
        path = prediction_path(pred_dir, sequence, by_number[number].name, native)
        if not os.path.isfile(path):
            raise DataError(f"{path}: prediction of frame {number} not found")
    pictures = []
    for number in frames:
        frame = by_number[number]
        prediction = read_prediction(prediction_path(pred_dir, sequence, frame.name, native))
        gt = read_mask(frame.mask_path) if has_gt else None
        pictures.append((os.path.join(out_dir, f"overlay_{sequence}_{frame.name}.png"),
                         overlay(read_tiff_2d(frame.image_path), prediction, gt)))
    for path, rgb in pictures:
        save_png(path, rgb)
    return [path for path, _ in pictures]


def training_curves(metrics_csv: str, out: str):
    metrics = read_metrics(metrics_csv)
    per_epoch = metrics.groupby("epoch").mean(numeric_only=True)
    fig, loss_axis = plt.subplots(figsize=(6, 3.6), dpi=120)
    for column, style in (("train_loss", "-"), ("val_loss", "--")):
        if column in per_epoch:
            loss_axis.plot(per_epoch.index, per_epoch[column], style, label=column, color="tab:blue")
    loss_axis.set_xlabel("epoch")
    loss_axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    loss_axis.set_ylabel("cross-entropy", color="tab:blue")
    dice_axis = loss_axis.twinx()
    if "val_instance_dice" in per_epoch:
        dice_axis.plot(per_epoch.index, per_epoch["val_instance_dice"], "-o", ms=3, color="tab:red",
                       label="val_instance_dice")
    dice_axis.set_ylabel("Instance Dice", color="tab:red")
    dice_axis.set_ylim(0, 1)
    handles = loss_axis.get_legend_handles_labels()[0] + dice_axis.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="center right", bbox_to_anchor=(0.85, 0.5), fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)


def lineage_order(tracks: np.ndarray) -> list[int]:
    """Row order of the tracks in the tree: depth first from each root, daughters right below their mother, so that
    every family occupies a block of rows and no connector crosses another family."""
    children = {}
    for label, _, _, parent in tracks:
        children.setdefault(int(parent), []).append(int(label))
    order, stack = [], list(reversed(children.get(0, [])))
    while stack:  # O(tracks)
        label = stack.pop()
        order.append(label)
        stack.extend(reversed(children.get(label, [])))
    return order


def lineage_picture(track_dir: str, out: str, max_tracks: int = 400):
    """The lineage tree of res_track.txt (the first max_tracks rows of the tree, whole families first)."""
    tracks = read_tracks(os.path.join(track_dir, RESULT_TRACK_FILE))
    if not len(tracks):
        raise DataError(f"{os.path.join(track_dir, RESULT_TRACK_FILE)}: no track")
    by_label = {int(row[0]): row for row in tracks}
    order = lineage_order(tracks)[:max_tracks]
    row_of = {label: k for k, label in enumerate(order)}
    colours = plt.get_cmap("tab10").colors
    fig, axis = plt.subplots(figsize=(8, min(2 + 0.045 * len(order), 40)), dpi=120)
    root_of = {}
    for label in order:  # parents come before their daughters in the order
        parent = int(by_label[label][3])
        root_of[label] = root_of.get(parent, label) if parent in row_of else label
    for label in order:
        _, begin, end, parent = (int(v) for v in by_label[label])
        y, colour = row_of[label], colours[list(dict.fromkeys(root_of.values())).index(root_of[label]) % 10]
        axis.plot([begin, end + 1], [y, y], color=colour, lw=1.6, solid_capstyle="butt")
        if parent in row_of:  # the connector: from the mother's last frame down to the daughter's first
            axis.plot([begin, begin], [row_of[parent], y], color=colour, lw=0.8)
    axis.set_xlabel("frame")
    axis.set_ylabel("tracks (daughters below their mother)")
    axis.set_yticks([])
    axis.set_ylim(len(order), -1)
    axis.set_xlim(0, int(tracks[:, 2].max()) + 1)
    shown = f"first {len(order)} of {len(tracks)} tracks" if len(order) < len(tracks) else f"{len(tracks)} tracks"
    divisions = int((np.unique(tracks[:, 3][tracks[:, 3] > 0], return_counts=True)[1] >= 2).sum())
    axis.set_title(f"lineage: {shown}, {divisions} divisions", fontsize=10)
    axis.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out)


def track_colours(n_tracks: int) -> np.ndarray:
    """A fixed, well-spread colour per track id (index 0, the background, black): neighbours get unrelated hues."""
    rng = np.random.default_rng(0)
    colours = plt.get_cmap("hsv")(rng.permutation(np.linspace(0, 1, max(n_tracks, 1), endpoint=False)))[:, :3]
    colours = 0.35 + 0.65 * colours  # lighter: outlines and the image stay visible
    return np.vstack([[0, 0, 0], colours])


def tracks_picture(track_dir: str, frames: list[int], out: str, root_dir: str | None = None,
                   sequence: str | None = None):
    """Frames of a tracking result side by side, cells coloured by track id, outlined in black; over the image when
    root_dir and sequence are given (the image resized to the result's size)."""
    masks = numbered_files(track_dir, RESULT_MASK_PATTERN) if os.path.isdir(track_dir) else {}
    absent = [n for n in frames if n not in masks]
    if absent:
        raise DataError(f"{track_dir}: no result mask of frame {', '.join(map(str, absent))}")
    images = {}
    if root_dir is not None:
        by_number = {f.number: f for f in list_frames(root_dir, sequence, with_masks=False)}
        missing = [n for n in frames if n not in by_number]
        if missing:
            raise DataError(f"{os.path.join(root_dir, sequence)}: no image of frame {', '.join(map(str, missing))}")
        images = {n: read_tiff_2d(by_number[n].image_path) for n in frames}
    maps = {n: compact_labels(read_prediction(masks[n])) for n in frames}
    # colours by each track id's rank among the ids shown (the same in every panel), never a table indexed by the
    # id itself: an id of 4e9 would ask for gigabytes
    ids = np.unique(np.concatenate([np.unique(m) for m in maps.values()]))
    ids = ids[ids > 0]
    colours = track_colours(len(ids))
    panels = []
    for n in frames:
        labels = maps[n]
        ranks = np.where(labels > 0, np.searchsorted(ids, labels) + 1, 0)
        rgb = colours[ranks]
        if n in images:
            grey = grey_to_rgb(images[n], labels.shape) / 255.0
            rgb = np.where(labels[..., None] > 0, 0.55 * rgb + 0.45 * grey, grey)
        rgb[find_boundaries(labels, mode="inner")] = 0
        panels.append((n, rgb))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5), dpi=120, squeeze=False)
    for axis, (n, rgb) in zip(axes[0], panels):
        axis.imshow(rgb, interpolation="nearest")
        axis.set_title(f"frame {n}: {len(np.unique(maps[n])) - 1} cells", fontsize=9)
        axis.axis("off")
    fig.suptitle("cells coloured by track id (a daughter gets a new colour)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = {"formatter_class": HelpFormatter}
    sample = commands.add_parser("sample", help="img.png and mask.png of one GT frame", **defaults)
    sample.add_argument("--root_dir", required=True, help="data root")
    sample.add_argument("--seqs", "--seq", dest="seq", action=Renamed, default="c", help="the sequence")
    sample.add_argument("--frames", "--frame", dest="frame", type=non_negative_int, default=0, help="the frame number")
    sample.add_argument("--out_dir", default="readme_imgs", help="folder of the pictures")
    over = commands.add_parser("overlay", help="predicted (yellow) and GT (cyan) outlines over the image", **defaults)
    over.add_argument("--root_dir", required=True, help="data root")
    over.add_argument("--pred_dir", required=True, help="inference.py's prediction folder")
    over.add_argument("--seqs", "--seq", dest="seq", action=Renamed, default="c", help="the sequence")
    over.add_argument("--frames", type=int_list, default="0", help="comma-separated frame numbers")
    over.add_argument("--native", action="store_true", help="the native-size predictions <seq>/mask<frame>.tif")
    over.add_argument("--out_dir", default="readme_imgs", help="folder of the pictures")
    curves = commands.add_parser("curves", help="training curves of a run", **defaults)
    curves.add_argument("--metrics", required=True, help="a run's metrics.csv")
    curves.add_argument("--out", default="readme_imgs/curves.png", help="the picture (format from the extension)")
    lineage = commands.add_parser("lineage", help="lineage tree of a tracking result", **defaults)
    lineage.add_argument("--track_dir", required=True, help="track.py's result folder (res_track.txt)")
    lineage.add_argument("--max_tracks", type=positive_int, default=400, help="draw at most this many tracks")
    lineage.add_argument("--out", default="readme_imgs/lineage.png", help="the picture (format from the extension)")
    tracks = commands.add_parser("tracks", help="frames of a tracking result coloured by track id", **defaults)
    tracks.add_argument("--track_dir", required=True, help="track.py's result folder (mask000.tif ...)")
    tracks.add_argument("--frames", type=int_list, default="0", help="comma-separated frame numbers")
    tracks.add_argument("--root_dir", default=None, help="data root: draw the images underneath")
    tracks.add_argument("--seq", default=None, help="the sequence of --root_dir")
    tracks.add_argument("--out", default="readme_imgs/tracks.png", help="the picture (format from the extension)")
    args = parser.parse_args(argv)
    try:
        run(args)
    except (DataError, OSError) as error:
        sys.exit(error_line(error))


def run(args):
    if args.command == "sample":
        sample_pictures(args.root_dir, args.seq, args.frame, args.out_dir)
        print(f"wrote {args.out_dir}/img.png and {args.out_dir}/mask.png")
    elif args.command == "overlay":
        for path in overlay_pictures(args.root_dir, args.pred_dir, args.seq,
                                     args.frames, args.out_dir, args.native):
            print(f"wrote {path}")
    elif args.command == "lineage":
        lineage_picture(args.track_dir, args.out, args.max_tracks)
        print(f"wrote {args.out}")
    elif args.command == "tracks":
        if (args.root_dir is None) != (args.seq is None):
            raise DataError(f"{args.root_dir or args.seq}: --root_dir and --seq go together")
        tracks_picture(args.track_dir, args.frames, args.out, args.root_dir, args.seq)
        print(f"wrote {args.out}")
    else:
        training_curves(args.metrics, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
