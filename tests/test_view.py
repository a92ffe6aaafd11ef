"""view.py: the layers it builds from a segment.py result, and napari for real under Xvfb (the optional extra
requirements-view.txt and xvfb-run; skipped with the reason where either is absent): the window shows the three
layers and a screenshot of it is taken."""
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile

import view
from conftest import ROOT
from data_files import DataError
from test_movie import rods_movie, run_segment, stand_in_model  # noqa: F401 (a fixture)


@pytest.fixture
def result(tmp_path, stand_in_model):  # noqa: F811
    images, _ = rods_movie(n_frames=5)
    tifffile.imwrite(tmp_path / "movie.tif", images, imagej=True, resolution=(1 / 0.1, 1 / 0.1),
                     metadata={"unit": "um", "axes": "TYX"})
    assert run_segment(tmp_path / "movie.tif", "--out", tmp_path / "out") == (0, "")
    return tmp_path


def test_layers_data_of_a_result(result):
    data = view.layers_data(str(result / "out"))
    images, labels = rods_movie(n_frames=5)
    np.testing.assert_array_equal(data["image"], images)
    assert data["labels"].shape == labels.shape and data["scale"] == pytest.approx(0.1) and data["note"] is None
    # one row per cell per frame: (track, frame, y, x), the rods' centroids moving 3 px a frame in x
    assert data["tracks"].shape == (15, 4) and data["graph"] == {}
    first = data["tracks"][data["tracks"][:, 0] == 1]
    assert first[:, 1].tolist() == [0, 1, 2, 3, 4] and np.allclose(np.diff(first[:, 3]), 3)
    os.remove(result / "movie.tif")  # the movie gone: labels and tracks still shown, with a note
    data = view.layers_data(str(result / "out"))
    assert data["image"] is None and "no such file" in data["note"]
    with pytest.raises(DataError, match="segment.json: missing"):
        view.layers_data(str(result))


@pytest.mark.slow
def test_napari_under_xvfb_shows_the_three_layers(result):
    if importlib.util.find_spec("napari") is None:
        pytest.skip("napari is not installed (the optional extra: pip install -r requirements-view.txt)")
    if shutil.which("xvfb-run") is None:
        pytest.skip("xvfb-run is not installed (apt-get install xvfb; `make extras` does it)")
    shot = result / "view.png"
    command = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", sys.executable, os.path.join(ROOT, "view.py"),
               str(result / "out"), "--screenshot", str(shot), "--close", "--frame", "2"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "layers: image (Image), labels (Labels), tracks (Tracks)" in done.stdout
    import matplotlib.pyplot as plt
    picture = plt.imread(shot)
    assert picture.shape[0] > 300 and picture.shape[1] > 500
    assert picture[..., :3].std() > 0.05  # a window with content, not a blank screen
