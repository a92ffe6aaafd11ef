"""Pictures of data, predictions and training, for people who would rather look than read.

    python pictures.py sample  --root_dir demo_data --seq c --frame 39 --out_dir readme_imgs   # img.png, mask.png
    python pictures.py overlay --root_dir demo_data --pred_dir pred/demo --seq c --frames 10,39 --out_dir readme_imgs
    python pictures.py curves  --metrics runs/demo/metrics.csv --out readme_imgs/curves.png

overlay: the image at the prediction's size (256 x 256), predicted instance outlines in yellow, GT outlines in cyan
(where they coincide, the prediction's colour wins), one file overlay_<seq>_<frame>.png per frame.
curves: train_loss, val_loss and val_instance_dice per epoch from a run's metrics.csv.
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
from dataset import (DataError, atomic_write, error_line, list_frames, mask_dir, prediction_path, read_mask,
                     read_prediction, read_tiff_2d, to_uint8_range)

PRED_COLOUR, GT_COLOUR = (255, 220, 0), (0, 220, 255)


def grey_to_rgb(image: np.ndarray, size=None) -> np.ndarray:
    grey = to_uint8_range(image)
    if size is not None:
        grey = resize(grey, size, order=1, preserve_range=True, anti_aliasing=True)
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


def save_png(path: str, rgb: np.ndarray):
    atomic_write(path, lambda tmp: plt.imsave(tmp, rgb, format="png"), ".png.tmp")


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


def overlay_pictures(root_dir: str, pred_dir: str, sequence: str, frames: list[int], out_dir: str) -> list[str]:
    """One PNG per asked frame. Every frame is checked (image, prediction, GT) before the first picture is written."""
    has_gt = os.path.isdir(mask_dir(root_dir, sequence))
    by_number = {f.number: f for f in list_frames(root_dir, sequence, with_masks=has_gt)}
    absent = [n for n in frames if n not in by_number]
    if absent:
        raise DataError(f"{os.path.join(root_dir, sequence)}: no frame {', '.join(map(str, absent))} "
                        f"(frames {min(by_number)}..{max(by_number)})")
    for number in frames:
        path = prediction_path(pred_dir, sequence, by_number[number].name)
        if not os.path.isfile(path):
            raise DataError(f"{path}: prediction of frame {number} not found")
    pictures = []
    for number in frames:
        frame = by_number[number]
        prediction = read_prediction(prediction_path(pred_dir, sequence, frame.name))
        gt = read_mask(frame.mask_path) if has_gt else None
        pictures.append((os.path.join(out_dir, f"overlay_{sequence}_{frame.name}.png"),
                         overlay(read_tiff_2d(frame.image_path), prediction, gt)))
    for path, rgb in pictures:
        save_png(path, rgb)
    return [path for path, _ in pictures]


def training_curves(metrics_csv: str, out: str):
    metrics = pd.read_csv(metrics_csv)
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
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=os.path.splitext(out)[1][1:] or "png"),
                 ".tmp" + os.path.splitext(out)[1])
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="img.png and mask.png of one GT frame")
    sample.add_argument("--root_dir", required=True)
    sample.add_argument("--seq", default="c")
    sample.add_argument("--frame", type=int, default=0)
    sample.add_argument("--out_dir", default="readme_imgs")
    over = commands.add_parser("overlay", help="predicted (yellow) and GT (cyan) outlines over the image")
    over.add_argument("--root_dir", required=True)
    over.add_argument("--pred_dir", required=True)
    over.add_argument("--seq", default="c")
    over.add_argument("--frames", default="0", help="comma-separated frame numbers")
    over.add_argument("--out_dir", default="readme_imgs")
    curves = commands.add_parser("curves", help="training curves of a run")
    curves.add_argument("--metrics", required=True, help="a run's metrics.csv")
    curves.add_argument("--out", default="readme_imgs/curves.png")
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
                                     [int(f) for f in args.frames.split(",")], args.out_dir):
            print(f"wrote {path}")
    else:
        training_curves(args.metrics, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
