"""augment_torch (patch sampling and augmentation of a whole batch on the device) against augment.py, on the CPU
device: the same targets, the same resampling, image and targets aligned exactly as augment.py's tests require."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from augment import IGNORE, foreground_pixels, resample, sample_grid
from augment_torch import (border_core_targets_torch, random_intensity_batch, random_patches, resample_batch,
                           sample_grids, stack_frames)
from border_core import border_core_targets
from conftest import dense_labels, rods


def test_targets_equal_the_numpy_ones():
    masks = [dense_labels(seed, (96, 128), n_cells=40).astype(np.int64) for seed in range(3)] + \
            [rods((96, 128)).astype(np.int64), np.zeros((96, 128), np.int64)]
    masks[1][:, :5] = 7  # a cell along the edge: the edge does not erode
    targets = border_core_targets_torch(torch.from_numpy(np.stack(masks)))
    assert targets.dtype == torch.uint8
    for mask, target in zip(masks, targets.numpy()):
        np.testing.assert_array_equal(target, border_core_targets(mask))
    assert (targets == 1).any() and (targets == 2).any()


def test_grids_equal_augment_sample_grid():
    centers = torch.tensor([[10.0, 20.0], [40.5, 33.25], [5.0, 60.0]], dtype=torch.float64)
    scales = torch.tensor([1.0, 2.0, 0.7], dtype=torch.float64)
    angles = torch.tensor([0.0, np.pi / 2, 1.234], dtype=torch.float64)
    flips = torch.tensor([False, True, True])
    rows, cols = sample_grids(centers, 7, scales, angles, flips)
    for k in range(3):
        expected = sample_grid(centers[k].numpy(), 7, float(scales[k]), float(angles[k]), bool(flips[k]))
        np.testing.assert_allclose(rows[k].numpy(), expected[0], atol=1e-12)
        np.testing.assert_allclose(cols[k].numpy(), expected[1], atol=1e-12)


def test_resampling_equals_augment_resample_for_frames_of_two_sizes():
    rng = np.random.default_rng(0)
    frames = [rng.uniform(0, 255, (50, 70)), rng.uniform(0, 255, (64, 40))]
    masks = [dense_labels(1, (50, 70), 20).astype(np.int64), dense_labels(2, (64, 40), 15).astype(np.int64)]
    # grids that reach beyond each frame's edges (mirrored image, 0 labels outside) and turn and zoom
    centers = torch.tensor([[3.0, 66.0], [60.0, 2.5]], dtype=torch.float64)
    rows, cols = sample_grids(centers, 32, torch.tensor([0.8, 1.3], dtype=torch.float64),
                              torch.tensor([0.4, 2.0], dtype=torch.float64), torch.tensor([True, False]))
    images, labels, sizes = stack_frames([torch.from_numpy(f) for f in frames], [torch.from_numpy(m) for m in masks])
    patches, patch_labels, inside = resample_batch(images, labels, sizes, rows, cols)
    for k in range(2):
        expected_patch, expected_labels, expected_inside = resample(frames[k], masks[k], rows[k].numpy(),
                                                                    cols[k].numpy())
        np.testing.assert_allclose(patches[k].numpy(), expected_patch, atol=1e-3)  # augment works in float32
        np.testing.assert_array_equal(patch_labels[k].numpy(), expected_labels)
        np.testing.assert_array_equal(inside[k].numpy(), expected_inside)
        assert not inside[k].all() and inside[k].any()


@pytest.mark.parametrize("elastic", [0.0, 4.0])
@pytest.mark.parametrize("seed", range(4))
def test_augmented_patches_keep_image_and_targets_aligned(seed, elastic):
    # augment.py's test, for a batch of 16 patches of frames of two sizes at once
    frames, masks = [], []
    for shape in ((120, 150), (140, 170)):
        mask = rods(shape)
        frames.append(torch.from_numpy(np.where(mask > 0, 200.0, 40.0).astype(np.float32)))
        masks.append(torch.from_numpy(mask))
    frames, masks = frames * 8, masks * 8
    patches, targets, _ = random_patches(frames, masks, 64, torch.Generator().manual_seed(seed), augment=True,
                                         intensity=False, elastic=elastic)
    assert patches.shape == targets.shape == (16, 64, 64)
    for patch, target in zip(patches.numpy(), targets.numpy()):
        core = target == 1
        core[:1], core[-1:], core[:, :1], core[:, -1:] = False, False, False, False
        far = (target == 0) & ~ndimage.maximum_filter(target > 0, size=7)
        far[:3], far[-3:], far[:, :3], far[:, -3:] = False, False, False, False
        if core.any():
            assert np.allclose(patch[core], 200.0, atol=1e-3)
        if far.any():
            assert np.allclose(patch[far], 40.0, atol=1e-3)
        assert set(np.unique(target)) <= {0, 1, 2, IGNORE}
    assert (targets == 1).any() and (targets == 0).any()  # the checks above ran on many patches


def test_centres_come_from_the_foreground_and_a_plain_patch_is_a_crop():
    mask = rods((40, 50))
    image = torch.arange(40 * 50, dtype=torch.float32).reshape(40, 50)
    patches, targets, _ = random_patches([image], [torch.from_numpy(mask)], 64, torch.Generator().manual_seed(0),
                                         augment=False)
    assert (targets == IGNORE).any() and int((targets != IGNORE).sum()) == 40 * 50  # the frame once, the rest ignored
    # foreground_bias 1: every patch centred on a cell; the middle pixel of an odd-sized crop is that cell's
    big = rods()
    patches, targets, labels = random_patches([torch.from_numpy(big).float()] * 8, [torch.from_numpy(big)] * 8, 15,
                                              torch.Generator().manual_seed(1), augment=False,
                                              foreground=[torch.from_numpy(foreground_pixels(big, 1))] * 8,
                                              foreground_bias=1.0)
    assert all(int(patch_labels[7, 7]) > 0 for patch_labels in labels)


def test_intensity_changes_leave_the_targets_and_stay_in_range():
    frames = [torch.from_numpy(np.where(rods() > 0, 200.0, 40.0).astype(np.float32))] * 32
    masks = [torch.from_numpy(rods())] * 32
    plain = random_patches(frames, masks, 48, torch.Generator().manual_seed(3), intensity=False)
    changed = random_patches(frames, masks, 48, torch.Generator().manual_seed(3), intensity=True)
    assert torch.equal(plain[1], changed[1])  # the same grids: the intensity is drawn after them
    assert torch.isfinite(changed[0]).all() and changed[0].min() >= -0.5 * 255 and changed[0].max() <= 1.5 * 255
    differs = [(a - b).abs().max() > 1 for a, b in zip(plain[0], changed[0])]
    assert 0 < sum(differs) < 32  # each change has its own probability: some patches stay plain
    # the blur is scipy's gaussian_filter, per patch
    from augment_torch import _gaussian_blur

    patch = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (2, 30, 30)))
    blurred = _gaussian_blur(patch, torch.tensor([0.8, 0.0], dtype=torch.float64))
    np.testing.assert_allclose(blurred[0].numpy(), ndimage.gaussian_filter(patch[0].numpy(), 0.8), atol=1e-12)
    assert torch.equal(blurred[1], patch[1])
    assert random_intensity_batch(torch.full((2, 8, 8), 100.0), torch.Generator().manual_seed(0)).shape == (2, 8, 8)
