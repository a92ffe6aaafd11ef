"""The patch recipe: augmentations keep image and targets aligned, tiled prediction equals whole-frame prediction where
a frame fits one tile and leaves no seam where it does not, one normalisation for every dtype, the scale, and a short
patch-recipe training with fine-tuning from its checkpoint."""
import os
import re

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from scipy import ndimage
import torch.nn.functional as F
from torch import nn

from augment import IGNORE, foreground_pixels, random_patch, resample, sample_grid
from border_core import contact_pixels, instances_from_border_core, resize_nearest_exact
from conftest import rods, write_dataset
from data_files import list_frames, read_mask, rescale, to_uint8_range, write_sequence
from dataset import ScaledFrames, UnlabelledFrames, read_labelled, training_sets
from recipe import DEFAULT_RECIPE, RecipeError, load_recipe
from scale import median_cell_width, training_scales
from metrics import instance_dice
from tiling import sliding_window_logits, tile_starts
from unet import MIN_AREA_FRACTIONS, UNet, load_checkpoint
from views import Tiled


@pytest.mark.parametrize("elastic", [0.0, 4.0])
@pytest.mark.parametrize("seed", range(16))
def test_augmented_patch_keeps_image_and_targets_aligned(seed, elastic):
    mask = rods()
    image = np.where(mask > 0, 200.0, 40.0).astype(np.float32)  # cells bright, background dark
    patch, targets, _ = random_patch(image, mask, 64, np.random.default_rng(seed), augment=True, intensity=False,
                                     elastic=elastic)
    assert patch.shape == targets.shape == (64, 64)
    # a core pixel lies 4 patch pixels inside its cell (>= 2.8 frame px at the smallest scale): all four bilinear
    # neighbours are inside, so the image there is exactly the cells' grey; background far from cells is exactly dark.
    # Not on the patch's outermost pixels: the edge of a cell just beyond the patch is not in its targets
    core = targets == 1
    core[:1], core[-1:], core[:, :1], core[:, -1:] = False, False, False, False
    assert core.any() and np.allclose(patch[core], 200.0)
    far = (targets == 0) & ~ndimage.maximum_filter(targets > 0, size=7)
    far[:3], far[-3:], far[:, :3], far[:, -3:] = False, False, False, False  # cells just beyond the patch blur in
    assert far.any() and np.allclose(patch[far], 40.0)
    assert set(np.unique(targets)) <= {0, 1, 2, IGNORE}


@pytest.mark.parametrize("seed", range(4))
def test_elastic_deformation_bends_the_grid_smoothly(seed):
    # a frame whose value is its column: a patch samples the columns its grid reaches, so bent minus plain patch is
    # the deformation's column displacement (in frame px); the same seed draws the same crop, scale and turn
    columns = np.tile(np.arange(600, dtype=np.float32), (600, 1))
    mask = np.zeros((600, 600), np.int32)
    mask[250:350, 250:350] = 1  # centres here: the grid, bent or not, stays inside the frame
    kwargs = dict(foreground=foreground_pixels(mask), foreground_bias=1.0, intensity=False, turn=False)
    plain, *_ = random_patch(columns, mask, 128, np.random.default_rng(seed), **kwargs)
    bent, *_ = random_patch(columns, mask, 128, np.random.default_rng(seed), elastic=4.0, **kwargs)
    shift = bent - plain
    assert 0.3 < np.abs(shift).max() < 4 * 4 / 0.7  # moved, by a few px at most (4 std at the smallest scale)
    # smooth: a cell's outline bends but does not fray; neighbouring pixels move alike
    assert np.abs(np.diff(shift, axis=0)).max() < 0.5 and np.abs(np.diff(shift, axis=1)).max() < 0.5


def test_elastic_offsets_equal_a_cubic_zoom_of_random_control_points():
    from augment import elastic_offsets

    dy, dx = elastic_offsets(128, 3.0, np.random.default_rng(7))
    coarse = np.random.default_rng(7).normal(0.0, 3.0, (2, 3, 3))  # 128 px: 3 control points a side, at most 64 px apart
    for offsets, points in zip((dy, dx), coarse):
        reference = ndimage.zoom(points, 128 / 3, order=3, mode="nearest", grid_mode=True)[:128, :128]
        np.testing.assert_allclose(offsets, reference, atol=1e-9)


def test_grid_mirrors_turns_and_zooms_about_the_centre():
    rows, cols = sample_grid(np.array([10.0, 20.0]), 3)
    np.testing.assert_allclose(rows, [[9, 9, 9], [10, 10, 10], [11, 11, 11]])
    np.testing.assert_allclose(cols, [[19, 20, 21]] * 3)
    rows, cols = sample_grid(np.array([10.0, 20.0]), 3, scale=2.0, flip=True)
    np.testing.assert_allclose(cols, [[20.5, 20, 19.5]] * 3)
    rows, cols = sample_grid(np.array([10.0, 20.0]), 3, angle=np.pi / 2)
    np.testing.assert_allclose(rows, [[11, 10, 9]] * 3, atol=1e-12)  # a quarter turn: columns become rows
    np.testing.assert_allclose(cols, [[19, 19, 19], [20, 20, 20], [21, 21, 21]], atol=1e-12)


