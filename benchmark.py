"""Speed of every stage, each against its straightforward version in the same run, outputs checked equal.

    python benchmark.py                                   # simulated dense 512 x 512 colony, CPU or GPU
    python benchmark.py --root_dir DATA --seq c           # frames of your own data root (GT needed for the first rows)
    python benchmark.py --json bench.json --frames 32
    python benchmark.py --only inference --num_frames 800 --size 512       # old vs new inference only (a GPU's run)

Rows: border-core targets (vs a per-instance erosion loop), instances_from_border_core (vs acvl-utils 0.2.6),
instance_dice (vs acvl-utils' matching), the training loader (cached vs decoding and computing targets per item) and
the training step alone, inference end to end (model + overlapped postprocessing and writing) vs the model alone,
tracking: linking consecutive GT frames into tracks (track.link_tracks; no straightforward version to compare with),
the bundled model's inference frame by frame (the old path: one frame per batch, tiles of the model's tile_size, 4
per forward pass, fp32 and NCHW on a CPU, fp16 on a GPU) against batched inference (the new path: --batch_size frames
per batch, the tile layout chosen for the device (tiling.py: on a CPU one tile or frame per pass, on a GPU many tiles
of all frames together), bf16 where the chip has units for it, channels_last): reading + model, postprocessing and end
to end, outputs checked equal (where the precisions or the tiles differ, their agreement reported), with the FLOPs of
a frame's forward passes and the share of the chip's bf16 peak they reach; then the training patches' sampling and augmentation one at a time with numpy (augment.py, what a loader worker does)
against a batch on the device (augment_torch.py); every shipped model alone, postprocessed and end to end.
Columns: frames/s, ms/frame, speed-up over the straightforward version, peak memory, energy where measurable.
"""
import argparse
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

import simulate
from augment import foreground_pixels, random_patch
from augment_torch import random_patches
from border_core import border_core_targets, instances_from_border_core, resize_nearest
from cli_types import HelpFormatter, Renamed
from data_files import frame_shape, list_frames, read_mask, read_tiff_2d, write_marked_block, write_sequence
from dataset import ResizedFrames, UnlabelledFrames, normalise
from views import Resized
from energy import EnergyMeter
from precision import autocast_dtype
from inference import (BUNDLED_MODEL, MODELS_DIR, TILES_PER_PASS, border_core_maps, frames_loader,
                       pick_device, predict_images, predict_sequence)
from tiling import Layout, frame_layout
from metrics import instance_dice
from postprocess_torch import instances_from_border_core_torch
from track import link_tracks
from unet import UNet, load_model

# dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendor's data sheets; the first name found in the
# device's name counts (BENCHMARK_PEAK_TFLOPS overrides)
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H100", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0), ("L4", 121.0))

# the models in models/, the bundled one first: the others' speed-up is over it
SHIPPED_MODELS = [BUNDLED_MODEL] + sorted(os.path.join(MODELS_DIR, name) for name in
                                          (os.listdir(MODELS_DIR) if os.path.isdir(MODELS_DIR) else [])
                                          if name.endswith(".pt") and os.path.join(MODELS_DIR, name) != BUNDLED_MODEL)


# ------------------------------------------------------------------------------------------ straightforward versions

def border_core_targets_loop(labels):
    """The baseline's way: erode each instance 4 times with the cross (edge not eroding), one instance at a time."""
    cross = ndimage.generate_binary_structure(2, 1)
    targets = np.zeros(labels.shape, np.uint8)
    for label in np.unique(labels[labels > 0]):
        mask = labels == label
        targets[mask] = 2
        targets[ndimage.binary_erosion(mask, cross, iterations=4, border_value=1)] = 1
    return targets


