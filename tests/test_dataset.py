"""Finding, pairing and reading frames; clear errors for bad input; transforms; the cached datasets."""
import os

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from conftest import write_dataset
from border_core import border_core_targets, resize_nearest, resize_nearest_exact
from data_files import DataError, default_sequences, detect_layout, list_frames, to_uint8_range
from dataset import ResizedFrames, random_brightness_contrast, random_horizontal_flip
from views import Resized


def test_detects_both_layouts_and_their_default_sequences(tmp_path):
    challenge = write_dataset(tmp_path / "challenge", frames=2)
    ctc = write_dataset(tmp_path / "ctc", sequences=("01", "02", "03"), unlabelled=("04",), frames=2, layout="ctc")
    assert detect_layout(challenge) == "challenge" and detect_layout(ctc) == "ctc"
    assert [default_sequences(challenge, role) for role in ("train", "val")] == [["a", "b"], ["c"]]
    assert [default_sequences(ctc, role) for role in ("train", "val")] == [["01", "02"], ["03"]]
    assert default_sequences(challenge, "test") == ["d", "e"] and default_sequences(ctc, "test") == ["04", "05"]
    frames = list_frames(ctc, "03", with_masks=True)
    assert [f.mask_path for f in frames] == [os.path.join(ctc, "03_GT", "SEG", f"man_seg000{i}.tif") for i in (0, 1)]


def test_pairs_by_frame_number_not_by_sorted_order(tmp_path):
    root = write_dataset(tmp_path / "d", sequences=("a",), unlabelled=(), frames=3)
    # a gap in the numbering and mixed digit widths: sorted globs would pair t0010 with man_seg0002
    os.rename(os.path.join(root, "a", "t0002.tif"), os.path.join(root, "a", "t0010.tif"))
    os.rename(os.path.join(root, "a_GT", "man_seg0002.tif"), os.path.join(root, "a_GT", "man_seg010.tif"))
    frames = list_frames(root, "a", with_masks=True)
    assert [(f.number, os.path.basename(f.mask_path)) for f in frames] == [
        (0, "man_seg0000.tif"), (1, "man_seg0001.tif"), (10, "man_seg010.tif")]
    assert frames[2].name == "t0010"


def test_missing_mask_is_named(tmp_path):
    root = write_dataset(tmp_path / "d", sequences=("a",), unlabelled=(), frames=3)
    os.remove(os.path.join(root, "a_GT", "man_seg0001.tif"))
    with pytest.raises(DataError, match=r"a_GT/man_seg0001\.tif: missing mask for image .*a/t0001\.tif"):
        list_frames(root, "a", with_masks=True)


def test_mask_without_image_and_missing_sequence(tmp_path):
    root = write_dataset(tmp_path / "d", sequences=("a",), unlabelled=(), frames=2)
    os.remove(os.path.join(root, "a", "t0001.tif"))
    with pytest.raises(DataError, match=r"man_seg0001\.tif: mask without an image"):
        list_frames(root, "a", with_masks=True)
    with pytest.raises(DataError, match=r"sequence 'z' not found"):
        list_frames(root, "z", with_masks=False)


def test_empty_sequence(tmp_path):
    os.makedirs(tmp_path / "a")
    with pytest.raises(DataError, match=r"/a: empty sequence"):
        list_frames(str(tmp_path), "a", with_masks=False)


def test_unreadable_tiff_is_named(tmp_path):
    root = write_dataset(tmp_path / "d", sequences=("a",), unlabelled=(), frames=2)
    broken = os.path.join(root, "a", "t0001.tif")
    with open(broken, "wb") as file:
        file.write(b"this is not a TIFF")
    with pytest.raises(DataError, match=r"a/t0001\.tif: unreadable TIFF"):
        ResizedFrames(list_frames(root, "a", with_masks=True), Resized(32), "baseline")


def test_size_mismatch_is_named(tmp_path):
    root = write_dataset(tmp_path / "d", sequences=("a",), unlabelled=(), frames=2, shape=(40, 50))
    tifffile.imwrite(os.path.join(root, "a_GT", "man_seg0001.tif"), np.zeros((40, 51), np.uint16))
    with pytest.raises(DataError, match=r"man_seg0001\.tif: mask size \(40, 51\) differs from image size \(40, 50\)"):
        ResizedFrames(list_frames(root, "a", with_masks=True), Resized(32), "baseline")