def test_plain_patch_is_a_crop_and_outside_is_ignored():
    mask = rods((40, 50))
    image = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    patch, targets, _ = random_patch(image, mask, 64, np.random.default_rng(0), augment=False)
    assert (targets == IGNORE).any() and (targets != IGNORE).sum() == 40 * 50  # the frame once, the rest ignored


@pytest.mark.parametrize("seed", range(8))
def test_fixed_orientation_only_zooms(seed):
    # --fixed_orientation: a frame's left stays left and its top stays top (the offset of masks drawn on another
    # channel can be learnt); scale still varies
    rows, cols = np.mgrid[:120, :150].astype(np.float32)
    mask = rods()
    turned = 0
    for turn in (False, True):
        patch, *_ = random_patch(cols, mask, 48, np.random.default_rng(seed), intensity=False, turn=turn)
        kept = (np.diff(patch, axis=1) > 0).all() and np.allclose(np.diff(patch, axis=0), 0, atol=1e-3)
        assert kept or turn
        turned += not kept
    assert turned == 1  # and without the flag the same seed turns it
    row_patch, *_ = random_patch(rows, mask, 48, np.random.default_rng(seed), intensity=False, turn=False)
    assert (np.diff(row_patch, axis=0) > 0).all()


@pytest.mark.parametrize("zoom", [0.5, 1.0, 2.0])
def test_the_recipe_zoom_sets_the_size_of_cells_in_training_patches(tmp_path, zoom):
    mask = np.zeros((40, 40), np.int32)
    mask[12:28, 12:28] = 1  # one cell 16 px wide, whole in every patch at these zooms
    write_sequence(str(tmp_path), "a", [(np.where(mask > 0, 200, 40).astype(np.uint8), mask)])
    frames = list_frames(str(tmp_path), "a", True)
    recipe = load_recipe(DEFAULT_RECIPE, ["patch_size=64", "patches_per_epoch=1", f"min_zoom={zoom}",
                                          f"max_zoom={zoom}"])
    train_set, _, cell_width = training_sets(frames, frames, recipe, model_cell_width=16)
    assert cell_width == 16  # the frame at its own scale: only the zoom changes the cells
    with pytest.raises(RecipeError, match="min_zoom"):
        load_recipe(DEFAULT_RECIPE, [f"min_zoom={2 * zoom}", f"max_zoom={zoom}"])
    for seed in range(3):
        torch.manual_seed(seed)
        target = train_set[0]["target"]
        # 8, 16 or 32 px wide; sampled on the turned grid, a few px more or less
        assert ((target == 1) | (target == 2)).sum() == pytest.approx(256 * zoom ** 2, rel=0.3)


def test_contact_pixels_are_where_two_cells_meet():
    labels = np.zeros((12, 20), np.int32)
    labels[2:10, 1:8] = 1
    labels[2:10, 8:14] = 2  # touches 1 along the column boundary 7 | 8
    labels[2:10, 17:19] = 3  # 3 px from 2: no contact with reach 2
    contact = contact_pixels(labels, reach=2)
    columns = np.nonzero(contact.any(0))[0]
    # within 2 px of both 1 and 2 (columns 6-9), and the middle of the 3 px gap between 2 and 3 (column 15)
    assert list(columns) == [6, 7, 8, 9, 15]
    assert (contact[:, [6, 7, 8, 9, 15]].sum(0) == 12).all()  # rows 0-1 and 10-11: the cells are 2 px away


def test_patch_loss_weights_are_the_plain_loss_without_contact_weight(tmp_path):
    mask = rods((64, 64))
    mask[20:32, 0:10] = 4  # touches rod 1 end to end
    image = np.where(mask > 0, 200, 40).astype(np.uint8)
    write_sequence(str(tmp_path), "a", [(image, mask)])
    for contact_weight in (0.0, 5.0):
        labelled = [(f.sequence, *read_labelled(f)) for f in list_frames(str(tmp_path), "a", True)]
        frames = ScaledFrames(labelled, {"a": 1.0}, "percentile", patch_size=64, patches_per_epoch=1,
                              augment=False, contact_weight=contact_weight)
        item = frames[0]
        patch, target, weights = item["image"], item["target"], item["weight"]
        assert (weights[target == IGNORE] == 0).all()
        assert set(torch.unique(weights[target != IGNORE]).tolist()) == ({1.0} if contact_weight == 0 else {1.0, 6.0})
    model = UNet(widths=(4, 8, 16, 32), view="tiled")
    logits = model(patch[None])
    plain = nn.functional.cross_entropy(logits, target[None], ignore_index=IGNORE)
    flat = (target != IGNORE).float()[None]
    model.log = lambda *args, **kwargs: None
    assert torch.allclose(model.training_step({"image": patch[None], "target": target[None], "weight": flat}, 0), plain, atol=1e-6)