class DecodingFrames(Dataset):
    """The straightforward loader: every item read from disk, targets by the per-instance loop, resized, each time."""

    def __init__(self, frames, input_size):
        self.frames, self.input_size = frames, input_size

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, index):
        frame = self.frames[index]
        raw = read_tiff_2d(frame.image_path)
        image = Resized(self.input_size).image(raw, "baseline")
        mask = read_mask(frame.mask_path, raw.shape, frame.image_path)
        size = (self.input_size, self.input_size)
        target = resize_nearest(border_core_targets_loop(mask), size)
        return (normalise(torch.from_numpy(image)[None]), torch.from_numpy(target.astype(np.int64)),
                torch.from_numpy(resize_nearest(mask, (256, 256)).astype(np.int64)))


# ------------------------------------------------------------------------------------------------------- measuring

class Stage:
    """Wall time, peak GPU memory and energy of one block (host memory: see peak_host_mib)."""

    def __init__(self, device):
        self.device = device
        self.peak_mib = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.meter = EnergyMeter(poll_seconds=None).start()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.meter.stop()
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated() / 2 ** 20

    def energy_wh(self):
        """Measured energy of the block (GPU + CPU counters), None where no counter is readable."""
        return self.meter.read().energy_wh


def peak_host_mib(function, item) -> float:
    """Peak memory that numpy and Python allocate while function(item) runs, in a separate pass: tracing slows
    allocation-heavy code, so it is kept out of the timed runs."""
    tracemalloc.start()
    try:
        function(item)
        return tracemalloc.get_traced_memory()[1] / 2 ** 20
    finally:
        tracemalloc.stop()


def timed(device, function, items, repeat=1):
    """Run function over items (repeat times); return (seconds per item, Stage, outputs of the last pass)."""
    with Stage(device) as stage:
        for _ in range(repeat):
            outputs = [function(item) for item in items]
    stage.peak_mib = peak_host_mib(function, items[0])
    return stage.seconds / (len(items) * repeat), stage, outputs


def row(name, per_item, stage, baseline=None, note=""):
    return {"stage": name, "frames_per_s": 1 / per_item, "ms_per_frame": 1000 * per_item,
            "speedup": (baseline / per_item) if baseline else None, "peak_mib": stage.peak_mib,
            "energy_wh": stage.energy_wh(), "note": note}


# ----------------------------------------------------------------------------------------------------------- stages

def predicted_like(labels, seed, noise=0.02):
    """A border-core map as a trained model predicts it: the exact targets with a small share of pixels changed."""
    semantic = border_core_targets(labels)
    rng = np.random.default_rng(seed)
    flip = rng.random(semantic.shape) < noise
    semantic[flip] = rng.integers(0, 3, flip.sum())
    return semantic


