"""Predict instance masks with a trained checkpoint.

    python inference.py --root_dir data --model runs/default/checkpoints/best.ckpt --pred_dir pred
    python inference.py --root_dir data --split val --model ... --pred_dir pred   # sequence c, for eval.py
    python inference.py --root_dir data --seqs c,d --model ... --pred_dir pred

Writes pred_dir/<seq>/<image name>_256.tif (e.g. pred/d/t0000_256.tif): the instance map at 256 x 256, resized by
nearest neighbour, in the narrowest unsigned dtype that holds the frame's labels. Each file is written to a temporary
name and renamed, so a file is either whole or absent. A pred_dir/<seq> that holds predictions of frames this run does
not have (left from another run) is refused; --overwrite deletes the old predictions of each sequence first.
"""
import argparse
import multiprocessing
import os
import sys
from collections import deque

import numpy as np
import torch
from torch.utils.data import DataLoader

import data_files
from border_core import SCORE_SIZE, instances_from_border_core, resize_nearest_exact
from data_files import (NATIVE_PREDICTION_PATTERN, PREDICTION_PATTERN, DataError, Frame, default_sequences,
                        error_line, frame_shape, list_frames, narrowest_unsigned, prediction_name,
                        write_tiff_atomically)
from cli_types import HelpFormatter, Renamed, add_test_flips, non_negative_int, positive_float, positive_int
from dataset import UnlabelledFrames
from folder_lock import lock_folder
from postprocess_torch import instances_from_border_core_torch
from energy import EnergyMeter
from scale import frame_scale, median_cell_width
from precision import PRECISIONS, autocast_dtype
from tiling import TILES_PER_PASS, TILINGS
from unet import UNet, load_model


MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
BUNDLED_MODEL = os.path.join(MODELS_DIR, "bacteria_generalist.pt")
# at most this many input pixels in a batch of frames: bounds the float32 logits a batch holds (12 bytes a pixel)
BATCH_PIXELS = 2 ** 24


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.inference_mode()
def border_core_maps(model: UNet, loader, device: str | torch.device = "auto", instances: bool = False,
                     precision: str = "auto", tile_batch: int | None = None, tiling: str = "auto",
                     channels_last: bool = True):
    """Yield (indices, uint8 border-core maps) per batch of a loader of (images, indices), as the model's view sees
    the frames (views.py). On the GPU when there is one (the baseline left the model on the CPU), there in bf16 (or
    fp16) autocast, on a CPU in bf16 autocast where it has bf16 units (autocast_dtype: `precision`). Weights and
    images are channels_last (the model converted in place), the layout a GPU's tensor cores and oneDNN's CPU
    convolutions prefer; `channels_last=False` keeps them NCHW. A tiled-view model lays the frames out in tiles for
    the device (tiling.py: `tiling`) and runs `tile_batch` tiles per forward pass (default: TILES_PER_PASS of the
    device: one on a CPU), taken from all frames of a batch. Only the class map (1 byte per pixel) comes back to the
    host; with `instances`, the instance maps postprocessed on the device instead (postprocess_torch.py)."""
    device = pick_device(device) if isinstance(device, str) else device
    dtype = autocast_dtype(device, precision)
    tile_batch = tile_batch or TILES_PER_PASS.get(device.type, TILES_PER_PASS["cpu"])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device).eval().to(memory_format=memory_format)
    for images, indices in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            semantic = class_map(model.view.logits(model, images, tile_batch, tiling))
        if instances:
            hparams = model.hparams
            semantic = instances_from_border_core_torch(semantic, hparams.small_center_threshold,
                                                        hparams.isolated_border_threshold, hparams.min_area_fraction)
        yield indices.tolist(), semantic.cpu().numpy()


def class_map(logits: torch.Tensor) -> torch.Tensor:
    """The class of largest logit per pixel (B x C x H x W -> B x H x W, uint8), the first of equal ones as
    torch.argmax gives it: a maximum over the few classes, class by class over whole maps, which on a CPU takes a
    fraction of argmax's time along the channel axis."""
    best, classes = logits[:, 0], torch.zeros(logits[:, 0].shape, dtype=torch.uint8, device=logits.device)
    for k in range(1, logits.shape[1]):
        higher = logits[:, k] > best
        classes.masked_fill_(higher, k)
        best = torch.where(higher, logits[:, k], best)
    return classes