def test_training_patches_keep_their_grey_values_without_intensity_augment(tmp_path):
    """Two grey values, stretched to 0 and 255 by the percentile rule: turned, mirrored and zoomed, a patch still holds
    exactly those two in the cells' cores and in the background away from the cells (normalised: 2 and -2); the
    intensity augmentation moves them. Built as train.py builds them, through the data module."""
    mask = rods((96, 96))
    image = np.where(mask > 0, 200, 40).astype(np.uint8)
    write_sequence(str(tmp_path), "a", [(image, mask)])
    moved = []
    for seed in range(6):
        for photometric in (False, True):
            torch.manual_seed(seed)  # each patch's random generator is drawn from torch's
            recipe = load_recipe(DEFAULT_RECIPE, ["patch_size=48", "patches_per_epoch=1", f"photometric={photometric}"])
            frames = list_frames(str(tmp_path), "a", True)
            item = training_sets(frames, frames, recipe)[0][0]
            patch, target = item["image"], item["target"]
            # 2 px from other labels and from the patch's rim, beyond which a cell may end
            far_background = ndimage.binary_erosion(target.numpy() == 0, iterations=2, border_value=0)
            inner_core = ndimage.binary_erosion(target.numpy() == 1, iterations=2, border_value=0)
            core, background = patch[0][torch.from_numpy(inner_core)], patch[0][torch.from_numpy(far_background)]
            assert len(core) and len(background)
            plain = torch.allclose(core, torch.tensor(2.0), atol=1e-4) and \
                torch.allclose(background, torch.tensor(-2.0), atol=1e-4)
            if photometric:
                moved.append(not plain)
            else:
                assert plain and -2 - 1e-4 <= patch.min() and patch.max() <= 2 + 1e-4, seed
    assert sum(moved) >= 4, moved  # each of its five changes is drawn with probability 1/4 to 1/2


def test_the_recipe_reaches_the_training_data(tmp_path, monkeypatch):
    import train
    from data_files import DataError

    seen = []

    def recording(train_frames, val_frames, recipe, *args):
        seen.append((recipe.photometric, recipe.patch_size))
        raise DataError("recorded")  # stop before any data is read

    monkeypatch.setattr(train, "training_sets", recording)
    monkeypatch.setattr(train, "labelled_frames", lambda root, sequences: [])
    for flags in ([], ["--set", "photometric=true", "--set", "patch_size=64"]):
        with pytest.raises(SystemExit, match="recorded"):
            train.main(["--root_dir", str(tmp_path), "--out_dir", str(tmp_path / "run"), *flags])
    assert seen == [(False, 128), (True, 64)]
    assert not (tmp_path / "run").exists()


class PixelModel(nn.Module):
    """A stand-in with a known answer: dark pixels are core, grey ones border, bright ones background. Pixel-wise,
    so tiling cannot change what it predicts."""

    def forward(self, x):
        return torch.cat([x - 0.5, -(x + 0.5).abs() + 0.2, -(x.abs() - 0.1)], 1) * 10


def test_tiled_prediction_is_whole_frame_prediction_when_one_tile_holds_it():
    torch.manual_seed(0)
    model = UNet().eval()
    image = torch.randn(1, 96, 120)
    with torch.no_grad():
        whole = model(image[None])[0]
        tiled = sliding_window_logits(model, image, tile_size=128)
    assert torch.equal(whole, tiled)
    with torch.no_grad():  # a frame whose sides are no multiple of 8: padded, predicted once, cropped back
        odd = torch.randn(1, 90, 101)
        assert sliding_window_logits(model, odd, tile_size=128).shape == (3, 90, 101)


def test_tiles_cover_the_frame_and_leave_no_seam():
    assert tile_starts(300, 128, 0.25)[0] == 0 and tile_starts(300, 128, 0.25)[-1] == 300 - 128
    # long cells that cross every tile edge: a seam would split them
    frame = np.ones((200, 264), np.float32)
    truth = np.zeros(frame.shape, np.int32)
    for k, row in enumerate(range(10, 190, 30)):
        frame[row:row + 14, 8:256] = 0.0  # border ring grey, interior dark
        frame[row + 4:row + 10, 12:252] = -1.0
        truth[row:row + 14, 8:256] = k + 1
    image = torch.from_numpy(frame)[None]
    with torch.no_grad():
        tiled = sliding_window_logits(PixelModel(), image, tile_size=64, overlap=0.25,
                                      tiling="fixed").argmax(0).numpy()
        whole = PixelModel()(image[None])[0].argmax(0).numpy()
    np.testing.assert_array_equal(tiled, whole)
    instances = instances_from_border_core(tiled)
    assert len(np.unique(instances)) - 1 == truth.max()
    for k in range(1, truth.max() + 1):
        assert len(np.unique(instances[truth == k])) == 1  # one label per cell, across every tile edge


