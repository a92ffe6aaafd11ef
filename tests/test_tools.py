"""The importer and the pictures."""
import os

import numpy as np
import pytest
import tifffile

from conftest import write_dataset, blob_frame
from data_files import DataError, list_frames
from import_sequence import import_sequence
import pictures


def write_folder(folder, arrays, pattern):
    os.makedirs(folder)
    for number, array in arrays.items():
        tifffile.imwrite(os.path.join(folder, pattern.format(number)), array)


def test_import_folders_pairs_by_number_and_keeps_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    frames = {n: blob_frame(rng, (40, 50), 3) for n in (3, 10, 7)}
    write_folder(tmp_path / "img", {n: (f[0].astype(np.uint16) * 100) for n, f in frames.items()}, "frame_{}.tif")
    write_folder(tmp_path / "lab", {n: f[1].astype(np.int32) for n, f in frames.items()}, "labels{:03d}.tif")
    assert import_sequence(str(tmp_path / "img"), str(tmp_path / "data"), "x", str(tmp_path / "lab")) == 3
    written = list_frames(str(tmp_path / "data"), "x", with_masks=True)
    for frame, number in zip(written, (3, 7, 10)):  # ordered by the number in the name, renumbered from 0
        image, mask = tifffile.imread(frame.image_path), tifffile.imread(frame.mask_path)
        assert image.dtype == np.uint16 and mask.dtype == np.uint16
        np.testing.assert_array_equal(image, frames[number][0].astype(np.uint16) * 100)
        np.testing.assert_array_equal(mask, frames[number][1])
    assert [e for e in os.listdir(tmp_path / "data") if e.startswith(".")] == []  # no staging folder left


def test_import_refuses_bad_input_and_writes_nothing(tmp_path):
    stack = np.zeros((4, 30, 30), np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "float.tif", stack.astype(np.float32), photometric="minisblack")
    tifffile.imwrite(tmp_path / "short.tif", stack[:3].astype(np.uint16), photometric="minisblack")
    root = tmp_path / "data"
    with pytest.raises(DataError, match="instance labels must be integers"):
        import_sequence(str(tmp_path / "img.tif"), str(root), "a", str(tmp_path / "float.tif"))
    with pytest.raises(DataError, match=r"do not pair .* \[3\]"):
        import_sequence(str(tmp_path / "img.tif"), str(root), "a", str(tmp_path / "short.tif"))
    with pytest.raises(DataError, match="needs --masks"):
        import_sequence(str(tmp_path / "img.tif"), str(root), "a", crop=(10, 10))
    assert not os.path.exists(root / "a") and not os.path.exists(root / "a_GT")
    assert import_sequence(str(tmp_path / "img.tif"), str(root), "a", frames=slice(1, 3)) == 2
    assert sorted(os.listdir(root / "a")) == ["t0000.tif", "t0001.tif"] and not os.path.exists(root / "a_GT")


def test_overlay_draws_prediction_over_gt_outlines():
    image = np.full((64, 64), 100, np.uint8)
    gt = np.zeros((64, 64), np.uint16)
    gt[8:24, 8:24] = 1
    prediction = np.zeros((256, 256), np.uint16)
    prediction[32:96, 32:96] = 5  # the same square at 4x: outlines coincide
    prediction[160:200, 160:200] = 6  # a false positive: its outline only in the prediction colour
    rgb = pictures.overlay(image, prediction, gt)
    assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[32, 50]) == pictures.PRED_COLOUR and tuple(rgb[160, 170]) == pictures.PRED_COLOUR
    assert tuple(rgb[120, 120]) == (100, 100, 100)
    gt[2:6, 50:60] = 2  # a miss: its outline (rows 8..23, columns 200..239 at 4x) only in the GT colour
    with_miss = pictures.overlay(image, prediction, gt)
    assert tuple(with_miss[8, 210]) == pictures.GT_COLOUR and tuple(with_miss[32, 50]) == pictures.PRED_COLOUR
    assert tuple(pictures.overlay(image, np.zeros_like(prediction), gt)[32, 50]) == pictures.GT_COLOUR


def test_sample_and_curves_pictures(tmp_path):
    root = write_dataset(tmp_path / "data", sequences=("c",), unlabelled=(), frames=2)
    pictures.sample_pictures(root, "c", 1, str(tmp_path / "imgs"))
    import matplotlib.pyplot as plt
    img, mask = plt.imread(tmp_path / "imgs" / "img.png"), plt.imread(tmp_path / "imgs" / "mask.png")
    assert img.shape[:2] == mask.shape[:2] == (60, 76)
    labels = tifffile.imread(os.path.join(root, "c_GT", "man_seg0001.tif"))
    assert (mask[labels == 0][:, :3] == 0).all() and (mask[labels > 0][:, :3].sum(1) > 0).all()
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train_loss,val_instance_dice,val_iou,val_loss\n0,3,,0.2,0.5,0.9\n0,3,0.8,,,\n"
                       "1,7,,0.6,0.6,0.7\n1,7,0.6,,,\n")
    pictures.training_curves(str(metrics), str(tmp_path / "curves.png"))
    assert plt.imread(tmp_path / "curves.png").shape[0] > 100
