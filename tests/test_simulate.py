"""The simulator keeps its promises: shapes and dtypes, cells that do not overlap, growth and division, dark cells on
a brighter background, masks that match the rendered cells, a dense colony at the end, determinism."""
import hashlib
import os

import numpy as np
import pytest
from scipy import ndimage

import simulate
from data_files import list_frames, read_mask, read_tiff_2d


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


# ------------------------------------------------------------------------------------- randomised look and geometry

# sha256 of the frames and masks of simulate_sequence(12, (64, 80), seed=5), computed from the code before the
# randomised look and geometry were added: the default path must keep making exactly these bytes
DEFAULT_PATH_SHA256 = "3a35677d4c7135630c917d2ea93e4db272ae2d0595f7993179480cd1afa27990"


def test_default_path_is_byte_identical_to_the_code_before_randomisation():
    digest = hashlib.sha256()
    for image, labels, _ in simulate.simulate_sequence(n_frames=12, size=(64, 80), seed=5):
        digest.update(image.tobytes())
        digest.update(labels.tobytes())
    assert digest.hexdigest() == DEFAULT_PATH_SHA256


def capsule_widths(labels):
    """Width of each whole cell (not cut by the frame edge) from its area A and its extent L along its main axis:
    a capsule has A = w L - (1 - pi / 4) w², solved for w."""
    widths = []
    for label, box in enumerate(ndimage.find_objects(labels), 1):
        if box is None or any(s.start == 0 or s.stop == n for s, n in zip(box, labels.shape)):
            continue
        points = np.argwhere(labels[box] == label).astype(float)
        points -= points.mean(0)
        along = points @ np.linalg.eigh(points.T @ points)[1][:, -1]
        length, area, corners = np.ptp(along) + 1, len(points), 1 - np.pi / 4
        widths.append((length - np.sqrt(max(length ** 2 - 4 * corners * area, 0))) / (2 * corners))
    return np.array(widths)


def test_capsule_widths_measures_a_hand_drawn_capsule():
    labels = np.zeros((60, 80), np.uint16)
    ys, xs = np.mgrid[:60, :80]
    along = np.clip(xs, 20, 50)  # a horizontal capsule: segment x 20..50 at y 30, radius 6
    labels[np.hypot(xs - along, ys - 30) <= 6] = 1
    assert abs(capsule_widths(labels)[0] - 12) < 0.6


@pytest.fixture(scope="module")
def random_movies():
    """Twelve randomised sequences: their looks, geometries, masks and the deepest overlap over all frames."""
    movies = []
    for seed in range(12):
        deepest, frames = 0.0, []
        for image, labels, colony in simulate.simulate_sequence(n_frames=10, size=(160, 160), seed=seed,
                                                                randomise=True):
            deepest = max(deepest, colony.overlaps()[4].max(initial=0))
            frames.append((image, labels))
        movies.append((colony, frames, deepest))
    return movies


def test_random_setups_cover_the_looks_and_geometries(random_movies):
    looks = {(colony.look.modality, colony.look.dtype) for colony, _, _ in random_movies}
    kinds = {colony.geometry.kind for colony, _, _ in random_movies}
    assert {"phase", "brightfield"} <= {m for m, _ in looks} and {"uint8", "uint16"} <= {d for _, d in looks}
    assert kinds == set(simulate.GEOMETRIES)
    widths = [colony.geometry.cell_width for colony, _, _ in random_movies]
    assert min(widths) < 9 and max(widths) > 15


def test_randomised_frames_have_the_looks_dtype_and_cells_do_not_overlap(random_movies):
    for colony, frames, deepest in random_movies:
        for image, labels in frames:
            assert image.dtype == np.dtype(colony.look.dtype) and image.shape == labels.shape == (160, 160)
            assert labels.dtype == np.uint16
        assert deepest < colony.radius, colony.geometry  # axes never closer than one radius
        labels = frames[-1][1]
        for label in np.unique(labels[labels > 0]):
            assert ndimage.label(labels == label)[1] == 1


def test_masks_show_the_drawn_cell_width(random_movies):
    for colony, frames, _ in random_movies:
        widths = capsule_widths(frames[-1][1])
        assert len(widths) >= 2
        assert abs(np.median(widths) / colony.geometry.cell_width - 1) < 0.15, colony.geometry


def test_same_seed_same_randomised_bytes_other_seed_other_look():
    def run(seed):
        return [(image.tobytes(), labels.tobytes(), colony.look)
                for image, labels, colony in simulate.simulate_sequence(3, (64, 64), seed, randomise=True)]
    assert run(4) == run(4)
    assert run(4)[-1][2] != run(5)[-1][2]