def test_uint8_and_uint16_copies_give_the_same_input_and_prediction(tmp_path):
    rng = np.random.default_rng(0)
    image8 = rng.integers(20, 230, (64, 80)).astype(np.uint8)
    for dtype, copy in (("uint8", image8), ("uint16", image8.astype(np.uint16) * 257 + 1000)):
        os.makedirs(tmp_path / dtype / "a")
        tifffile.imwrite(tmp_path / dtype / "a" / "t0000.tif", copy)
    items = [UnlabelledFrames(list_frames(str(tmp_path / d), "a", False), Tiled(), "percentile")[0][0]
             for d in ("uint8", "uint16")]
    np.testing.assert_allclose(items[0], items[1], atol=1e-5)
    torch.manual_seed(0)
    model = UNet(view="tiled", tile_size=64).eval()
    with torch.no_grad():
        maps = [sliding_window_logits(model, item, 64).argmax(0) for item in items]
    assert torch.equal(maps[0], maps[1])
    # the baseline's rule keeps uint8 as it is, so there the two copies differ
    assert not np.allclose(to_uint8_range(image8, "baseline"), to_uint8_range(image8.astype(np.uint16) * 257, "baseline"))


def test_median_cell_width_and_rescale():
    mask = np.zeros((100, 200), np.int32)
    for k in range(5):  # touching rods 9 px wide: measured one by one
        mask[10 + 9 * k:19 + 9 * k, 20:180] = k + 1
    assert median_cell_width([mask]) == pytest.approx(9, abs=1)
    assert median_cell_width([rescale(mask, 2.0, order=0)]) == pytest.approx(18, abs=1.5)
    assert rescale(np.ones((10, 20), np.float32), 1.5).shape == (15, 30)


def centroids(labels, weights=None):
    ids = np.arange(1, int(labels.max()) + 1)
    return np.array(ndimage.center_of_mass(np.ones(labels.shape) if weights is None else weights, labels, ids))



@pytest.mark.parametrize("scale", [0.55, 0.89, 1.6])
def test_rescaled_mask_stays_on_its_image(scale):
    # half a pixel between an image and its mask costs several points of Instance Dice on 18 px wide cells. 64 discs
    # at varied sub-pixel positions: one disc's centroid moves by up to half a pixel when its mask is resampled (the
    # grid), their mean must not (resize_nearest's floor rule moves it by 0.4-0.55 model px here)
    yy, xx = np.mgrid[:240, :240]
    mask = np.zeros((240, 240), np.int32)
    for k, (cy, cx) in enumerate(np.mgrid[15:240:30, 15:240:30].reshape(2, -1).T, start=1):
        mask[(yy - cy - 0.37 * (k % 3)) ** 2 + (xx - cx - 0.29 * (k % 4)) ** 2 <= 7.3 ** 2] = k
    image = np.where(mask > 0, 255.0, 0.0).astype(np.float32)
    small_image, small_mask = rescale(image, scale), rescale(mask, scale, order=0)
    assert small_image.shape == small_mask.shape and np.unique(small_mask).size == 65
    around_cells = ndimage.grey_dilation(small_mask, size=5)  # each disc's blurred edge in the image
    offset = centroids(small_mask) - centroids(around_cells, small_image)
    assert np.abs(offset.mean(0)).max() < 0.1 and np.abs(offset).max() < 0.3
    # and from the model's scale back to the frame's (inference.Postprocess): the cells land where they were
    back = resize_nearest_exact(small_mask, mask.shape)
    assert np.abs((centroids(back) - centroids(mask)).mean(0)).max() < 0.15


def test_validation_sequences_are_scaled_as_inference_scales_them():
    widths = {"a": 10.0, "b": 8.0, "c": 9.0, "d": 20.0}
    # training sequences go exactly to the model's width; a validation sequence within SCALE_TOLERANCE of it stays as
    # it is (as inference keeps such frames), one further off is rescaled
    assert training_scales(widths, 10.0, validation_only={"c", "d"}) == \
        (10.0, {"a": 1.0, "b": 1.25, "c": 1.0, "d": 0.5})
    assert training_scales(widths, None, validation_only={"c"}) == (9.5, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0})
    assert training_scales({"a": 10.0, "c": 0.0}, 12.0, validation_only={"c"}) == (12.0, {"a": 1.2, "c": 1.0})
    # fine-tuning: a starting model's width within the tolerance of the data's leaves the frames as they are
    assert training_scales({"a": 10.0}, inherited=11.0) == (10.0, {"a": 1.0})
    assert training_scales({"a": 10.0}, inherited=16.0) == (16.0, {"a": 1.6})


