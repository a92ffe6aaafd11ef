"""instances_from_border_core against hand-worked answers and acvl-utils 0.2.6 (SPEC §5)."""
import numpy as np
import pytest
from acvl_utils.instance_segmentation.instance_as_semantic_seg import convert_semantic_to_instanceseg

from conftest import noisy_border_core
from border_core import instances_from_border_core


def reference(semantic):
    """The baseline's call; the reference wants (1, H, W) unsigned and overwrites its input."""
    return convert_semantic_to_instanceseg(semantic[None].astype(np.uint8).copy(), small_center_threshold=30,
                                           isolated_border_as_separate_instance_threshold=15)[0]


def test_two_seeds_split_their_border_by_distance():
    semantic = np.zeros((12, 30), np.uint8)
    semantic[1:11, 1:29] = 2
    semantic[3:9, 3:9] = 1  # seed 1 (36 px), raster order first
    semantic[3:9, 21:27] = 1  # seed 2
    instances = instances_from_border_core(semantic)
    assert instances.dtype == np.uint32 and instances.max() == 2
    assert (instances[:, :15][semantic[:, :15] > 0] == 1).all()  # columns 1..14 are nearer to seed 1
    assert (instances[:, 16:][semantic[:, 16:] > 0] == 2).all()
    assert (instances[1:11, 15] == 2).all()  # column 15 is at equal distance: the higher label wins
    assert (instances[semantic == 0] == 0).all()


def test_size_thresholds_are_inclusive_and_exclusive_as_written():
    semantic = np.zeros((40, 80), np.uint8)
    semantic[2:12, 2:12] = 2
    semantic[4:10, 4:9] = 1  # core of 30 px: turned into border -> seedless component of 100 px: kept
    semantic[20:30, 2:12] = 2
    semantic[22:28, 3:9] = 1  # core of 36 px: a seed
    semantic[2:5, 30:35] = 2  # seedless, 15 px: dropped
    semantic[20:24, 30:34] = 2  # seedless, 16 px: kept
    instances = instances_from_border_core(semantic)
    assert instances[24, 5] == 1  # the only seed
    assert instances[5, 5] == 2 and instances[21, 31] == 3  # seedless ones after the seeds, in raster order
    assert (instances[2:5, 30:35] == 0).all()
    np.testing.assert_array_equal(instances, reference(semantic))


def test_input_is_not_modified_and_empty_map_gives_no_instance():
    semantic = noisy_border_core(0, size=(64, 64), n_cells=10)
    before = semantic.copy()
    instances_from_border_core(semantic)
    np.testing.assert_array_equal(semantic, before)
    assert instances_from_border_core(np.zeros((16, 16), np.uint8)).max() == 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("noise", [0.0, 0.05, 0.3])
def test_equals_acvl_utils_on_dense_random_maps(seed, noise):
    semantic = noisy_border_core(seed, size=(192, 256), n_cells=160, noise=noise)
    np.testing.assert_array_equal(instances_from_border_core(semantic), reference(semantic))