def postprocessing_rows(masks, device):
    rows = []
    fast, stage, targets = timed(device, border_core_targets, masks, repeat=5)
    slow, slow_stage, reference = timed(device, border_core_targets_loop, masks)
    assert all((a == b).all() for a, b in zip(targets, reference)), "border_core_targets differs from the loop"
    rows += [row("border-core targets, per-instance loop", slow, slow_stage),
             row("border-core targets, all at once", fast, stage, slow, "identical output")]

    maps = [predicted_like(m, k) for k, m in enumerate(masks)]
    fast, stage, instances = timed(device, instances_from_border_core, maps, repeat=3)
    # the same on the model's device, the maps already there (as they come out of the model), as one batch
    on_device = torch.from_numpy(np.stack(maps)).to(device)
    batched, torch_stage, torch_instances = timed(device, lambda batch: instances_from_border_core_torch(batch).cpu(),
                                                  [on_device])
    assert all((a == b).all() for a, b in zip(instances, torch_instances[0].numpy())), "torch postprocessing differs"
    rows.append(row(f"instances_from_border_core_torch ({device.type}, batch of {len(maps)})", batched / len(maps),
                    torch_stage, fast, "identical output; speed-up over the numpy version"))
    try:
        from acvl_utils.instance_segmentation.instance_as_semantic_seg import convert_semantic_to_instanceseg
        from acvl_utils.instance_segmentation.instance_matching import match_instances_dice
    except ImportError:
        rows.append(row("instances_from_border_core", fast, stage, None, "acvl-utils not installed: no reference"))
        rows.append(row("instance_dice", *timed(device, lambda p: instance_dice(*p), list(zip(masks, instances)))[:2],
                        None, "acvl-utils not installed: no reference"))
        return rows
    slow, slow_stage, reference = timed(device, lambda s: convert_semantic_to_instanceseg(s[None].copy())[0], maps)
    assert all((a == b).all() for a, b in zip(instances, reference)), "instances differ from acvl-utils"
    rows += [row("instances, acvl-utils 0.2.6", slow, slow_stage),
             row("instances_from_border_core", fast, stage, slow, "identical output")]

    pairs = [(m.astype(np.uint32), p) for m, p in zip(masks, instances)]
    fast, stage, scores = timed(device, lambda p: instance_dice(*p), pairs, repeat=3)
    slow, slow_stage, matches = timed(device, lambda p: match_instances_dice(*p), pairs)
    reference_scores = [np.mean([m[2] for m in match]) for match in matches]
    assert np.allclose(scores, reference_scores, rtol=0, atol=1e-9), "instance_dice differs from acvl-utils"
    rows += [row("Instance Dice, acvl-utils matching", slow, slow_stage),
             row("instance_dice", fast, stage, slow, "equal to 1e-9")]
    return rows


def loader_and_step_rows(root, sequence, input_size, batch_size, device, workers):
    frames = list_frames(root, sequence, with_masks=True)
    rows = []
    with Stage(device) as cache_stage:
        cached = ResizedFrames(frames, Resized(input_size), "baseline", train=True)

    def loader_speed(dataset, epochs):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                            persistent_workers=workers > 0)
        for _ in loader:  # warm-up epoch: worker start-up is not what is measured
            pass
        with Stage(device) as stage:
            for _ in range(epochs):
                for _ in loader:
                    pass
        stage.peak_mib = peak_host_mib(dataset.__getitem__, 0)
        return stage.seconds / (epochs * len(dataset)), stage

    slow, slow_stage = loader_speed(DecodingFrames(frames, input_size), 1)
    fast, stage = loader_speed(cached, 3)
    stage.peak_mib += (cached.images.nbytes + cached.targets.nbytes + cached.instances.nbytes) / 2 ** 20
    rows += [row("training loader, decode + loop targets per item", slow, slow_stage, note=f"{workers} workers"),
             row("training loader, prepared once and cached", fast, stage, slow,
                 f"{workers} workers; one-off preparation {1000 * cache_stage.seconds / len(frames):.1f} ms/frame; "
                 "memory includes the cache")]

    model = UNet(input_size=input_size).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = next(iter(DataLoader(cached, batch_size=batch_size)))
    images, targets = batch["image"].to(device), batch["target"].to(device)
    cuda = device.type == "cuda"

    def train_step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    train_step()
    steps = 20 if cuda else 3
    with Stage(device) as step_stage:
        for _ in range(steps):
            train_step()
    per_sample = step_stage.seconds / (steps * len(images))
    rows.append(row("training step alone (forward + backward)", per_sample, step_stage, None,
                    f"batch {len(images)}, {'16-mixed' if cuda else '32-true'}; the loader must outrun this"))
    return rows