def test_recipe_widths_set_the_unet_depth_and_the_size_multiple():
    assert load_recipe(DEFAULT_RECIPE, ["widths=8,16,32,64,128"]).widths == (8, 16, 32, 64, 128)
    with pytest.raises(RecipeError, match="patch_size"):  # four poolings: sides must be multiples of 16
        load_recipe(DEFAULT_RECIPE, ["widths=8,16,32,64,128", "patch_size=136"])
    for bad in ("8,x", "16", "8,0"):
        with pytest.raises(RecipeError, match="widths"):
            load_recipe(DEFAULT_RECIPE, [f"widths={bad}"])
    assert load_recipe(DEFAULT_RECIPE, ["patch_size=136"]).patch_size == 136  # the default widths: 8 is enough
    torch.manual_seed(0)
    model = UNet(widths=(4, 8, 16, 32, 64), view="tiled", tile_size=64).eval()
    image = torch.rand(1, 75, 90)  # larger than a tile: tiled, cropped back
    with torch.no_grad():
        logits = sliding_window_logits(model, image, tile_size=64, tiling="fixed")
        # one tile: 40 px, a multiple of 8 but not of 16, is padded to 48 (at 40 the fourth pooling would not fit)
        whole = sliding_window_logits(model, image[:, :40, :40], tile_size=64)
        direct = model(torch.nn.functional.pad(image[None, :, :40, :40], (0, 8, 0, 8), mode="reflect"))[0, :, :40, :40]
    assert logits.shape == (3, 75, 90) and torch.isfinite(logits).all()
    assert torch.allclose(whole, direct, atol=1e-5)


def test_learning_rates_of_the_recipes():
    patches, faithful = load_recipe(DEFAULT_RECIPE), load_recipe(os.path.join("recipes", "faithful.yaml"))
    assert (patches.lr, patches.fine_tune_lr) == (1e-3, "auto")  # fine-tuning's measured in train()
    assert (faithful.lr, faithful.fine_tune_lr) == (1e-3, 1e-4)
    assert load_recipe(DEFAULT_RECIPE, ["fine_tune_lr=3e-4"]).fine_tune_lr == 3e-4
    with pytest.raises(RecipeError, match="fine_tune_lr"):
        load_recipe(DEFAULT_RECIPE, ["fine_tune_lr=-1"])
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe(DEFAULT_RECIPE, ["learning_rate=1"])


@pytest.mark.slow
def test_fine_tuning_takes_a_tenth_of_the_learning_rate_on_cells_the_model_knows(tmp_path, capsys, monkeypatch):
    """The bundled model segments simulated bacteria: 1e-4. A random model segments nothing: 1e-3. A recipe with a
    fixed fine-tuning rate takes it without measuring."""
    import simulate
    import train
    from inference import BUNDLED_MODEL
    from unet import load_model

    frames = [(image, labels) for image, labels, _ in simulate.simulate_sequence(40, (192, 192), seed=12345)][28::4]
    root = str(tmp_path / "data")
    write_sequence(root, "a", frames[:1])
    write_sequence(root, "b", frames[1:])
    bundled = load_model(BUNDLED_MODEL)
    recipe = load_recipe(DEFAULT_RECIPE, ["patches_per_epoch=4"])
    _, val_set, _ = training_sets(list_frames(root, "a", True), list_frames(root, "b", True), recipe,
                                  inherited_cell_width=bundled.hparams.cell_width)
    data = train.CellDataModule(None, val_set, 2, 1, 0)
    start, fraction = train.starting_model_score(bundled, data, cuda=False)
    assert start >= train.KNOWN_CELLS_DICE and fraction in MIN_AREA_FRACTIONS
    assert train.fine_tuning_lr(recipe, start) == 1e-4
    assert all(module.training for module in bundled.modules())  # back in training mode, BatchNorm included
    torch.manual_seed(0)
    random = UNet(view="tiled", tile_size=256, intensity="percentile")
    start, _ = train.starting_model_score(random, data, cuda=False)
    assert start < train.KNOWN_CELLS_DICE and train.fine_tuning_lr(recipe, start) == 1e-3
    assert "learning rate 0.001" in capsys.readouterr().out
    monkeypatch.setattr(train.rank_zero_only, "rank", 1)  # another DDP process: the same rate, said by rank 0 only
    assert train.fine_tuning_lr(recipe, start) == 1e-3
    assert capsys.readouterr().out == ""
    fixed = load_recipe(os.path.join("recipes", "faithful.yaml"))
    assert train.fine_tuning_lr(fixed, start) == 1e-4


