"""instance_dice against hand-worked answers and acvl-utils' match_instances_dice (SPEC §6)."""
import numpy as np
import pytest
from acvl_utils.instance_segmentation.instance_matching import match_instances_dice

from conftest import dense_labels
from metrics import instance_dice, match_instances
from border_core import instances_from_border_core
from conftest import noisy_border_core


def test_identical_maps_score_one_and_relabelling_does_not_matter():
    gt = dense_labels(0, size=(64, 64), n_cells=12)
    assert instance_dice(gt, gt) == 1.0
    permuted = np.concatenate([[0], np.random.default_rng(0).permutation(np.arange(1, 13)) + 100])[gt]
    assert instance_dice(gt, permuted) == 1.0


def test_hand_worked_frame():
    gt = np.zeros((10, 20), np.uint8)
    pred = np.zeros((10, 20), np.uint8)
    gt[0:4, 0:4] = 1  # 16 px
    pred[0:4, 0:2] = 5  # 8 px inside it: Dice 2 * 8 / 24 = 2/3
    gt[6:8, 10:20] = 2  # 20 px, no prediction: a miss
    pred[0:2, 15:19] = 6  # 8 px, no GT: a false positive
    matches, n_gt, n_pred = match_instances(gt, pred)
    assert matches == [(1, 5, pytest.approx(2 / 3))] and (n_gt, n_pred) == (2, 2)
    assert instance_dice(gt, pred) == pytest.approx((2 / 3) / 3)  # entries: 2/3, 0 (miss), 0 (false positive)


def test_pairs_at_or_below_cutoff_do_not_match():
    gt = np.zeros((1, 100), np.uint8)
    pred = np.zeros((1, 100), np.uint8)
    gt[0, :90] = 1
    pred[0, 85:95] = 2  # overlap 5: Dice 10 / 100 = 0.1, not above the cutoff
    assert match_instances(gt, pred)[0] == []
    assert instance_dice(gt, pred) == 0.0


def test_greedy_takes_the_best_pair_first_and_breaks_ties_like_acvl():
    gt = np.zeros((4, 12), np.uint8)
    pred = np.zeros((4, 12), np.uint8)
    gt[:, 0:4], gt[:, 4:8] = 1, 2
    pred[:, 2:6] = 3  # equal Dice with GT 1 and GT 2: the lower GT label wins
    pred[:, 8:12] = 4
    expected = [(m[0], m[1], m[2]) for m in match_instances_dice(gt, pred) if m[0] is not None and m[1] is not None]
    assert match_instances(gt, pred)[0] == expected == [(1, 3, 0.5)]


def test_empty_frames():
    empty = np.zeros((8, 8), np.uint16)
    one = empty.copy()
    one[2:4, 2:4] = 1
    assert instance_dice(empty, empty) == 1.0  # documented choice; the baseline's mean of nothing is NaN
    assert instance_dice(one, empty) == 0.0 and instance_dice(empty, one) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_equals_acvl_utils_matching_on_dense_random_frames(seed):
    gt = dense_labels(seed, size=(160, 200), n_cells=120)
    pred = instances_from_border_core(noisy_border_core(seed + 50, size=(160, 200), n_cells=110, noise=0.1))
    reference = match_instances_dice(gt, pred)
    matched = [(int(g), int(p), d) for g, p, d, _, _ in reference if g is not None and p is not None]
    ours, n_gt, n_pred = match_instances(gt, pred)
    assert [(g, p) for g, p, _ in ours] == [(g, p) for g, p, _ in matched]
    np.testing.assert_allclose([d for *_, d in ours], [d for *_, d in matched], rtol=0, atol=1e-12)
    assert abs(instance_dice(gt, pred) - np.mean([m[2] for m in reference])) < 1e-9


def test_label_dtypes_and_huge_label_values():
    gt = dense_labels(3, size=(48, 64), n_cells=20)
    pred = gt.copy()
    pred[:, :10] = 0
    expected = instance_dice(gt, pred)
    for dtype in (np.uint8, np.uint16, np.int32, np.uint64, np.int64):
        assert instance_dice(gt.astype(dtype), pred.astype(dtype)) == expected
    sparse = np.where(pred > 0, pred.astype(np.uint64) + 2 ** 40, 0)  # label values far above the pixel count
    assert instance_dice(gt, sparse) == expected
    assert instance_dice(gt > 0, pred > 0) == instance_dice((gt > 0).astype(np.uint8), (pred > 0).astype(np.uint8))