class Postprocess:
    """Border-core map -> instances (in the model's pixels, where its thresholds hold) -> the challenge's 256 x 256
    map (as the model's view says) and, with `native`, the map at the frame's own size. Given an output folder, the
    files are written atomically and their paths returned; else the maps are (the native one where asked). A class
    holding only the thresholds and the view, not the model, so that a process pool takes it cheaply."""

    def __init__(self, model: UNet, shapes: list, names: list | None = None, out_folder: str | None = None,
                 native: bool = False, score_size=SCORE_SIZE, on_device: bool = False):
        hparams = model.hparams
        self.on_device = on_device  # the maps it gets are instances already, postprocessed next to the model
        self.thresholds = (hparams.small_center_threshold, hparams.isolated_border_threshold, hparams.min_area_fraction)
        self.view, self.shapes, self.names, self.out_folder = model.view, shapes, names, out_folder
        self.native, self.score_size = native, score_size

    def __call__(self, index: int, semantic: np.ndarray):
        instances = semantic if self.on_device else instances_from_border_core(semantic, *self.thresholds)
        shape = tuple(self.shapes[index])
        if self.out_folder is None:
            return resize_nearest_exact(instances, shape) if self.native else \
                self.view.instances_at(instances, shape, self.score_size)
        paths = [os.path.join(self.out_folder, prediction_name(self.names[index]))]
        write_tiff_atomically(paths[0], narrowest_unsigned(self.view.instances_at(instances, shape, self.score_size)))
        if self.native:
            paths.append(os.path.join(self.out_folder, prediction_name(self.names[index], native=True)))
            write_tiff_atomically(paths[1], narrowest_unsigned(resize_nearest_exact(instances, shape)))
        return paths


def predict_instance_segmentation_from_border_core(model: UNet, loader, device: str | torch.device,
                                                   postprocess: "Postprocess", pool=None, in_flight: int = 4,
                                                   precision: str = "auto", tile_batch: int | None = None,
                                                   tiling: str = "auto", channels_last: bool = True):
    """The one inference path (the baseline's name): run the model over a loader of (images, indices) batches and
    yield (index, postprocess(index, border-core map)) in loader order.

    With a multiprocessing pool, postprocessing runs in the pool while the model works on the next batches, at most
    `in_flight` batches ahead, so memory stays bounded; a worker's error is raised here.
    """
    pending = deque()
    for indices, maps in border_core_maps(model, loader, device, postprocess.on_device, precision, tile_batch,
                                          tiling, channels_last):
        if pool is None:
            yield from zip(indices, map(postprocess, indices, maps))
            continue
        pending.append((indices, pool.starmap_async(postprocess, list(zip(indices, maps)))))
        while pending and (len(pending) > in_flight or pending[0][1].ready()):
            done, result = pending.popleft()
            yield from zip(done, result.get())
    for done, result in pending:
        yield from zip(done, result.get())


def same_size_batches(shapes: list, batch_size: int, max_pixels: int = BATCH_PIXELS) -> list[list[int]]:
    """Indices of frames in order, cut into batches of consecutive frames of one shape (frames of a sequence share
    one; a collection's may not), at most `batch_size` frames and `max_pixels` pixels (but one frame) a batch.

    >>> same_size_batches([(4, 4)] * 5 + [(8, 8)] * 2 + [(4, 4)], 2)
    [[0, 1], [2, 3], [4], [5, 6], [7]]
    """
    batches = []
    for index, shape in enumerate(shapes):
        shape = tuple(shape)
        last = batches[-1] if batches else None
        if (last and tuple(shapes[last[0]]) == shape and len(last) < batch_size
                and (len(last) + 1) * shape[0] * shape[1] <= max_pixels):
            last.append(index)
        else:
            batches.append([index])
    return batches


def frames_loader(model: UNet, frames: list, scale: float | list[float], batch_size: int, num_workers: int,
                  device: torch.device, shapes: list | None = None) -> DataLoader:
    """Frames (files or arrays) as the model's view sees them, in batches of up to `batch_size` consecutive frames
    that the view sees at one size (same_size_batches). `shapes`: the frames' own shapes where known (else read from
    the files' headers)."""
    dataset = UnlabelledFrames(frames, model.view, model.hparams.intensity, scale)
    if shapes is None:
        shapes = [frame_shape(frame.image_path) if isinstance(frame, Frame) else np.shape(frame) for frame in frames]
    scales = scale if isinstance(scale, (list, tuple)) else [scale] * len(frames)
    inputs = [model.view.input_shape(shape, frame_scale) for shape, frame_scale in zip(shapes, scales)]
    return DataLoader(dataset, batch_sampler=same_size_batches(inputs, batch_size), num_workers=num_workers,
                      pin_memory=device.type == "cuda")