def test_a_fine_tuning_that_did_not_beat_its_start_says_so(capsys):
    import types
    import train
    args = types.SimpleNamespace(export_to=None, init_from="models/bacteria_generalist.pt")
    best = types.SimpleNamespace(best_model_score=torch.tensor(0.8, dtype=torch.float64), dirpath="run/checkpoints")
    train.report(args, best, start_score=0.80)
    err = capsys.readouterr().err
    assert "warning: no epoch beat the starting model on the validation frames (val instance dice 0.800): " \
           "best.ckpt holds models/bacteria_generalist.pt's weights" in err
    train.report(args, types.SimpleNamespace(best_model_score=torch.tensor(0.85), dirpath="d"), start_score=0.80)
    train.report(args, best, start_score=None)  # a run from scratch: nothing to compare with
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_fine_tuning_never_hands_back_a_model_worse_than_its_start(tmp_path, capsys):
    """A learning rate that wrecks the bundled model in its first steps: no epoch beats the starting model on the
    validation frames, so best.ckpt holds the starting weights, with the size filter the start chose; last.ckpt the
    wrecked ones."""
    import simulate
    import train
    from inference import BUNDLED_MODEL
    from unet import load_model

    frames = [(image, labels) for image, labels, _ in simulate.simulate_sequence(40, (160, 160), seed=7)][30::3]
    root = str(tmp_path / "data")
    write_sequence(root, "a", frames[:2])
    write_sequence(root, "b", frames[2:])
    bundled = load_model(BUNDLED_MODEL)
    train.main(["--root_dir", root, "--train_seqs", "a", "--val_seqs", "b", "--out_dir", str(tmp_path / "run"),
                "--init_from", BUNDLED_MODEL, "--num_epochs", "2", "--batch_size", "4", "--num_workers", "0",
                "--set", "patches_per_epoch=8", "--set", "min_steps=0", "--set", "fine_tune_lr=10",
                "--precision", "32-true"])
    out, err = capsys.readouterr()
    start = float(re.search(r"--init_from model before training: val instance dice ([0-9.]+)", out).group(1))
    assert start > 0.5 and "warning: no epoch beat the starting model" in err
    best = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "best.ckpt"))
    last = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert best["global_step"] == 0 and last["global_step"] == 4
    weights = bundled.state_dict()
    assert all(torch.equal(best["state_dict"][name].float(), weights[name].float()) for name in weights)
    assert not all(torch.equal(last["state_dict"][name].float(), weights[name].float()) for name in weights)
    assert best["hyper_parameters"]["min_area_fraction"] in MIN_AREA_FRACTIONS
    kept = load_model(str(tmp_path / "run" / "checkpoints" / "best.ckpt"))
    assert kept.hparams.cell_width == bundled.hparams.cell_width
    # resumed, the run keeps the starting model's score to beat: another wrecked epoch leaves best.ckpt as it was
    train.main(["--root_dir", root, "--train_seqs", "a", "--val_seqs", "b", "--out_dir", str(tmp_path / "run"),
                "--resume", "--num_epochs", "3", "--batch_size", "4", "--num_workers", "0", "--set",
                "patches_per_epoch=8", "--set", "min_steps=0", "--set", "fine_tune_lr=10", "--precision", "32-true"])
    assert load_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))["global_step"] == 6
    best = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "best.ckpt"))
    assert best["global_step"] == 0
    assert all(torch.equal(best["state_dict"][name].float(), weights[name].float()) for name in weights)


@pytest.mark.slow
def test_val_every_validates_every_nth_epoch_and_the_last(tmp_path):
    """val_every 2 over 4 epochs: validation (and so best.ckpt's choice) after epochs 2 and 4 only; last.ckpt every
    epoch."""
    import train
    root = write_dataset(tmp_path / "data", sequences=("a", "b"), unlabelled=(), frames=2, shape=(64, 64))
    train.main(["--root_dir", root, "--train_seqs", "a", "--val_seqs", "b", "--out_dir", str(tmp_path / "run"),
                "--num_epochs", "4", "--batch_size", "2", "--num_workers", "0", "--set", "patch_size=32",
                "--set", "patches_per_epoch=2", "--set", "min_steps=0", "--set", "val_every=2",
                "--precision", "32-true"])
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(metrics.dropna(subset=["val_instance_dice"])["epoch"]) == [1, 3]
    assert list(metrics.dropna(subset=["train_loss"])["epoch"]) == [0, 1, 2, 3]
    assert load_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))["epoch"] == 3
    assert load_checkpoint(str(tmp_path / "run" / "checkpoints" / "best.ckpt"))["epoch"] in (1, 3)
    with pytest.raises(RecipeError, match="val_every"):
        load_recipe(DEFAULT_RECIPE, ["val_every=0"])