def test_cells_differ_from_the_background_in_the_direction_the_look_says():
    """Random looks in a chamber and on agar (where there is background far from the cells' halo): the cells' median
    is darker or brighter than the far background as the sign of cell_contrast says; phase contrast halos are bright."""
    signs, halos = set(), 0
    for seed in range(16):
        rng = np.random.default_rng(100 + seed)
        look, _ = simulate.random_setup(rng)
        geometry = simulate.Geometry(kind=("chamber", "agar")[seed % 2], cell_width=float(rng.uniform(6, 16)))
        movie = simulate.simulate_sequence(8, (128, 128), seed, look=look, geometry=geometry)
        for _ in range(3):  # an early frame: cells, and background far from their halo
            image, labels, colony = next(movie)
        image = image.astype(float)
        cells = ndimage.binary_erosion(labels > 0, iterations=2)
        distance = ndimage.distance_transform_edt(labels == 0)
        reach = 3 * look.halo_width + 3 * look.blur + 2
        far = (distance > reach) & ~ndimage.binary_dilation(colony.pdms, iterations=int(reach) + 1)
        assert cells.sum() > 20 and far.sum() > 200
        difference = np.median(image[cells]) - np.median(image[far])
        assert np.sign(difference) == np.sign(look.cell_contrast), look
        signs.add((look.modality, np.sign(look.cell_contrast)))
        if look.modality == "phase" and look.halo > 0.5 and look.halo_width > 2 * look.blur:
            ring = (distance > 0) & (distance <= look.halo_width) & ~colony.pdms
            assert np.median(image[ring]) > np.median(image[far]), look
            halos += 1
    assert {("phase", -1), ("brightfield", -1), ("brightfield", 1)} <= signs and halos >= 2


@pytest.mark.parametrize("kind", simulate.GEOMETRIES)
def test_every_geometry_grows_a_colony_in_its_walls(kind):
    counts = []
    for image, labels, colony in simulate.simulate_sequence(30, (160, 192), seed=2,
                                                            geometry=simulate.Geometry(kind=kind, cell_width=10)):
        counts.append((len(colony.label), colony.divisions, (labels > 0).mean()))
    (first, _, covered_first), (last, divisions, covered_last) = counts[0], counts[-1]
    assert last >= 4 * first and divisions >= 2 * first and covered_last > 2 * covered_first
    cells = labels > 0
    assert not (cells & ndimage.binary_erosion(colony.pdms)).any()  # no cell in the PDMS (touching: within 1 px)
    if kind == "channel":  # cells in single file along the channels, each channel with its own column
        assert len(colony.lanes) >= 4
        assert (np.abs(np.sin(colony.angle)) > 0.9).mean() > 0.9
        lane = np.searchsorted(colony.lanes[:, 0], colony.pos[:, 0]) - 1
        assert len(set(lane)) == len(colony.lanes)
    if kind == "agar":  # grows from the centre, free of walls
        assert np.abs(colony.pos.mean(0) - [96, 80]).max() < 30 and not colony.pdms.any()


def test_debris_and_blobs_show_in_the_image_but_not_in_the_mask():
    clean, dirty = (simulate.Look(noise=0, flicker=0, illumination=0, debris=debris, blobs=blobs)
                    for debris, blobs in ((0, 0), (40, 3)))
    geometry = simulate.Geometry(kind="agar", founders=1)
    (image_clean, labels_clean, _), = simulate.simulate_sequence(1, (128, 128), 3, look=clean, geometry=geometry)
    (image_dirty, labels_dirty, _), = simulate.simulate_sequence(1, (128, 128), 3, look=dirty, geometry=geometry)
    assert (labels_clean > 0).sum() > 100 and (labels_dirty > 0).sum() > 100
    background = ndimage.distance_transform_edt(labels_dirty == 0) > 10
    spots = np.abs(image_dirty.astype(float) - np.median(image_dirty[background])) > 12
    assert (spots & background).sum() > 50  # specks and rings away from the cells
    assert np.ptp(image_clean[ndimage.distance_transform_edt(labels_clean == 0) > 10]) <= 2


def test_look_and_geometry_reject_unknown_kinds():
    with pytest.raises(ValueError, match="modality"):
        simulate.Look(modality="fluorescence")
    with pytest.raises(ValueError, match="geometry kind"):
        simulate.Geometry(kind="droplet")
    with pytest.raises(ValueError, match="dtype"):
        simulate.Look(dtype="float32")


def test_cli_writes_randomised_sequences_in_the_challenge_layout(tmp_path, capsys):
    simulate.main(["--out_dir", str(tmp_path / "sim"), "--randomise", "--num_sequences", "2", "--without_gt", "0",
                   "--num_frames", "3", "--size", "64", "--seed", "3"])
    out = capsys.readouterr().out
    assert out.count("sequence ") == 2 and "cells" in out and "px wide" in out
    for name in ("a", "b"):
        frames = list_frames(str(tmp_path / "sim"), name, with_masks=True)
        assert len(frames) == 3
        image = read_tiff_2d(frames[2].image_path)
        assert image.dtype in (np.uint8, np.uint16) and read_mask(frames[2].mask_path, image.shape).max() > 0