def estimate_cell_width(model: UNet, frames: list, device: torch.device, probes: int = 3, precision: str = "auto",
                        batch_size: int = 8) -> float:
    """The cells' width in frames of unknown pixel size, px, the way Cellpose estimates a diameter by segmenting: a
    few frames (first, middle, last) predicted once, at their own scale (the model's scale augmentation lets it find
    cells of other widths than its own), the cells found measured. NaN where no cell is found."""
    picks = [frames[k] for k in sorted({0, len(frames) // 2, len(frames) - 1})][:probes]
    loader = frames_loader(model, picks, 1.0, batch_size, 0, device)
    width = median_cell_width(model.instances(semantic) for _, batch in
                              border_core_maps(model, loader, device, precision=precision) for semantic in batch)
    return width if np.isfinite(width) and width > 0 else float("nan")


def sequence_scale(model: UNet, frames: list, device: torch.device, cell_width: float | None = None,
                   each_frame: bool = False, say=print, name: str = "frames",
                   precision: str = "auto") -> float | list[float]:
    """The factor (or, with each_frame, one per frame) that brings the frames' cells to the model's width: from
    `cell_width` where given (nothing predicted), else estimated (estimate_cell_width); 1 for a model without a
    recorded scale."""
    if not (model.view.rescales and model.hparams.cell_width):
        return 1.0
    if cell_width is None and each_frame:
        widths = [estimate_cell_width(model, [frame], device, precision=precision) for frame in frames]
        scales = [frame_scale(model.hparams.cell_width, width) for width in widths]
        say(f"{name}: cells {np.nanmin(widths):.1f}..{np.nanmax(widths):.1f} px wide (estimated per frame), model's "
            f"{model.hparams.cell_width:.1f} px: scales {min(scales):.2f}..{max(scales):.2f}")
        return scales
    how = "given" if cell_width is not None else "estimated"
    width = cell_width if cell_width is not None else estimate_cell_width(model, frames, device, precision=precision)
    scale = frame_scale(model.hparams.cell_width, width)
    say(f"{name}: cells about {width:.1f} px wide ({how}), model's {model.hparams.cell_width:.1f} px: " +
        ("frames as they are" if scale == 1 else f"scale {scale:.2f}"))
    return scale


def predict_images(model: UNet, images, cell_width: float | None = None, device: str | torch.device = "auto",
                   progress=None, batch_size: int = 8, precision: str = "auto",
                   tile_batch: int | None = None, tiling: str = "auto") -> list[np.ndarray]:
    """Instance maps (uint32, at each image's own size) of 2-D images (arrays of any dtype), e.g. a movie's frames.

    cell_width: the cells' width in these images, px; None: estimated from them. `progress(done, total)` is called
    after each frame. batch_size: frames per batch (consecutive frames of one size); precision, tile_batch, tiling:
    see border_core_maps."""
    device = pick_device(device) if isinstance(device, str) else device
    images = list(images)
    shapes = [np.shape(image) for image in images]
    scale = sequence_scale(model, images, device, cell_width, say=lambda line: None, precision=precision)
    loader = frames_loader(model, images, scale, batch_size, 0, device, shapes)
    postprocess = Postprocess(model, shapes, native=True, on_device=device.type == "cuda")
    results = [None] * len(images)
    predictions = predict_instance_segmentation_from_border_core(model, loader, device, postprocess,
                                                                 precision=precision, tile_batch=tile_batch,
                                                                 tiling=tiling)
    for done, (index, labels) in enumerate(predictions, 1):
        results[index] = labels
        if progress:
            progress(done, len(images))
    return results


def predict_sequence(model: UNet, root_dir: str, sequence: str, pred_dir: str, batch_size: int, num_workers: int,
                     device: torch.device, pool=None, cell_width: float | None = None, native: bool = False,
                     scale_each_frame: bool = False, precision: str = "auto", tile_batch: int | None = None,
                     tiling: str = "auto", channels_last: bool = True) -> int:
    """Predict every frame of one sequence into pred_dir/<sequence>/; returns the number of frames. cell_width: the
    cells' width in these frames, px (None: estimated, once for the sequence or, with scale_each_frame, per frame).
    batch_size: frames per batch; precision, tile_batch, tiling, channels_last: see border_core_maps."""
    frames = list_frames(root_dir, sequence, with_masks=False)
    shapes = [frame_shape(f.image_path) for f in frames]
    scale = sequence_scale(model, frames, device, cell_width, scale_each_frame, name=f"sequence {sequence}",
                           precision=precision)
    loader = frames_loader(model, frames, scale, batch_size, num_workers, device, shapes)
    out_folder = os.path.join(pred_dir, sequence)
    os.makedirs(out_folder, exist_ok=True)
    postprocess = Postprocess(model, shapes, [f.name for f in frames], out_folder, native,
                              on_device=device.type == "cuda")
    return sum(1 for _ in predict_instance_segmentation_from_border_core(model, loader, device, postprocess, pool,
                                                                         precision=precision, tile_batch=tile_batch,
                                                                         tiling=tiling, channels_last=channels_last))


def old_predictions(pred_dir: str, sequence: str) -> list[str]:
    folder = os.path.join(pred_dir, sequence)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join(folder, name) for name in names
            if PREDICTION_PATTERN.match(name) or NATIVE_PREDICTION_PATTERN.match(name)]


def predictions_to_remove(pred_dir: str, sequence: str, frames, overwrite: bool, native: bool = False) -> list[str]:
    """The old predictions of pred_dir/<sequence> this run removes before it writes: with overwrite all of them;
    without, the maps at the frames' own size of the frames it predicts when it writes none (they would no longer
    match). Refused (DataError): a folder with predictions of frames this run does not predict, which mixed with the
    new ones would be scored as if they were."""
    old = old_predictions(pred_dir, sequence)
    if overwrite:
        return old
    ours = {prediction_name(frame.name) for frame in frames}
    ours_native = {prediction_name(frame.name, native=True) for frame in frames}
    stale = [path for path in old if os.path.basename(path) not in ours | ours_native]
    if stale:
        names = ", ".join(os.path.basename(path) for path in stale[:3]) + (", ..." if len(stale) > 3 else "")
        raise DataError(f"{os.path.join(pred_dir, sequence)}: holds {len(stale)} prediction(s) of frames this run does "
                        f"not predict ({names}), left from another run; --overwrite clears the old predictions first")
    return [] if native else [path for path in old if os.path.basename(path) in ours_native]


def chosen_sequences(root_dir: str, seqs: str | None, split: str) -> list[str]:
    """The sequences to predict: --seqs, else the split's defaults, which must all be there."""
    if seqs:
        return seqs.split(",")
    sequences = default_sequences(root_dir, split)
    found = sorted(name for name in os.listdir(root_dir) if os.path.isdir(os.path.join(root_dir, name))
                   and not name.endswith("_GT") and not name.startswith(".")) if os.path.isdir(root_dir) else []
    missing = [sequence for sequence in sequences if sequence not in found]
    if missing:
        raise DataError(f"{root_dir}: no sequence {', '.join(missing)} (the {split} split's default); it holds "
                        f"{', '.join(found) or 'no sequence folder'}: choose with --seqs, e.g. --seqs "
                        f"{','.join(found[:2]) or 'NAME'}")
    return sequences


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--root_dir", required=True, help="data root, challenge or CTC layout")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"],
                        help="sequences by role: test = d,e (04,05 in CTC layout), val = c (03), train = a,b (01,02)")
    parser.add_argument("--seqs", default=None, help="comma-separated sequence names (overrides --split)")
    parser.add_argument("--model", "--from_checkpoint", dest="from_checkpoint", action=Renamed, default=BUNDLED_MODEL,
                        help="a .ckpt written by train.py (default: the bundled generalist model for rod-shaped "
                             "bacteria, models/bacteria_generalist.pt)")
    parser.add_argument("--pred_dir", default="pred")
    parser.add_argument("--batch_size", type=positive_int, default=16,
                        help="frames per batch (consecutive frames the model sees at one size; a tiled-view model "
                             "runs the tiles of all frames of a batch together)")
    parser.add_argument("--tile_batch", type=positive_int, default=None,
                        help="tiles per forward pass of a tiled-view model (default: "
                             f"{TILES_PER_PASS['cpu']} on a CPU, {TILES_PER_PASS['cuda']} on a GPU)")
    parser.add_argument("--tiling", default="auto", choices=TILINGS,
                        help="a tiled-view model's tile layout: auto = on a CPU the layout of least predicted CPU "
                             "time for the frame's size (small tiles, overlap at least 4 x 2 ** poolings px, or the "
                             "whole frame), on a GPU the model's tile_size; fixed = tiles of the model's tile_size "
                             "overlapping by a quarter (tiling.py)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="the model's arithmetic: auto = bf16 on a GPU that supports it, else fp16 on a GPU; on a "
                             "CPU bf16 where it has bf16 units (AMX, AVX-512 BF16), else fp32 (precision.py)")
    add_test_flips(parser)
    parser.add_argument("--num_workers", type=non_negative_int, default=min(4, os.cpu_count() or 1),
                        help="loader processes that read and resize frames")
    parser.add_argument("--postprocess_workers", type=non_negative_int, default=min(8, os.cpu_count() or 1),
                        help="processes that turn border-core maps into instances and write them (0: inline)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:1, cpu")
    parser.add_argument("--cell_width", type=positive_float, default=None,
                        help="width of the cells in your frames, px (patch models rescale to their own scale); "
                             "default: estimated from a first prediction")
    parser.add_argument("--scale_each_frame", action="store_true",
                        help="without --cell_width: estimate the cells' width in every frame, not once per sequence "
                             "(a collection of unrelated images, e.g. at several magnifications); 2 predictions "
                             "per frame instead of 1")
    parser.add_argument("--native", action="store_true",
                        help="also write the instance maps at each frame's own size: <seq>/mask<frame>.tif")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the old predictions in pred_dir/<seq> first (without it such a folder is refused "
                             "if it holds predictions of frames this run does not predict)")
    parser.add_argument("--max_pixels", type=positive_int, default=data_files.MAX_PIXELS,
                        help="refuse frames larger than this many pixels (checked before they are decoded)")
    args = parser.parse_args(argv)
    data_files.MAX_PIXELS = args.max_pixels  # loader workers are forked: they inherit it
    if args.device != "auto" and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (use auto or cpu)")
    if args.scale_each_frame and args.cell_width:
        parser.error("--scale_each_frame estimates the cells' width: it cannot be given with --cell_width")

    if not os.path.isfile(args.from_checkpoint):
        sys.exit(f"error: {args.from_checkpoint}: checkpoint not found (without --model the bundled model "
                 f"{os.path.relpath(BUNDLED_MODEL)} is used)")
    try:
        # on the CPU: the pool below must fork before CUDA is initialised; the model moves to the device when it runs
        model = load_model(args.from_checkpoint, map_location="cpu", test_flips=args.test_flips)
        sequences = chosen_sequences(args.root_dir, args.seqs, args.split)
        # every sequence found and every folder checked before the first file is deleted or written
        frames = {sequence: list_frames(args.root_dir, sequence, with_masks=False) for sequence in sequences}
        removed = [path for sequence in sequences
                   for path in predictions_to_remove(args.pred_dir, sequence, frames[sequence], args.overwrite,
                                                     args.native)]
    except (DataError, OSError) as error:
        sys.exit(error_line(error))
    try:
        with lock_folder(args.pred_dir, "inference.py"):  # one writer per prediction folder
            for path in removed:
                os.unlink(path)
            predict_all(args, model, sequences)
    except (DataError, OSError) as error:  # also from a pool process (disk full), raised again here
        sys.exit(error_line(error))


def predict_all(args, model: UNet, sequences: list[str]):
    device = pick_device(args.device)
    # the meter counts this process's GPU, RAPL where readable, and the CPU time of the pool once it has exited
    meter = EnergyMeter(gpus=[device.index or 0] if device.type == "cuda" else []).start()
    # fork the pool before CUDA is initialised: its processes only run numpy/scipy and never touch the GPU
    pool = multiprocessing.get_context("fork").Pool(args.postprocess_workers) if args.postprocess_workers else None
    total = 0
    try:
        for sequence in sequences:
            count = predict_sequence(model, args.root_dir, sequence, args.pred_dir, args.batch_size,
                                     args.num_workers, device, pool, args.cell_width, args.native,
                                     args.scale_each_frame, args.precision, args.tile_batch, args.tiling)
            total += count
            print(f"sequence {sequence}: {count} frames -> {os.path.join(args.pred_dir, sequence)}")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    meter.stop()
    print(f"{total} frames on {device}; {meter.report(frames=total)}")


if __name__ == "__main__":
    main()
