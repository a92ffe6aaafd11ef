"""Your own movie, end to end (segment.py, movie_io.py, cell_table.py): the pixel size of an OME-TIFF, an ImageJ TIFF
and a CZI file is read; a TZCYX stack goes through segment.py with the channel asked for; every output is written
and readable; bad input gets one line naming the file and nothing is written; the per-cell table measures hand-built
rods right. The model is replaced by a stand-in that returns known instance maps (the bundled model runs in the one
slow test)."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import tifffile

import cell_table
import movie_io
import segment
from conftest import SHARED_REAL
from data_files import DataError


def rods_movie(n_frames=4, shape=(64, 96), drift=(0, 3)):
    """Instance maps of three rods moving by `drift` px a frame, and images with dark cells on a grey background."""
    labels = []
    for t in range(n_frames):
        frame = np.zeros(shape, np.uint16)
        dy, dx = t * drift[0], t * drift[1]
        frame[10 + dy:18 + dy, 10 + dx:40 + dx] = 1
        frame[30 + dy:38 + dy, 12 + dx:44 + dx] = 2
        frame[46 + dy:54 + dy, 40 + dx:70 + dx] = 3
        labels.append(frame)
    labels = np.stack(labels)
    images = np.where(labels > 0, 800, 2000).astype(np.uint16)
    return images, labels


@pytest.fixture
def stand_in_model(monkeypatch):
    """predict_images replaced: returns the instance maps of rods_movie, and records the cell width it was given."""
    import inference
    import unet
    calls = {}

    class Model:
        class hparams:
            cell_width = 16.0

    def predict_images(model, images, cell_width=None, device="auto", progress=None):
        calls["cell_width"], calls["shapes"] = cell_width, [np.shape(image) for image in images]
        calls["images"] = [np.asarray(image) for image in images]
        _, labels = rods_movie(len(images), np.shape(images[0]))
        for done in range(1, len(images) + 1):
            progress(done, len(images))
        return [frame.astype(np.int32) for frame in labels]

    monkeypatch.setattr(inference, "predict_images", predict_images)
    monkeypatch.setattr(unet, "load_model", lambda path, **options: Model())
    return calls


def run_segment(*args):
    """segment.py's main in this process: (exit status, the error line sys.exit prints, or "")."""
    try:
        segment.main([str(a) for a in args])
    except SystemExit as stop:
        return (1, str(stop.code)) if isinstance(stop.code, str) else (stop.code, "")
    return 0, ""


