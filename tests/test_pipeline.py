"""The three scripts end to end on a tiny dataset written here: train 2 epochs (loss falls) -> inference -> eval."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import ROOT, write_dataset
from data_files import DataError, narrowest_unsigned, write_tiff_atomically
from border_core import resize_nearest
from eval import evaluate
from metrics import instance_dice, pooled_ap

pytestmark = [pytest.mark.slow]


def run(script, *args, with_stderr=False):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                            text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr if with_stderr else result.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    root = write_dataset(tmp / "data", sequences=("a", "b", "c"), unlabelled=("d", "e"), frames=6, shape=(90, 110))
    out = tmp / "run"
    run("train.py", "--config", "recipes/faithful.yaml", "--root_dir", root, "--num_epochs", 2, "--batch_size", 4, "--set", "input_size=64",
        "--num_workers", 0, "--out_dir", out)
    return root, out, tmp


def test_training_loss_falls_and_checkpoints_are_written(trained):
    _, out, _ = trained
    metrics = pd.read_csv(out / "metrics.csv")
    train_loss = metrics.dropna(subset=["train_loss"]).set_index("epoch")["train_loss"]
    assert list(train_loss.index) == [0, 1] and train_loss[1] < train_loss[0]
    val = metrics.dropna(subset=["val_instance_dice"])
    assert list(val["epoch"]) == [0, 1] and val["val_instance_dice"].between(0, 1).all()
    assert {"val_loss", "val_iou"} <= set(metrics.columns)
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "checkpoints" / "best.ckpt").is_file()


def test_inference_then_eval(trained):
    root, out, tmp = trained
    pred = tmp / "pred"
    inference_out = run("inference.py", "--root_dir", root, "--seqs", "c,d", "--model",
                        out / "checkpoints" / "best.ckpt", "--pred_dir", pred, "--num_workers", 0, "--batch_size", 4)
    for seq in ("c", "d"):
        files = sorted(os.listdir(pred / seq))
        assert files == [f"t{i:04d}_256.tif" for i in range(6)]
        for name in files:
            labels = tifffile.imread(pred / seq / name)
            assert labels.shape == (256, 256) and labels.dtype.kind == "u"
    stdout = run("eval.py", "--pred_dir", pred, "--root_dir", root)
    for output in (inference_out, stdout):  # energy or, where no counter is readable, plainly that it is not
        energy = [l for l in output.splitlines() if "energy: " in l]
        assert len(energy) == 1
        if not os.path.exists("/sys/class/powercap"):  # no GPU is used here, so only RAPL could count
            assert "energy: not measurable here;" in energy[0] and "frames in" in energy[0]
    line = [l for l in stdout.splitlines() if l.startswith("Mean Instance Dice: ")]
    table = pd.read_csv(pred / "instance_dice.csv")
    # each frame's scores are those of the written prediction against the ground truth at 256 x 256
    for t in range(6):
        gt = resize_nearest(tifffile.imread(os.path.join(root, "c_GT", f"man_seg{t:04d}.tif")), (256, 256))
        predicted = tifffile.imread(pred / "c" / f"t{t:04d}_256.tif")
        assert table["score"][t] == pytest.approx(instance_dice(gt.astype(np.int64), predicted.astype(np.int64)))
        assert table["ap50"][t] == pytest.approx(pooled_ap([(gt, predicted)]))
    assert list(table.columns) == ["sequence", "frame", "score", "gt_count", "pred_count", "matched",
                                   *[f"tp{t}" for t in range(50, 100, 5)], "precision50", "recall50", "f1_50",
                                   "ap50", "map"]
    assert len([l for l in stdout.splitlines() if l.startswith("sequence c: ") and "AP 0.5:0.95" in l]) == 1
    assert list(table["sequence"]) == ["c"] * 6 and list(table["frame"]) == list(range(6))  # d has no GT
    assert abs(table["score"].mean() - float(line[0].split(": ")[1])) < 1e-6


def test_resume_refuses_to_overwrite_and_continues(trained):
    root, out, _ = trained
    result = subprocess.run([sys.executable, "train.py", "--root_dir", root, "--out_dir", out], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "already holds a run" in result.stderr
    run("train.py", "--config", "recipes/faithful.yaml", "--root_dir", root, "--num_epochs", 3, "--batch_size", 4, "--set", "input_size=64",
        "--num_workers", 0, "--out_dir", out, "--resume")
    metrics = pd.read_csv(out / "metrics.csv")
    assert sorted(metrics.dropna(subset=["train_loss"])["epoch"]) == [0, 1, 2]  # old rows kept, one new epoch


def test_eval_scores_a_missing_prediction_zero_and_names_it(tmp_path):
    root = write_dataset(tmp_path / "data", sequences=("c",), unlabelled=(), frames=3)
    pred = tmp_path / "pred" / "c"
    pred.mkdir(parents=True)
    for t in (0, 2):  # a perfect prediction for frames 0 and 2, none for frame 1
        from border_core import resize_nearest
        gt = tifffile.imread(os.path.join(root, "c_GT", f"man_seg{t:04d}.tif"))
        tifffile.imwrite(pred / f"t{t:04d}_256.tif", resize_nearest(gt, (256, 256)))
    with pytest.warns(UserWarning, match=r"1 frame\(s\) without a prediction score 0: .*c/t0001_256\.tif"):
        table = evaluate(str(tmp_path / "pred"), root)
    assert list(table["score"]) == [1.0, 0.0, 1.0] and table["gt_count"].iloc[1] == 6


def test_label_dtype_is_wide_enough():
    assert narrowest_unsigned(np.array([0, 255])).dtype == np.uint8
    assert narrowest_unsigned(np.array([0, 256])).dtype == np.uint16
    assert narrowest_unsigned(np.array([70000])).dtype == np.uint32


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(path, array):
        with open(path, "wb") as file:
            file.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", broken)
    with pytest.raises(DataError, match=r"t0000_256\.tif: cannot write \(disk full\)"):
        write_tiff_atomically(str(tmp_path / "t0000_256.tif"), np.zeros((4, 4), np.uint8))
    assert os.listdir(tmp_path) == []


def test_pooled_postprocessing_equals_inline(trained):
    """The overlapped paths (process pool) write and yield exactly what the straightforward inline path does."""
    import multiprocessing

    import torch
    from torch.utils.data import DataLoader

    from border_core import instances_at_size
    from data_files import frame_shape, list_frames
    from dataset import UnlabelledFrames
    from inference import Postprocess, predict_instance_segmentation_from_border_core
    from unet import load_model

    root, out, tmp = trained
    checkpoint = out / "checkpoints" / "last.ckpt"
    for workers in (0, 2):
        run("inference.py", "--root_dir", root, "--seqs", "c", "--model", checkpoint, "--pred_dir",
            tmp / f"pred_{workers}", "--num_workers", 0, "--batch_size", 4, "--postprocess_workers", workers)
    for t in range(6):
        inline = tifffile.imread(tmp / "pred_0" / "c" / f"t{t:04d}_256.tif")
        pooled = tifffile.imread(tmp / "pred_2" / "c" / f"t{t:04d}_256.tif")
        np.testing.assert_array_equal(inline, pooled)

    model = load_model(checkpoint)
    frames = list_frames(root, "c", with_masks=False)
    loader = DataLoader(UnlabelledFrames(frames, model.view, model.hparams.intensity), batch_size=4)
    postprocess = Postprocess(model, [frame_shape(frame.image_path) for frame in frames])
    # float32: the direct forward pass below is compared pixel for pixel (bf16 would flip a few near-ties)
    serial = list(predict_instance_segmentation_from_border_core(model, loader, "cpu", postprocess, precision="fp32"))
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pooled = list(predict_instance_segmentation_from_border_core(model, loader, "cpu", postprocess, pool=pool,
                                                                     precision="fp32"))
    assert [i for i, _ in serial] == [i for i, _ in pooled] == list(range(6))
    for (_, a), (_, b) in zip(serial, pooled):
        np.testing.assert_array_equal(a, b)
    with torch.inference_mode():
        first = model(next(iter(loader))[0]).argmax(1)[0].numpy()
    np.testing.assert_array_equal(serial[0][1], instances_at_size(first))