def inference_rows(root, sequence, input_size, batch_size, device, workers):
    model = UNet(input_size=input_size)
    frames = list_frames(root, sequence, with_masks=False)
    loader = DataLoader(UnlabelledFrames(frames, model.view, "baseline"), batch_size=batch_size, num_workers=workers)
    for _ in border_core_maps(model, loader, device):  # warm-up: CUDA context, cudnn choice
        break
    with Stage(device) as model_stage:
        for _ in border_core_maps(model, loader, device):
            pass
    with tempfile.TemporaryDirectory() as pred_dir, multiprocessing.get_context("fork").Pool(workers) as pool:
        with Stage(device) as end_to_end:
            predict_sequence(model, root, sequence, pred_dir, batch_size, workers, device, pool)
    n = len(frames)
    share = max(0.0, 1 - model_stage.seconds / end_to_end.seconds)
    return [row("inference, reading + model only", model_stage.seconds / n, model_stage),
            row("inference end to end (+ postprocessing, writing)", end_to_end.seconds / n, end_to_end, None,
                f"reading, postprocessing and writing add {100 * share:.0f} % of the wall time")]


def inference_paths(device, batch_size: int) -> dict:
    """The old and the new inference path, as predict_sequence's arguments."""
    cuda = device.type == "cuda"
    return {"frame by frame (old)": dict(batch_size=1, tile_batch=4, tiling="fixed", channels_last=cuda,
                                         precision="fp16" if cuda else "fp32"),
            "batched (new)": dict(batch_size=batch_size, tile_batch=None, tiling="auto", channels_last=True,
                                  precision="auto")}


DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def path_layout(model, shape, device, path) -> Layout:
    """The tile layout a path gives frames of this shape (at the model's scale) on the device, in its precision and
    memory format."""
    dtype = autocast_dtype(device, path["precision"])
    model.to(memory_format=torch.channels_last if path["channels_last"] else torch.contiguous_format)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return frame_layout(model, *shape, device.type, model.view.tile_size, path["tiling"])


