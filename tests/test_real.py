"""train (1 epoch) -> inference -> eval on the real trpL sample, cropped around the colony, in the challenge layout.

uint16 frames of 218 x 282 px: neither square nor multiples of 8, as real data is.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from eval import evaluate

from conftest import ROOT, SHARED_REAL
from data_files import list_frames
from import_sequence import import_sequence
from test_pipeline import run

TRPL = os.path.join(SHARED_REAL, "trpL")
pytestmark = [pytest.mark.slow, pytest.mark.real,
              pytest.mark.skipif(not os.path.isdir(TRPL), reason=f"real sample not present at {TRPL} (../shared/real)")]
CROP = (218, 282)
IMAGES, MASKS = os.path.join(TRPL, "trpL_150310-11_img.tif"), os.path.join(TRPL, "trpL_150310-11_mask.tif")


def test_importer_follows_the_colony(tmp_path):
    stdout = run("import_sequence.py", "--images", IMAGES, "--masks", MASKS, "--root_dir", tmp_path, "--name", "trpL",
                 "--crop", 320, 320)
    assert "wrote 20 frames" in stdout
    frames = list_frames(str(tmp_path), "trpL", with_masks=True)
    assert len(frames) == 20
    full = tifffile.imread(MASKS)
    for t, frame in enumerate(frames):
        image, mask = tifffile.imread(frame.image_path), tifffile.imread(frame.mask_path)
        assert image.shape == mask.shape == (320, 320) and image.dtype == np.uint16 and mask.dtype == np.uint16
        # the window holds every labelled cell of the frame: same label set, same pixel count
        assert set(np.unique(mask)) == set(np.unique(full[t])) and (mask > 0).sum() == (full[t] > 0).sum()
    # the colony drifts ~700 px in the full frames; in the windows it stays near the centre
    centre = lambda mask: np.argwhere(mask > 0).mean(0)
    assert np.abs(centre(full[19]) - centre(full[0])).max() > 500
    for frame in frames:
        assert np.abs(centre(tifffile.imread(frame.mask_path)) - 160).max() < 60
    again = subprocess.run([sys.executable, "import_sequence.py", "--images", IMAGES, "--root_dir", str(tmp_path),
                            "--name", "trpL"], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode != 0 and "already exists" in again.stderr


def write_crops(root):
    """trpL split into a (frames 0-6), b (7-12) and c (13-19), each cropped around the colony by the importer."""
    for seq, frames in {"a": slice(0, 7), "b": slice(7, 13), "c": slice(13, 20)}.items():
        import_sequence(IMAGES, str(root), seq, MASKS, crop=CROP, frames=frames)
    return str(root)


def test_real_sample_end_to_end(tmp_path):
    root = write_crops(tmp_path / "trpL")
    assert tifffile.imread(os.path.join(root, "c", "t0006.tif")).dtype == np.uint16
    run("train.py", "--config", "recipes/faithful.yaml", "--root_dir", root, "--num_epochs", 1, "--batch_size", 4, "--set", "input_size=128",
        "--num_workers", 0, "--out_dir", tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    run("inference.py", "--root_dir", root, "--split", "val", "--model",
        tmp_path / "run" / "checkpoints" / "last.ckpt", "--pred_dir", tmp_path / "pred", "--num_workers", 0)
    predictions = sorted(os.listdir(tmp_path / "pred" / "c"))
    assert predictions == [f"t{t:04d}_256.tif" for t in range(7)]  # the importer numbers from 0
    assert tifffile.imread(tmp_path / "pred" / "c" / predictions[0]).shape == (256, 256)
    stdout = run("eval.py", "--pred_dir", tmp_path / "pred", "--root_dir", root)
    mean = float(evaluate(str(tmp_path / "pred"), root, ["c"])["score"].mean())
    printed = re.search(r"Mean Instance Dice: ([0-9.]+)", stdout)
    assert printed and float(printed.group(1)) == pytest.approx(mean, abs=1e-6)
