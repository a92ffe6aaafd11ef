"""train (1 epoch) -> inference -> eval on the real trpL sample, cropped around the colony, in the challenge layout.

uint16 frames of 218 x 282 px: neither square nor multiples of 8, as real data is.
"""
import os

import numpy as np
import pytest
import tifffile

from conftest import SHARED_REAL
from test_pipeline import run

TRPL = os.path.join(SHARED_REAL, "trpL")
pytestmark = pytest.mark.skipif(not os.path.isdir(TRPL), reason=f"real sample not present at {TRPL} (../shared/real)")
CROP = (218, 282)


def write_crops(root):
    images = tifffile.imread(os.path.join(TRPL, "trpL_150310-11_img.tif"))
    masks = tifffile.imread(os.path.join(TRPL, "trpL_150310-11_mask.tif"))
    sequences = {"a": range(0, 7), "b": range(7, 13), "c": range(13, 20)}
    for seq, frames in sequences.items():
        os.makedirs(os.path.join(root, seq)), os.makedirs(os.path.join(root, f"{seq}_GT"))
        for t in frames:
            rows, cols = np.nonzero(masks[t])
            top = int(np.clip((rows.min() + rows.max()) // 2 - CROP[0] // 2, 0, masks.shape[1] - CROP[0]))
            left = int(np.clip((cols.min() + cols.max()) // 2 - CROP[1] // 2, 0, masks.shape[2] - CROP[1]))
            window = np.s_[top: top + CROP[0], left: left + CROP[1]]
            tifffile.imwrite(os.path.join(root, seq, f"t{t:04d}.tif"), images[t][window])
            tifffile.imwrite(os.path.join(root, f"{seq}_GT", f"man_seg{t:04d}.tif"), masks[t][window])
    return str(root)


def test_real_sample_end_to_end(tmp_path):
    root = write_crops(tmp_path / "trpL")
    assert tifffile.imread(os.path.join(root, "c", "t0019.tif")).dtype == np.uint16
    run("train.py", "--root_dir", root, "--num_epochs", 1, "--batch_size", 4, "--input_size", 128,
        "--num_workers", 0, "--out_dir", tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    run("inference.py", "--root_dir", root, "--split", "val", "--from_checkpoint",
        tmp_path / "run" / "checkpoints" / "last.ckpt", "--pred_dir", tmp_path / "pred", "--num_workers", 0)
    predictions = sorted(os.listdir(tmp_path / "pred" / "c"))
    assert predictions == [f"t{t:04d}_256.tif" for t in range(13, 20)]
    assert tifffile.imread(tmp_path / "pred" / "c" / predictions[0]).shape == (256, 256)
    stdout = run("eval.py", "--pred_dir", tmp_path / "pred", "--gt_dir", root)
    assert "Mean Instance Dice: " in stdout