@pytest.mark.slow
def test_patch_recipe_trains_and_fine_tunes(tmp_path):
    from test_pipeline import run

    root = write_dataset(tmp_path / "data", sequences=("a", "b", "c"), unlabelled=("d",), frames=4, shape=(90, 110))
    tiny = ["--set", "patch_size=64", "--set", "tile_size=64", "--set", "patches_per_epoch=32", "--batch_size", 4,
            "--num_workers", 0, "--set", "min_steps=8"]
    sequences = {seq: list_frames(root, seq, with_masks=True) for seq in ("a", "b", "c")}  # train a,b, val c
    width = float(np.median([median_cell_width(read_mask(f.mask_path) for f in frames)
                             for frames in sequences.values()]))
    # the first model's cells are 10 % wider than the data's: within SCALE_TOLERANCE, so fine-tuning keeps the
    # frames' own pixels and takes the data's width as the model's
    out = run("train.py", "--root_dir", root, "--out_dir", tmp_path / "scratch", "--num_epochs", 3,
              "--model_cell_width", f"{1.1 * width:.2f}", *tiny)
    assert f"model's scale {1.1 * width:.1f} px (sequences rescaled by 1.00..1.10)" in out  # c: 1, as inference
    # the patch recipe chooses its size filter on the validation frames: each checkpoint records its epoch's
    recorded = load_checkpoint(str(tmp_path / "scratch" / "checkpoints" / "best.ckpt"))["hyper_parameters"]
    assert recorded["min_area_fraction"] in MIN_AREA_FRACTIONS and recorded["view"] == "tiled"
    assert "view: tiled" in (tmp_path / "scratch" / "recipe.yaml").read_text()
    metrics = pd.read_csv(tmp_path / "scratch" / "metrics.csv")
    loss = metrics.dropna(subset=["train_loss"]).set_index("epoch")["train_loss"]
    assert list(loss.index) == [0, 1, 2] and loss[2] < loss[0]
    # the training part's throughput: 32 patches in less than the whole epoch (validation included)
    epochs = metrics.dropna(subset=["train_loss"])
    assert (epochs["train_images_per_second"] >= 32 / epochs["epoch_seconds"]).all()
    assert out.count("images/s in training)") == 3
    checkpoint = tmp_path / "scratch" / "checkpoints" / "last.ckpt"
    # --max_time ends a run long before its 500 epochs, with whole checkpoints, however loaded the machine: min_steps
    # (one epoch of 8 steps here) holds the end back until an epoch is complete
    out = run("train.py", "--root_dir", root, "--out_dir", tmp_path / "tuned", "--num_epochs", 500, "--max_time",
              "00:00:00:05", "--init_from", checkpoint, "--set", "turn=false", "--set", "ema_decay=0.9",
              "--set", "photometric=false", *tiny, with_stderr=True)
    assert (tmp_path / "tuned" / "checkpoints" / "best.ckpt").is_file()
    assert 1 <= load_checkpoint(str(tmp_path / "tuned" / "checkpoints" / "last.ckpt"))["global_step"] and \
        load_checkpoint(str(tmp_path / "tuned" / "checkpoints" / "last.ckpt"))["epoch"] < 499
    assert f"model's scale {width:.1f} px (sequences rescaled by 1.00..1.00)" in out
    # fine-tuning scored the starting model first to choose its learning rate, and trained in training mode after
    assert "--init_from model before training: val instance dice" in out and "in eval mode at the start" not in out
    # with --ema_decay the checkpoint's weights are the average, the step's own kept beside them for --resume
    tuned_checkpoint = load_checkpoint(str(tmp_path / "tuned" / "checkpoints" / "last.ckpt"))
    averaged, current = tuned_checkpoint["state_dict"], tuned_checkpoint["current_model_state"]
    assert averaged.keys() == current.keys()
    assert not all(torch.equal(averaged[k], current[k]) for k in averaged)
    tuned = pd.read_csv(tmp_path / "tuned" / "metrics.csv").dropna(subset=["train_loss"])["train_loss"].iloc[0]
    assert tuned < loss[0]  # starts where the first run got to, not from scratch
    run("inference.py", "--root_dir", root, "--seqs", "c", "--model", checkpoint, "--pred_dir",
        tmp_path / "pred", "--native", "--num_workers", 0)
    assert sorted(os.listdir(tmp_path / "pred" / "c")) == [f"mask{t:04d}.tif" for t in range(4)] + \
        [f"t{t:04d}_256.tif" for t in range(4)]
    assert tifffile.imread(tmp_path / "pred" / "c" / "mask0000.tif").shape == (90, 110)
    out = run("eval.py", "--pred_dir", tmp_path / "pred", "--root_dir", root, "--native")
    assert "Mean Instance Dice" in out


@pytest.mark.parametrize("seed", range(6))
def test_windowed_resampling_equals_resampling_the_whole_frame(seed):
    """resample converts only the window the grid covers; near and beyond the frame's edges it must mirror exactly
    as sampling the whole frame does."""
    rng = np.random.default_rng(seed)
    image = rng.random((50, 70)).astype(np.float16)
    mask = rng.integers(0, 5, (50, 70))
    center = np.array([rng.uniform(0, 49), rng.uniform(0, 69)])
    rows, cols = sample_grid(center, 40, rng.uniform(0.7, 1.4), rng.uniform(0, 2 * np.pi), bool(seed % 2))
    patch, labels, inside = resample(image, mask, rows, cols)
    whole = ndimage.map_coordinates(image.astype(np.float32), [rows, cols], order=1, mode="mirror")
    np.testing.assert_allclose(patch, whole, rtol=0, atol=1e-6)
    assert (labels[~inside] == 0).all() and (~inside).any()


class ThresholdModel(UNet):
    """A 'model' that segments bright cells on a dark background at any scale: foreground by threshold, its pixels
    within 2 px of the background as border. What estimate_scale needs to measure widths, without training."""

    def __init__(self):
        super().__init__(view="tiled", tile_size=512, cell_width=10.0, intensity="percentile")

    def forward(self, x):
        foreground = (x > (x.amax((2, 3), keepdim=True) + x.amin((2, 3), keepdim=True)) / 2).float()
        core = -F.max_pool2d(-foreground, 5, stride=1, padding=2)  # erosion by 2 px
        return torch.cat([1 - foreground, core, foreground - core], 1) * 10