def test_ome_tiff_tzcyx_goes_through_segment_with_its_pixel_size(tmp_path, stand_in_model):
    images, labels = rods_movie()
    other_channel = (images // 2).astype(np.uint16)
    stack = np.stack([images, other_channel], 1)[:, None]  # T Z C Y X, one plane, two channels
    path = tmp_path / "movie.ome.tif"
    tifffile.imwrite(path, stack, metadata={"axes": "TZCYX", "PhysicalSizeX": 0.065, "PhysicalSizeY": 0.065,
                                            "PhysicalSizeXUnit": "µm"})
    tifffile.imwrite(tmp_path / "gt.tif", labels, photometric="minisblack")
    out = tmp_path / "result"
    assert run_segment(path, "--out", out, "--channel", "1", "--gt", tmp_path / "gt.tif") == (0, "")
    # the pixel size from the file sets the cell width: 1 µm at 0.065 µm/px
    assert stand_in_model["cell_width"] == pytest.approx(1 / 0.065)
    np.testing.assert_array_equal(stand_in_model["images"][2], other_channel[2])  # channel 1 was segmented
    assert sorted(os.listdir(out)) == ["cells.csv", "drift.csv", "instance_dice.csv", "labels.ome.tif",
                                       "lineage.png", "overlay.gif", "res_track.txt", "segment.json", "tracks.csv"] \
        or "cells.parquet" in os.listdir(out)
    summary = json.loads((out / "segment.json").read_text())
    assert summary["pixel_size_um"] == 0.065 and summary["pixel_size_from"] == "file"
    assert summary["tracks"] == 3 and summary["divisions"] == 0 and summary["mean_instance_dice"] == 1.0
    with tifffile.TiffFile(out / "labels.ome.tif") as tif:
        assert tif.series[0].axes == "TYX" and tif.series[0].shape == labels.shape
        assert movie_io.ome_pixel_size(tif.ome_metadata) == 0.065
        written = tif.asarray()
    # labels are track ids: a rod keeps its id over the frames
    assert [sorted(np.unique(frame[frame > 0]).tolist()) for frame in written] == [[1, 2, 3]] * 4
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 12 and list(cells.columns) == cell_table.CELL_COLUMNS
    first = cells[(cells.frame == 0) & (cells.track == 1)].iloc[0]
    assert first.area_px == 8 * 30 and first.length_px == 30 and first.area_um2 == pytest.approx(240 * 0.065 ** 2)
    assert first.mean_intensity == 400  # channel 1's value under the cell
    assert list(cells.groupby("frame").drift_x.first()) == [0, 3, 6, 9]  # the drift of the rods, registered
    drift = pd.read_csv(out / "drift.csv")
    assert list(drift.shift_x) == [0, 3, 3, 3] and list(drift.shift_y) == [0, 0, 0, 0]
    from PIL import Image
    with Image.open(out / "overlay.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (96, 64)


def test_pixel_size_flag_overrides_and_without_one_the_width_is_estimated(tmp_path, stand_in_model):
    images, _ = rods_movie()
    tifffile.imwrite(tmp_path / "plain.tif", images, photometric="minisblack")
    assert run_segment(tmp_path / "plain.tif", "--out", tmp_path / "a") == (0, "")
    assert stand_in_model["cell_width"] is None  # no pixel size: estimated by predict_images
    assert json.loads((tmp_path / "a" / "segment.json").read_text())["pixel_size_um"] is None
    assert np.isnan(pd.read_csv(tmp_path / "a" / "cells.csv").area_um2).all()
    assert run_segment(tmp_path / "plain.tif", "--out", tmp_path / "b", "--pixel_size", "0.1", "--cell_width_um",
                       "0.8") == (0, "")
    assert stand_in_model["cell_width"] == pytest.approx(8.0)
    assert run_segment(tmp_path / "plain.tif", "--out", tmp_path / "c", "--cell_width", "12", "--frames", "1:3") \
        == (0, "")
    assert stand_in_model["cell_width"] == 12 and len(stand_in_model["shapes"]) == 2


def test_imagej_and_centimetre_resolutions_give_the_pixel_size(tmp_path):
    stack = np.zeros((3, 20, 30), np.uint16)
    tifffile.imwrite(tmp_path / "ij.tif", stack, imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                     metadata={"unit": "micron", "axes": "TYX"})
    tifffile.imwrite(tmp_path / "cm.tif", stack, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER",
                     photometric="minisblack")
    tifffile.imwrite(tmp_path / "dpi.tif", stack, resolution=(72, 72), resolutionunit="INCH", photometric="minisblack")
    assert movie_io.read_movie(str(tmp_path / "ij.tif")).pixel_size == pytest.approx(0.2)
    assert movie_io.read_movie(str(tmp_path / "cm.tif")).pixel_size == pytest.approx(0.5)
    assert movie_io.read_movie(str(tmp_path / "dpi.tif")).pixel_size is None  # a printing density, not a size
    movie = movie_io.read_movie(str(tmp_path / "ij.tif"), frames=slice(1, None))
    assert movie.frames.shape == (2, 20, 30) and movie.frame_numbers == [1, 2]


def test_a_short_stack_stored_as_rgb_planes_is_read_as_frames_or_as_colours(tmp_path):
    stack = np.arange(3 * 20 * 30, dtype=np.uint16).reshape(3, 20, 30)
    tifffile.imwrite(tmp_path / "planes.tif", stack, photometric="rgb", planarconfig="separate")  # axes SYX
    np.testing.assert_array_equal(movie_io.read_movie(str(tmp_path / "planes.tif")).frames, stack)
    np.testing.assert_array_equal(movie_io.read_movie(str(tmp_path / "planes.tif"), channel=2).frames, stack[2:])
    tifffile.imwrite(tmp_path / "rgb.tif", np.moveaxis(stack, 0, -1), photometric="rgb")  # YXS: an RGB image
    with pytest.raises(DataError, match=r"an RGB image \(axes YXS 20 x 30 x 3\); choose one with --channel 0..2"):
        movie_io.read_movie(str(tmp_path / "rgb.tif"))


def test_czi_file_is_read_through_bioio_with_its_pixel_size(tmp_path):
    pytest.importorskip("bioio_czi", reason="the optional extra requirements-movie.txt is not installed")
    pyczi = pytest.importorskip("pylibCZIrw.czi", reason="pylibCZIrw (bioio-czi's dependency) writes the test file")
    rng = np.random.default_rng(0)
    planes = rng.integers(0, 4000, (3, 2, 30, 40)).astype(np.uint16)  # T C Y X
    path = str(tmp_path / "movie.czi")
    with pyczi.create_czi(path, exist_ok=True) as czi:
        for t in range(3):
            for c in range(2):
                czi.write(data=planes[t, c], plane={"T": t, "C": c, "Z": 0})
        czi.write_metadata(document_name="test", scale_x=0.08e-6, scale_y=0.08e-6)  # metres
    movie = movie_io.read_movie(path, channel=1)
    assert movie.pixel_size == pytest.approx(0.08)
    np.testing.assert_array_equal(movie.frames, planes[:, 1])
    with pytest.raises(DataError, match=r"2 channels \(axes TCYX 3 x 2 x 30 x 40\); choose one with --channel 0..1"):
        movie_io.read_movie(path)


@pytest.mark.parametrize("case, message", [
    ("rgb", "an RGB image (axes YXS 30 x 40 x 3); choose one with --channel 0..2"),
    ("channels", "2 channels (axes TCYX 3 x 2 x 30 x 40); choose one with --channel 0..1"),
    ("zstack", "a z-stack of 4 planes (axes ZYX 4 x 30 x 40)"),
    ("unsupported", "unsupported format; formats that work: TIFF"),
    ("missing", "no such file"),
    ("broken", "unreadable TIFF"),
    ("frames", "no frame selected by --frames (the file has 3 frames)"),
])
def test_bad_movie_gets_one_line_naming_the_file_and_nothing_is_written(tmp_path, stand_in_model, case, message):
    path = tmp_path / {"unsupported": "movie.png", "missing": "none.tif"}.get(case, "movie.tif")
    if case == "rgb":
        tifffile.imwrite(path, np.zeros((30, 40, 3), np.uint8))
    elif case == "channels":
        tifffile.imwrite(path, np.zeros((3, 2, 30, 40), np.uint16), metadata={"axes": "TCYX"})
    elif case == "zstack":
        tifffile.imwrite(path, np.zeros((4, 30, 40), np.uint16), metadata={"axes": "ZYX"}, photometric="minisblack")
    elif case in ("unsupported", "broken"):
        path.write_bytes(b"not an image")
    elif case == "frames":
        tifffile.imwrite(path, np.zeros((3, 30, 40), np.uint16), photometric="minisblack")
    args = [path, "--out", tmp_path / "out"] + (["--frames", "5:9"] if case == "frames" else [])
    status, error = run_segment(*args)
    assert status == 1 and "\n" not in error and error.startswith(f"error: {path}: "), error
    assert message in error, error
    assert not os.path.exists(tmp_path / "out") and "cell_width" not in stand_in_model


def test_bad_model_gt_and_existing_out_are_refused_before_anything_is_written(tmp_path, stand_in_model):
    images, labels = rods_movie()
    tifffile.imwrite(tmp_path / "movie.tif", images, photometric="minisblack")
    tifffile.imwrite(tmp_path / "short.tif", labels[:3], photometric="minisblack")
    status, error = run_segment(tmp_path / "movie.tif", "--out", tmp_path / "out", "--model", tmp_path / "no.ckpt")
    assert status == 1 and error == (f"error: {tmp_path / 'no.ckpt'}: no such checkpoint; leave --model out to use "
                                     f"the bundled model (models/bacteria_generalist.pt)")
    status, error = run_segment(tmp_path / "movie.tif", "--out", tmp_path / "out", "--gt", tmp_path / "short.tif")
    assert status == 1 and "mask stack of 3 x 64 x 96 (frames :) differs from the movie's 4 x 64 x 96" in error
    assert not os.path.exists(tmp_path / "out") and "cell_width" not in stand_in_model
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    status, error = run_segment(tmp_path / "movie.tif", "--out", tmp_path / "out")
    assert status == 1 and "already exists" in error and (tmp_path / "out" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("flag, value", [("--pixel_size", "0"), ("--pixel_size", "-1"), ("--cell_width_um", "nan"),
                                         ("--frames", "3"), ("--channel", "-1")])
def test_bad_flag_values_get_a_usage_line(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        segment.main(["movie.tif", "--out", str(tmp_path / "o"), flag, value])
    assert stop.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def capsule(shape, centre, length, width, angle_degrees):
    """A rod: the pixels whose centre lies within width / 2 of a segment of length - width through `centre`."""
    yy, xx = np.indices(shape, dtype=np.float64)
    angle = np.radians(angle_degrees)
    direction = np.array([np.sin(angle), np.cos(angle)])
    half = (length - width) / 2
    offset_y, offset_x = yy - centre[0], xx - centre[1]
    along = np.clip(offset_y * direction[0] + offset_x * direction[1], -half, half)
    distance = np.hypot(offset_y - along * direction[0], offset_x - along * direction[1])
    return distance <= width / 2


@pytest.mark.parametrize("angle", [0, 30, 45, 90, 120])
def test_cell_table_measures_hand_built_rods(angle):
    shape = (120, 160)
    labels = np.zeros(shape, np.uint16)
    rods = {1: ((40.5, 50.5), 50, 10), 2: ((85.5, 110.5), 30, 8), 3: ((30.5, 120.5), 20, 12)}  # centre, length, width
    for label, (centre, length, width) in rods.items():
        labels[capsule(shape, centre, length, width, angle)] = label
    image = np.arange(labels.size, dtype=np.float64).reshape(shape)
    tracks = np.array([[1, 0, 0, 0], [2, 0, 0, 0], [3, 0, 0, 0]])
    table = cell_table.cell_table([labels], tracks, [image], pixel_size=0.1).set_index("track")
    for label, (centre, length, width) in rods.items():
        row = table.loc[label]
        assert row.area_px == np.count_nonzero(labels == label)
        assert abs(row.area_px - (width * (length - width) + np.pi * width ** 2 / 4)) < 0.06 * row.area_px
        assert abs(row.length_px - length) <= 1, (label, row.length_px)
        assert abs(row.width_px - width) <= 0.6, (label, row.width_px)
        assert row.length_um == pytest.approx(row.length_px * 0.1) and row.width_um == pytest.approx(row.width_px * 0.1)
        assert np.allclose([row.centroid_y, row.centroid_x], centre, atol=0.5)
        assert row.mean_intensity == pytest.approx(image[labels == label].mean())


def test_cell_table_follows_the_lineage():
    tracks = np.array([[1, 0, 1, 0], [2, 2, 3, 1], [3, 2, 3, 1], [4, 4, 4, 2], [5, 4, 4, 2]])
    maps = []
    for t, present in enumerate([[1], [1], [2, 3], [2, 3], [4, 5, 3]]):
        frame = np.zeros((20, 40), np.uint8)
        for k, label in enumerate(present):
            frame[2 + 6 * k:6 + 6 * k, 2:20] = label
        maps.append(frame)
    table = cell_table.cell_table(maps, tracks)
    assert list(table.frame) == [0, 1, 2, 2, 3, 3, 4, 4, 4]
    assert list(table.track) == [1, 1, 2, 3, 2, 3, 3, 4, 5]
    assert list(table.parent) == [0, 0, 1, 1, 1, 1, 1, 2, 2]
    assert list(table.generation) == [0, 0, 1, 1, 1, 1, 1, 2, 2]
    assert table.mean_intensity.isna().all() and table.area_um2.isna().all() and (table.drift_x == 0).all()


@pytest.mark.slow
@pytest.mark.real
def test_bundled_model_on_a_real_crop_end_to_end(tmp_path):
    """The bundled model (no stand-in) on three frames of trpL cut around the colony, the pixel size in the file
    (0.06 µm/px: the masks' cells are about 17 px wide, an E. coli about 1 µm): cells found, scored and tracked."""
    image_path = os.path.join(SHARED_REAL, "trpL", "trpL_150310-11_img.tif")
    if not os.path.exists(image_path):
        pytest.skip(f"{image_path}: the real sample of ../shared/real is absent")
    images = tifffile.imread(image_path)[17:20, 200:520, 120:380]
    masks = tifffile.imread(image_path.replace("_img", "_mask"))[17:20, 200:520, 120:380]
    tifffile.imwrite(tmp_path / "crop.tif", images, imagej=True, resolution=(1 / 0.06, 1 / 0.06),
                     metadata={"unit": "um", "axes": "TYX"})
    tifffile.imwrite(tmp_path / "masks.tif", masks, photometric="minisblack")
    assert run_segment(tmp_path / "crop.tif", "--out", tmp_path / "out", "--gt", tmp_path / "masks.tif",
                       "--device", "cpu") == (0, "")
    summary = json.loads((tmp_path / "out" / "segment.json").read_text())
    assert summary["pixel_size_um"] == pytest.approx(0.06) and summary["cell_width_px"] == pytest.approx(1 / 0.06)
    assert summary["mean_instance_dice"] > 0.7 and 14 <= summary["cells_last_frame"] <= 20


def test_import_sequence_reads_movie_files_and_refuses_rgb_and_duplicate_numbers(tmp_path):
    """import_sequence reads what segment.py reads: a channel of an OME-TIFF; a single RGB image is refused with its
    axes (#41 F13); img_1.tif and img_01.tif in one folder are refused (F25)."""
    from import_sequence import import_sequence
    images, _ = rods_movie(n_frames=3)
    tifffile.imwrite(tmp_path / "two.ome.tif", np.stack([images, images // 2], 1), metadata={"axes": "TCYX"})
    assert import_sequence(str(tmp_path / "two.ome.tif"), str(tmp_path / "data"), "a", channel=1) == 3
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "data" / "a" / "t0002.tif"), images[2] // 2)
    tifffile.imwrite(tmp_path / "photo.tif", np.zeros((64, 96, 3), np.uint8))
    with pytest.raises(DataError, match=r"photo.tif: an RGB image \(axes YXS 64 x 96 x 3\); choose one with --channel"):
        import_sequence(str(tmp_path / "photo.tif"), str(tmp_path / "data"), "b")
    (tmp_path / "frames").mkdir()
    for name in ("img_1.tif", "img_01.tif", "img_2.tif"):
        tifffile.imwrite(tmp_path / "frames" / name, images[0])
    with pytest.raises(DataError, match=r"frames: img_01.tif and img_1.tif both are frame 1; rename one"):
        import_sequence(str(tmp_path / "frames"), str(tmp_path / "data"), "c")
    assert sorted(os.listdir(tmp_path / "data")) == ["a"]


def test_the_doctests_of_the_movie_modules_hold():
    import doctest

    import track
    for module in (movie_io, cell_table, track):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