def peak_bf16_flops(device) -> float | None:
    """The chip's dense bf16 peak, FLOP/s; None where unknown (a CPU, an unlisted GPU)."""
    if os.environ.get("BENCHMARK_PEAK_TFLOPS"):
        return float(os.environ["BENCHMARK_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def frame_flops(model, image: torch.Tensor, device, path: dict) -> float:
    """FLOPs of the forward passes that predict one frame as the path does (a multiply-add counted as 2; tiles'
    overlap included)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        list(border_core_maps(model, [(image[None], torch.tensor([0]))], device, precision=path["precision"],
                              tile_batch=path["tile_batch"], tiling=path["tiling"],
                              channels_last=path["channels_last"]))
    return float(counter.get_total_flops())


def read_predictions(folder: str) -> dict:
    return {name: read_tiff_2d(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def batched_inference_rows(root, sequence, model_path, batch_size, device, workers, pool) -> tuple[list, dict]:
    """The old and the new inference path of one model on a sequence's frames at their own scale (the model told the
    cells' width, so no scale is estimated): reading + model, postprocessing alone (as each path does it: numpy per
    frame on a CPU, torch on the device in the path's batches on a GPU), end to end (predict_sequence with the
    postprocessing pool, files written). Rows and a summary per path (frames/s, Wh/frame, FLOPs, share of the peak)."""
    model = load_model(model_path)
    cuda = device.type == "cuda"
    frames = list_frames(root, sequence, with_masks=False)
    shapes = [frame_shape(f.image_path) for f in frames]
    n, hparams = len(frames), model.hparams
    thresholds = (hparams.small_center_threshold, hparams.isolated_border_threshold, hparams.min_area_fraction)
    peak = peak_bf16_flops(device)
    name = os.path.basename(model_path)
    rows, summary, maps, written, baseline, layouts = [], {}, {}, {}, {}, {}
    for path_name, path in inference_paths(device, batch_size).items():
        loader = frames_loader(model, frames, 1.0, path["batch_size"], workers, device, shapes)
        arguments = dict(precision=path["precision"], tile_batch=path["tile_batch"], tiling=path["tiling"],
                         channels_last=path["channels_last"])
        if cuda:  # warm-up: CUDA context, cudnn's choice for the batch shapes (the first batches hold them all)
            for _ in itertools.islice(border_core_maps(model, loader, device, **arguments), 3):
                pass
        else:
            list(border_core_maps(model, [(torch.zeros(1, 1, 64, 64), torch.tensor([0]))], device))
        with Stage(device) as model_stage:
            maps[path_name] = [m for _, batch in border_core_maps(model, loader, device, **arguments) for m in batch]
        with Stage(device) as post_stage:
            if cuda:
                for start in range(0, n, path["batch_size"]):
                    batch = torch.from_numpy(np.stack(maps[path_name][start:start + path["batch_size"]])).to(device)
                    instances_from_border_core_torch(batch, *thresholds).cpu()
            else:
                for semantic in maps[path_name]:
                    instances_from_border_core(semantic, *thresholds)
        pred_dir = tempfile.mkdtemp(prefix="benchmark-")
        with Stage(device) as end_stage:
            predict_sequence(model, root, sequence, pred_dir, path["batch_size"], workers, device, pool,
                             hparams.cell_width, **arguments)
        written[path_name] = read_predictions(os.path.join(pred_dir, sequence))
        shutil.rmtree(pred_dir)
        image = next(iter(frames_loader(model, frames[:1], 1.0, 1, 0, device, shapes[:1])))[0][0]
        flops = frame_flops(model, image, device, path)
        model_fps = n / model_stage.seconds
        dtype = autocast_dtype(device, path["precision"])
        tiles = path["tile_batch"] or TILES_PER_PASS.get(device.type, TILES_PER_PASS["cpu"])
        layout = layouts[path_name] = path_layout(model, image.shape[-2:], device, path)
        tiles_a_frame = len(layout.ys) * len(layout.xs)
        how = (f"{path['batch_size']} frame(s) a batch, {tiles_a_frame} tile(s) of {layout.tile_h} x {layout.tile_w} "
               f"a frame ({path['tiling']}, {layout.input_pixels() / (image.shape[-2] * image.shape[-1]):.2f}x its "
               f"pixels), {tiles} a pass, {DTYPE_NAMES[dtype]}, {'channels_last' if path['channels_last'] else 'NCHW'}")
        summary[path_name] = {
            **arguments, "batch_size": path["batch_size"], "frames": n, "frame_shape": list(shapes[0]),
            "tile_shape": [layout.tile_h, layout.tile_w], "tiles_per_frame": tiles_a_frame,
            "model_frames_per_s": model_fps, "postprocessing_frames_per_s": n / post_stage.seconds,
            "end_to_end_frames_per_s": n / end_stage.seconds,
            "wh_per_frame": (end_stage.energy_wh() / n) if end_stage.energy_wh() is not None else None,
            "model_wh_per_frame": (model_stage.energy_wh() / n) if model_stage.energy_wh() is not None else None,
            "gflop_per_frame": flops / 1e9, "model_tflop_per_s": flops * model_fps / 1e12,
            "peak_bf16_tflop_per_s": peak / 1e12 if peak else None,
            "share_of_peak": flops * model_fps / peak if peak else None}
        chip = f", {100 * summary[path_name]['share_of_peak']:.2f} % of the chip's bf16 peak" if peak else ""
        for stage_name, stage, note in (
                ("reading + model", model_stage, f"{flops / 1e9:.1f} GFLOP/frame, "
                                                 f"{flops * model_fps / 1e12:.3f} TFLOP/s{chip}"),
                ("postprocessing", post_stage, "torch on the device" if cuda else "numpy per frame"),
                ("end to end (+ reading, writing)", end_stage, "postprocessing pool, files written")):
            per_frame = stage.seconds / n
            rows.append(row(f"{name} inference {path_name}: {stage_name}", per_frame, stage,
                            baseline.get(stage_name), f"{note}; {how}"))
            baseline.setdefault(stage_name, per_frame)
    old, new = maps.values()
    old_files, new_files = written.values()
    precisions = [autocast_dtype(device, path["precision"]) for path in inference_paths(device, batch_size).values()]
    old_layout, new_layout = layouts.values()
    if precisions[0] != precisions[1] or old_layout != new_layout:
        # another precision (fp16 or fp32 against bf16) or other tiles: the same frames, nearly the same maps
        agree = np.mean([np.mean(a == b) for a, b in zip(old, new)])
        summary["map_agreement"] = float(agree)
        differences = []
        if precisions[0] != precisions[1]:
            differences.append(" vs ".join(DTYPE_NAMES[dtype] for dtype in precisions))
        if old_layout != new_layout:
            differences.append(" vs ".join(f"{layout.tile_h} x {layout.tile_w} tiles" for layout in layouts.values()))
        rows[-1]["note"] += f"; old and new maps agree on {100 * agree:.2f} % of the pixels ({', '.join(differences)})"
    else:
        assert all(np.array_equal(a, b) for a, b in zip(old, new)), "batched maps differ from frame by frame"
        assert old_files.keys() == new_files.keys() and all(np.array_equal(old_files[k], new_files[k])
                                                            for k in old_files), "batched predictions differ"
        rows[-1]["note"] += "; identical maps and files"
    return rows, summary


def augmentation_rows(images, masks, patch_size: int, batch_size: int, device, seed: int = 0) -> list[dict]:
    """Training patches (sampling, resampling, intensity, border-core targets) the old way, one at a time with numpy
    as a loader worker makes them (augment.random_patch), against a batch on the device (augment_torch). The same
    resampling and targets (tests/test_augment_torch.py), different random draws: speed only. The frames are put on
    the device once, as a training run would keep them there."""
    count = 4 * batch_size
    foreground = [foreground_pixels(mask) for mask in masks]
    rng = np.random.default_rng(seed)

    def one_patch(k):
        return random_patch(images[k], masks[k], patch_size, rng, foreground[k])

    picks = [k % len(images) for k in range(count)]
    one_patch(0)  # warm-up
    with Stage(device) as old_stage:
        for k in picks:
            one_patch(k)
    old_stage.peak_mib = peak_host_mib(one_patch, 0)
    frames = [torch.from_numpy(image.astype(np.float32)).to(device) for image in images]
    labels = [torch.from_numpy(mask.astype(np.int64)).to(device) for mask in masks]
    centres = [torch.from_numpy(f) for f in foreground]
    generator = torch.Generator().manual_seed(seed)
    batches = [picks[start:start + batch_size] for start in range(0, count, batch_size)]

    def one_batch(batch):
        return random_patches([frames[k] for k in batch], [labels[k] for k in batch], patch_size, generator,
                              [centres[k] for k in batch])

    one_batch(batches[0])  # warm-up
    with Stage(device) as new_stage:
        for batch in batches:
            one_batch(batch)
    note = f"patches/s of {patch_size} px"
    return [row("training patches, augment.py one at a time (CPU)", old_stage.seconds / count, old_stage, None,
                f"{note}; one loader process"),
            row(f"training patches, augment_torch batch of {batch_size} ({device.type})", new_stage.seconds / count,
                new_stage, old_stage.seconds / count, f"{note}; same resampling and targets, other random draws")]


def shipped_model_rows(images, device, paths) -> list[dict]:
    """The shipped models on the same frames, each seeing them at its own scale (cells given as its own width, so
    every model sees the frames' pixels as they are): the model alone (reading, tiling, forward, argmax),
    postprocessing alone and predict_images end to end, the first model the baseline of the others' speed-up."""
    rows, baseline = [], {}
    for path in paths:
        model = load_model(path)
        name = f"{os.path.basename(path)} (widths {','.join(map(str, model.hparams.widths))})"
        loader = DataLoader(UnlabelledFrames(images, model.view, model.hparams.intensity), batch_size=1)
        next(border_core_maps(model, loader, device))  # warm-up
        with Stage(device) as model_stage:
            maps = [m for _, batch in border_core_maps(model, loader, device) for m in batch]
        with Stage(device) as post_stage:
            for semantic in maps:
                model.instances(semantic)
        with Stage(device) as end_stage:
            predict_images(model, images, cell_width=model.hparams.cell_width, device=device)
        n = len(images)
        for stage_name, stage in (("model only", model_stage), ("postprocessing only", post_stage),
                                  ("end to end (predict_images)", end_stage)):
            per_frame = stage.seconds / n
            rows.append(row(f"{name}: {stage_name}", per_frame, stage, baseline.get(stage_name),
                            f"{images[0].shape[0]} x {images[0].shape[1]} frames"))
            baseline.setdefault(stage_name, per_frame)
    return rows


def tracking_rows(masks, device):
    """link_tracks over the consecutive frames, 3 times; every cell of every frame must get a track."""
    with Stage(device) as stage:
        for _ in range(3):
            track_maps, tracks = link_tracks(masks)
    assert all(((m > 0) == (t > 0)).all() for m, t in zip(masks, track_maps)), "a cell lost its track"
    stage.peak_mib = peak_host_mib(link_tracks, masks)
    return [row("tracking, linking", stage.seconds / (3 * len(masks)), stage, None,
                f"{len(tracks)} tracks over {len(masks)} consecutive frames; memory: all frames' track maps")]


def frame_size(text: str) -> tuple[int, int]:
    """512 -> (512, 512); 1022x1024 -> (1022, 1024)."""
    try:
        sides = tuple(int(side) for side in text.lower().split("x"))
    except ValueError:
        sides = ()
    if len(sides) not in (1, 2) or min(sides) < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: a side (512) or height x width (1022x1024), at least 16 px")
    return sides * 2 if len(sides) == 1 else sides


# distinct simulated frames at most (the last ones of a 120-frame movie, its densest); more are repeated in turn
DISTINCT_FRAMES = 100


def simulated_frames(size, count: int, seed: int) -> list:
    distinct = min(count, DISTINCT_FRAMES)
    movie = [(image, labels) for image, labels, _ in simulate.simulate_sequence(120, size, seed)][-distinct:]
    return [movie[k % distinct] for k in range(count)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--root_dir", default=None, help="data root (default: simulate a dense colony)")
    parser.add_argument("--seq", default="c", help="sequence with GT to take frames from")
    parser.add_argument("--num_frames", "--frames", dest="num_frames", action=Renamed, type=int, default=16,
                        help=f"frames per stage (simulated: at most {DISTINCT_FRAMES} distinct ones, repeated)")
    parser.add_argument("--size", type=frame_size, default=(512, 512),
                        help="frame size of the simulated colony: a side or height x width (1022x1024)")
    parser.add_argument("--input_size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--only", choices=["all", "inference", "augmentation"], default="all",
                        help="inference: only the old and the new inference path of the bundled model; "
                             "augmentation: only the training patches' sampling, CPU against the device")
    parser.add_argument("--patch_size", type=int, default=256, help="training patch side (augmentation rows)")
    parser.add_argument("--model", default=BUNDLED_MODEL, help="the model of the old-and-new inference rows")
    parser.add_argument("--num_workers", "--workers", dest="num_workers", action=Renamed, type=int,
                        default=min(4, os.cpu_count() or 1), help="loader processes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default="benchmark.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results_md", default=None,
                        help="also write the table into this file's benchmark block (docs/results.md)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as scratch:
        root = args.root_dir
        if root is None:  # one dense simulated sequence in the challenge layout
            root = os.path.join(scratch, "data")
            write_sequence(root, args.seq, simulated_frames(args.size, args.num_frames, args.seed))
        frames = list_frames(root, args.seq, with_masks=True)[-args.num_frames:]
        masks = [read_mask(f.mask_path) for f in frames[:DISTINCT_FRAMES]]
        cells = int(np.mean([len(np.unique(m)) - 1 for m in masks]))
        rows, summary = [], {}
        if args.only == "all":
            rows += postprocessing_rows(masks, device)
            rows += loader_and_step_rows(root, args.seq, args.input_size, args.batch_size, device, args.num_workers)
            rows += inference_rows(root, args.seq, args.input_size, args.batch_size, device, args.num_workers)
            rows += tracking_rows(masks, device)
        if args.only in ("all", "augmentation"):
            rows += augmentation_rows([read_tiff_2d(f.image_path) for f in frames[:8]], masks[:8], args.patch_size,
                                      args.batch_size, device, args.seed)
        if os.path.isfile(args.model) and args.only in ("all", "inference"):
            sequence = args.seq
            if len(frames) < len(list_frames(root, args.seq, with_masks=False)):  # the chosen frames only
                sequence = "benchmark_frames"
                write_sequence(os.path.join(scratch, "chosen"), sequence,
                               ((read_tiff_2d(f.image_path), None) for f in frames), with_gt=False)
            inference_root = os.path.join(scratch, "chosen") if sequence != args.seq else root
            with multiprocessing.get_context("fork").Pool(max(1, args.num_workers)) as pool:
                batched_rows, summary = batched_inference_rows(inference_root, sequence, args.model,
                                                               args.batch_size, device, args.num_workers, pool)
            rows += batched_rows
        shipped = [path for path in SHIPPED_MODELS if os.path.isfile(path)]
        if shipped and args.only == "all":
            rows += shipped_model_rows([read_tiff_2d(f.image_path) for f in frames[:4]], device, shipped)

    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or platform.machine(), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(),
               "frames": len(frames), "frame_size": list(masks[0].shape), "cells_per_frame": cells,
               "input_size": args.input_size}
    print(f"machine: {machine}")
    width = max(52, *(len(r["stage"]) + 1 for r in rows))
    print(f"{'stage':<{width}}{'frames/s':>10}{'ms/frame':>10}{'speed-up':>10}{'peak MiB':>10}{'Wh':>10}  note")
    for r in rows:
        speedup = f"{r['speedup']:.1f}x" if r["speedup"] else ""
        energy = f"{r['energy_wh']:.4f}" if r["energy_wh"] is not None else "n/m"
        print(f"{r['stage']:<{width}}{r['frames_per_s']:>10.1f}{r['ms_per_frame']:>10.2f}{speedup:>10}"
              f"{r['peak_mib']:>10.1f}{energy:>10}  {r['note']}")
    if all(r["energy_wh"] is None for r in rows):
        print("energy: not measurable here (n/m)")
    with open(args.json, "w") as file:
        json.dump({"machine": machine, "rows": rows, "inference": summary}, file, indent=2)
    print(f"wrote {args.json}")
    if args.results_md:
        write_marked_block(args.results_md, "benchmark", results_markdown(machine, rows, argv))
        print(f"wrote the benchmark block of {args.results_md}")


def results_markdown(machine: dict, rows: list[dict], argv) -> str:
    command = "python benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    threads = f", {machine['torch_threads']} torch thread(s)" if machine.get("torch_threads") else ""
    lines = [f"`{command.strip()}` on {machine['device']} ({machine['cpu_cores']} cores{threads}, "
             f"torch {machine['torch']}), "
             f"{machine['frames']} frames of {machine['frame_size'][0]} x {machine['frame_size'][1]} with "
             f"{machine['cells_per_frame']} cells on average; each ratio measured side by side in one run:", "",
             "| stage | frames/s | ms/frame | speed-up | peak MiB | Wh | note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        speedup = f"{r['speedup']:.1f}×" if r["speedup"] else ""
        energy = f"{r['energy_wh']:.4f}" if r["energy_wh"] is not None else "n/m"
        lines.append(f"| {r['stage']} | {r['frames_per_s']:.2f} | {r['ms_per_frame']:.1f} | {speedup} | "
                     f"{r['peak_mib']:.1f} | {energy} | {r['note']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
