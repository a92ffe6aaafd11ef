"""The simulator keeps its promises: shapes and dtypes, cells that do not overlap, growth and division, dark cells on
a brighter background, masks that match the rendered cells, a dense colony at the end, determinism."""
import os

import numpy as np
import pytest
from scipy import ndimage

import simulate
from dataset import list_frames, read_mask, read_tiff_2d


@pytest.fixture(scope="module")
def movie():
    return [(image, labels, len(colony.label), colony.divisions, colony.overlaps()[4].max(initial=0))
            for image, labels, colony in simulate.simulate_sequence(n_frames=40, size=(112, 144), seed=3)]


def test_frames_and_masks_have_the_requested_shape_and_dtype(movie):
    for image, labels, *_ in movie:
        assert image.shape == labels.shape == (112, 144)
        assert image.dtype == np.uint8 and labels.dtype == np.uint16


def test_cells_do_not_overlap_and_each_mask_is_one_rod(movie):
    for _, labels, _, _, deepest_overlap in movie:
        assert deepest_overlap < simulate.CELL_RADIUS  # axes never closer than one radius
        for label in np.unique(labels[labels > 0]):
            _, pieces = ndimage.label(labels == label)
            assert pieces == 1
    last = movie[-1][1]
    sizes = np.bincount(last.ravel())[1:]
    rod = np.pi * simulate.CELL_RADIUS ** 2  # a bare cap pair; real cells are longer
    assert np.median(sizes[sizes > 0]) > rod


def test_colony_grows_by_division_and_fills_the_chamber(movie):
    counts = [count for _, _, count, _, _ in movie]
    assert counts[0] <= 3 and counts[-1] >= 5 * counts[0]
    assert counts[0] < counts[len(counts) // 2] < counts[-1]
    assert movie[-1][3] > 10  # divisions
    labels_first, labels_last = set(np.unique(movie[0][1])) - {0}, set(np.unique(movie[-1][1])) - {0}
    assert not labels_first & labels_last  # the founders divided: their labels are gone, daughters have new ones
    assert (movie[-1][1] > 0).mean() > 0.5  # more than half of the frame (and so of the chamber) is cells


def test_labels_persist_between_divisions(movie):
    for (_, before, *_), (_, after, *_) in zip(movie[:-1], movie[1:]):
        kept = (set(np.unique(before)) & set(np.unique(after))) - {0}
        assert kept or len(np.unique(before)) <= 1
        for label in list(kept)[:5]:  # a cell that keeps its label stays where it was, give or take a push
            shift = np.abs(np.argwhere(before == label).mean(0) - np.argwhere(after == label).mean(0))
            assert shift.max() < 2 * simulate.CELL_RADIUS


def test_cells_are_dark_on_a_brighter_background_and_match_the_mask(movie):
    image, labels, *_ = movie[-1]
    cells = labels > 0
    assert image[cells].mean() + 40 < image[~cells].mean()
    # the rendered dark pixels are the masked ones: thresholding the image recovers the mask closely
    dark = image < (image[cells].mean() + image[~cells].mean()) / 2
    assert (dark & cells).sum() / (dark | cells).sum() > 0.7


def test_same_seed_same_bytes_and_layout(tmp_path):
    for name in ("one", "two"):
        simulate.write_dataset(str(tmp_path / name), n_sequences=3, n_frames=5, size=(64, 80), seed=7,
                               n_without_gt=1)
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "one") for d, _, fs in os.walk(tmp_path / "one")
                   for f in fs)
    assert "a_GT/man_seg0004.tif" in files and "c/t0004.tif" in files and not os.path.exists(tmp_path / "one/c_GT")
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    other = tmp_path / "other"
    simulate.write_dataset(str(other), n_sequences=1, n_frames=5, size=(64, 80), seed=8, n_without_gt=0)
    assert (other / "a/t0004.tif").read_bytes() != (tmp_path / "one/a/t0004.tif").read_bytes()
    frames = list_frames(str(tmp_path / "one"), "b", with_masks=True)  # the pipeline reads it
    assert read_mask(frames[4].mask_path, read_tiff_2d(frames[4].image_path).shape).dtype == np.uint16