def test_float_mask_is_refused(tmp_path):
    root = write_dataset(tmp_path / "d", sequences=("a",), unlabelled=(), frames=2)
    tifffile.imwrite(os.path.join(root, "a_GT", "man_seg0000.tif"), np.zeros((60, 76), np.float32))
    with pytest.raises(DataError, match=r"man_seg0000\.tif: instance labels must be integers, got dtype float32"):
        ResizedFrames(list_frames(root, "a", with_masks=True), Resized(32), "baseline")


def test_multichannel_frame_is_refused(tmp_path):
    path = str(tmp_path / "t0000.tif")
    tifffile.imwrite(path, np.zeros((3, 20, 20), np.uint8), photometric="minisblack")
    from data_files import read_tiff_2d
    with pytest.raises(DataError, match=r"t0000\.tif: expected one 2-D single-channel frame, got .*\(3, 20, 20\)"):
        read_tiff_2d(path)


def test_intensity_rule():
    image = np.array([[0, 17], [128, 255]], np.uint8)
    np.testing.assert_array_equal(to_uint8_range(image), image.astype(np.float32))  # uint8 exactly as the baseline
    ramp = np.linspace(1000, 5000, 10001).astype(np.uint16).reshape(73, 137)
    scaled = to_uint8_range(ramp)
    assert scaled.dtype == np.float32 and scaled.min() == 0 and scaled.max() == 255
    assert abs(scaled[36, 68] - 127.5) < 0.5  # the median lands in the middle
    assert (to_uint8_range(np.full((4, 4), 7.5, np.float64)) == 0).all()


def test_resize_nearest_equals_torch_nearest():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 1000, (37, 53)).astype(np.int64)
    for size in [(16, 16), (64, 128), (37, 53), (100, 21)]:
        expected = F.interpolate(torch.from_numpy(array)[None, None].double(), size=size, mode="nearest")[0, 0]
        np.testing.assert_array_equal(resize_nearest(array, size), expected.numpy().astype(np.int64))


def test_resize_nearest_exact_equals_torch_nearest_exact():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 1000, (37, 53)).astype(np.int64)
    for size in [(16, 16), (64, 128), (37, 53), (100, 21), (33, 47)]:
        expected = F.interpolate(torch.from_numpy(array)[None, None].double(), size=size, mode="nearest-exact")[0, 0]
        np.testing.assert_array_equal(resize_nearest_exact(array, size), expected.numpy().astype(np.int64))


def test_flip_moves_image_and_target_together_and_brightness_stays_in_range():
    image = torch.arange(12.0).reshape(1, 3, 4)
    target = torch.arange(12).reshape(3, 4)
    flipped_image, flipped_target = random_horizontal_flip(image, target, p=1.0)
    assert torch.equal(flipped_image[0, :, 0], image[0, :, 3]) and torch.equal(flipped_target[:, 0], target[:, 3])
    torch.manual_seed(0)
    changed = [random_brightness_contrast(torch.full((1, 2, 2), 250.0), p=1.0) for _ in range(50)]
    assert all(0 <= c.min() and c.max() <= 255 for c in changed) and len({c[0, 0, 0].item() for c in changed}) > 10


def test_labelled_frames_items(tmp_path):
    root = write_dataset(tmp_path / "d", sequences=("a",), unlabelled=(), frames=2, shape=(60, 76))
    frames = list_frames(root, "a", with_masks=True)
    dataset = ResizedFrames(frames, Resized(64), "baseline")
    item = dataset[1]
    image, target, instances = item["image"], item["target"], item["instances"]
    assert item["shape"].tolist() == [60, 76]
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32
    assert target.shape == (64, 64) and target.dtype == torch.int64
    assert instances.shape == (256, 256)
    raw = tifffile.imread(frames[1].image_path)
    mask = tifffile.imread(frames[1].mask_path)
    np.testing.assert_allclose(image[0].numpy(), (resize_nearest(raw, (64, 64)) / 255 - 0.5) / 0.25, atol=1e-6)
    np.testing.assert_array_equal(target.numpy(), resize_nearest(border_core_targets(mask), (64, 64)))
    np.testing.assert_array_equal(instances.numpy(), resize_nearest(mask, (256, 256)))


def test_the_file_scripts_start_without_torch():
    # eval.py, track.py, pictures.py, import_sequence.py and simulate.py only read and write files: importing torch
    # and Lightning (7-10 s on a small machine) would be most of their run on a few frames
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys; import eval, track, pictures, import_sequence, simulate; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