def test_scale_each_frame_rescales_every_frame_to_the_model(tmp_path):
    from inference import estimate_cell_width, predict_sequence, sequence_scale

    small = rods((160, 200))  # cells 12 px wide
    large = np.kron(small[:80, :100], np.ones((2, 2), small.dtype))  # the same cells twice as wide, same frame size
    masks = [small, large]
    images = [np.where(mask > 0, 200, 40).astype(np.uint8) for mask in masks]
    root = str(tmp_path / "data")
    write_sequence(root, "a", list(zip(images, masks)))
    frames = list_frames(root, "a", with_masks=True)
    model = ThresholdModel()
    widths = [estimate_cell_width(model, [frame], torch.device("cpu")) for frame in frames]
    scales = sequence_scale(model, frames, torch.device("cpu"), each_frame=True)
    assert widths == pytest.approx([median_cell_width([small]), median_cell_width([large])], abs=1.5)
    assert scales[0] == 1.0  # 12 px against the model's 10: within SCALE_TOLERANCE, taken as it is
    assert scales[1] == pytest.approx(10 / median_cell_width([large]), rel=0.1)
    predict_sequence(model, root, "a", str(tmp_path / "pred"), 1, 0, torch.device("cpu"), native=True,
                     scale_each_frame=True)
    for t, mask in enumerate(masks):
        predicted = tifffile.imread(tmp_path / "pred" / "a" / f"mask{t:04d}.tif")
        assert instance_dice(mask, predicted) > 0.9


def thin_rods_in_chains(width: int = 6, length: int = 30, rows: int = 5, per_row: int = 4) -> np.ndarray:
    """Rods `width` px wide touching end to end in chains, chains touching side by side: a packed colony of thin
    cells, where the border (4 px) eats the cores at the frames' own scale."""
    mask = np.zeros((rows * width + 10, per_row * length + 10), np.int32)
    for r in range(rows):
        for k in range(per_row):
            mask[5 + r * width:5 + (r + 1) * width, 5 + k * length:5 + (k + 1) * length] = 1 + r * per_row + k
    return mask


def test_the_default_scale_holds_thin_rods_in_chains():
    from scale import representable_width, representation_ceiling
    mask = thin_rods_in_chains()
    width = median_cell_width([mask])
    assert width == pytest.approx(6, abs=1)
    assert representation_ceiling([mask]) < 0.5  # at their own scale the cells merge
    model_width, ceilings = representable_width([mask], width, floor=0.97)
    assert model_width > width and representation_ceiling([mask], model_width / width) >= 0.97
    assert ceilings[model_width / width] >= 0.97 and all(c < 0.97 for f, c in ceilings.items() if f < model_width / width)
    # cells it already holds keep their own scale
    wide = thin_rods_in_chains(width=16, length=60)
    assert representable_width([wide], median_cell_width([wide]))[0] == median_cell_width([wide])


def test_training_from_scratch_enlarges_frames_of_thin_cells(tmp_path):
    mask = thin_rods_in_chains()
    image = np.where(mask > 0, 60, 200).astype(np.uint8)
    write_sequence(str(tmp_path), "a", [(image, mask)])
    frames = list_frames(str(tmp_path), "a", True)
    train_set, _, cell_width = training_sets(frames, frames, load_recipe(DEFAULT_RECIPE))
    assert cell_width > median_cell_width([mask]) * 1.2 and train_set.scales["a"] > 1.2
    _, _, own = training_sets(frames, frames, load_recipe(DEFAULT_RECIPE, ["min_ceiling=0"]))
    assert own == median_cell_width([mask])


def test_training_from_scratch_shrinks_frames_of_wide_cells_to_max_cell_width(tmp_path):
    mask = thin_rods_in_chains(width=32, length=90, rows=2, per_row=2)
    image = np.where(mask > 0, 60, 200).astype(np.uint8)
    write_sequence(str(tmp_path), "a", [(image, mask)])
    frames = list_frames(str(tmp_path), "a", True)
    own = median_cell_width([mask])
    assert own > 25
    train_set, _, cell_width = training_sets(frames, frames, load_recipe(DEFAULT_RECIPE, ["max_cell_width=20"]))
    assert cell_width == 20 and train_set.scales["a"] == pytest.approx(20 / own)
    # 0: the frames' own scale (the representation holds these cells there)
    _, _, kept = training_sets(frames, frames, load_recipe(DEFAULT_RECIPE, ["max_cell_width=0"]))
    assert kept == own
    # a width given on the command line wins
    _, _, given = training_sets(frames, frames, load_recipe(DEFAULT_RECIPE, ["max_cell_width=20"]), model_cell_width=28)
    assert given == 28
