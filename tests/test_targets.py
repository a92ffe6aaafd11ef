"""border_core_targets against hand-worked answers and a per-instance erosion reference (SPEC §2)."""
import numpy as np
import pytest

from benchmark import border_core_targets_loop
from conftest import dense_labels
from border_core import border_core_targets

# the straightforward version the benchmark times against: the baseline's loop over instances
per_instance_erosion = border_core_targets_loop


def test_square_in_the_middle_has_a_4px_border():
    labels = np.zeros((30, 30), np.uint16)
    labels[10:22, 10:22] = 7  # 12 x 12
    expected = np.zeros((30, 30), np.uint8)
    expected[10:22, 10:22] = 2
    expected[14:18, 14:18] = 1  # 12 - 2 * 4 = 4
    np.testing.assert_array_equal(border_core_targets(labels), expected)


def test_image_edge_does_not_erode():
    labels = np.zeros((30, 30), np.uint16)
    labels[0:12, 0:12] = 1  # touches the top and left edges
    expected = np.zeros((30, 30), np.uint8)
    expected[0:12, 0:12] = 2
    expected[0:8, 0:8] = 1  # eroded only from the bottom and the right
    np.testing.assert_array_equal(border_core_targets(labels), expected)


def test_touching_instances_erode_from_their_common_edge():
    labels = np.zeros((20, 40), np.uint8)
    labels[:, :20], labels[:, 20:] = 1, 2  # fill the whole image, meet at column 20
    targets = border_core_targets(labels)
    assert (targets > 0).all()
    np.testing.assert_array_equal(targets[:, 16:24], 2)
    np.testing.assert_array_equal(targets[:, :16], 1)
    np.testing.assert_array_equal(targets[:, 24:], 1)


def test_diamond_corners_distinguish_city_block_from_square_erosion():
    labels = np.ones((21, 21), np.uint8)
    labels[0, 0] = 0  # a single background pixel in the corner
    targets = border_core_targets(labels)
    # within city-block distance 4 of (0, 0) is border, (3, 2) is at distance 5 and stays core
    assert targets[2, 2] == 2 and targets[0, 4] == 2 and targets[3, 2] == 1 and targets[0, 5] == 1


def test_thin_instance_is_all_border():
    labels = np.zeros((20, 40), np.int32)
    labels[5:13, 2:38] = 3  # 8 px wide: no pixel is 4 erosions deep
    targets = border_core_targets(labels)
    assert set(np.unique(targets[labels == 3])) == {2}


@pytest.mark.parametrize("seed", range(4))
def test_equals_per_instance_erosion_on_dense_random_labels(seed):
    labels = dense_labels(seed, size=(200, 240), n_cells=150)
    np.testing.assert_array_equal(border_core_targets(labels), per_instance_erosion(labels))


def test_non_contiguous_label_and_dtypes():
    labels = dense_labels(7, size=(120, 90), n_cells=40)
    labels[labels == 5] = 9  # one label in two places, as masks sometimes have
    expected = per_instance_erosion(labels)
    for dtype in (np.uint16, np.int32, np.int64, np.uint32):
        np.testing.assert_array_equal(border_core_targets(labels.astype(dtype)), expected)
