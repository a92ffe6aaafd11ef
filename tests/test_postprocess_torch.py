"""The torch postprocessing (for the GPU) equals the numpy one, which equals acvl-utils (tests/test_postprocess.py),
pixel for pixel: random dense maps with noise, a batch, ties between seeds, small cores, isolated borders, empty maps
and the size filter. Run on the CPU device here."""
import numpy as np
import pytest
import torch

from border_core import instances_from_border_core
from conftest import noisy_border_core
from postprocess_torch import component_ids, instances_from_border_core_torch


def same(semantic, **kwargs):
    expected = instances_from_border_core(semantic, **kwargs)
    got = instances_from_border_core_torch(torch.from_numpy(semantic), **kwargs).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("noise", [0.0, 0.05, 0.3])
def test_random_maps_equal_the_numpy_postprocessing(seed, noise):
    same(noisy_border_core(seed, (96, 130), 30, noise))


def test_a_batch_equals_each_map_on_its_own():
    maps = np.stack([noisy_border_core(seed, (64, 80), 15, 0.05) for seed in range(5)])
    got = instances_from_border_core_torch(torch.from_numpy(maps)).numpy()
    for semantic, labels in zip(maps, got):
        np.testing.assert_array_equal(labels, instances_from_border_core(semantic))


def test_ties_small_cores_isolated_borders_and_empty_maps():
    semantic = np.zeros((20, 40), np.uint8)
    semantic[2:9, 2:38] = 2
    semantic[4:7, 4:15] = 1   # a seed of 33 px
    semantic[4:7, 25:36] = 1  # another: the border between them is equidistant in the middle column (a tie)
    semantic[12:18, 2:8] = 1  # a core of 36 px without border
    semantic[12:15, 20:25] = 1  # a small core (15 px): becomes border, an isolated component of 15 px: dropped
    semantic[12:18, 30:36] = 2  # a seedless border component of 36 px: an instance of its own
    same(semantic)
    labels = instances_from_border_core_torch(torch.from_numpy(semantic)).numpy()
    assert labels[5, 20] == 2 and labels[5, 19] == 1  # the tie column goes to the higher label
    assert labels[13, 22] == 0 and labels[15, 33] == 4 and len(np.unique(labels)) == 5
    same(np.zeros((17, 23), np.uint8))
    same(np.full((17, 23), 2, np.uint8))
    same(np.ones((17, 23), np.uint8))


@pytest.mark.parametrize("fraction", [1 / 16, 1 / 4])
def test_the_size_filter_equals_the_numpy_one(fraction):
    same(noisy_border_core(3, (96, 130), 30, 0.1), min_area_fraction=fraction)


def test_component_ids_are_the_first_pixel_in_raster_order():
    mask = torch.tensor([[1, 0, 1], [1, 0, 1], [1, 1, 1], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)[None]
    assert component_ids(mask)[0].tolist() == [[1, 0, 1], [1, 0, 1], [1, 1, 1], [0, 0, 0], [0, 14, 14]]


@pytest.mark.slow
def test_inference_postprocessing_on_the_device_equals_the_host_path(tmp_path):
    """What a GPU run does (instances made next to the model, Postprocess given them), forced on the CPU device."""
    from torch.utils.data import DataLoader

    from dataset import UnlabelledFrames
    from inference import Postprocess, predict_instance_segmentation_from_border_core
    from unet import UNet

    torch.manual_seed(0)
    model = UNet(widths=(4, 8, 16, 32), view="tiled", tile_size=64, intensity="percentile",
                 min_area_fraction=1 / 16).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (70, 90)).astype(np.uint8) for _ in range(3)]
    loader = DataLoader(UnlabelledFrames(images, model.view, "percentile"), batch_size=1)
    results = {}
    for on_device in (False, True):
        postprocess = Postprocess(model, [image.shape for image in images], native=True, on_device=on_device)
        results[on_device] = [labels for _, labels in
                              predict_instance_segmentation_from_border_core(model, loader, "cpu", postprocess)]
    assert any(labels.max() > 0 for labels in results[False])
    for host, device in zip(results[False], results[True]):
        np.testing.assert_array_equal(host, device)
