"""Nothing lost in a run folder or a prediction folder (issue 41's train.py and inference.py cases): a moved run
resumes into itself, one writer per folder, broken resume state named, numeric flags refused with a usage line,
masks without cells or as bool, re-predicting the same frames."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

from conftest import ROOT, write_dataset
from unet import UNet, load_checkpoint, load_model

TINY = ["--config", "recipes/faithful.yaml", "--num_epochs", "1", "--set", "input_size=32", "--batch_size", "2",
        "--num_workers", "0"]


def run(script, *args):
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def one_error_line(result, pattern):
    import re
    assert result.returncode != 0, result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and re.fullmatch(pattern, last), result.stderr[-2000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("runs") / "data", sequences=("a", "b", "c"), unlabelled=("d",),
                         frames=3)


@pytest.fixture
def restore_sigterm():
    import signal
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.mark.slow
def test_a_moved_run_folder_resumes_into_itself(data, tmp_path, restore_sigterm):
    """F2: the checkpoints name their files relative to the run folder."""
    import train
    original, moved = tmp_path / "original", tmp_path / "moved"
    train.main(["--root_dir", data, "--out_dir", str(original), *TINY])
    shutil.copytree(original, moved)
    shutil.rmtree(original)
    # with epochs left: the new best goes to the moved folder's best.ckpt, never a best-v1.ckpt or the original
    train.main(["--root_dir", data, "--out_dir", str(moved), "--resume", *TINY[:2], "--num_epochs", "2",
                *TINY[4:], "--export_to", str(tmp_path / "model.pt")])
    assert not original.exists()
    assert sorted(os.listdir(moved / "checkpoints")) == ["best.ckpt", "last.ckpt"]
    state = next(v for k, v in load_checkpoint(str(moved / "checkpoints" / "last.ckpt"))["callbacks"].items()
                 if "val_instance_dice" in k)
    assert state["best_model_path"] == "best.ckpt" and state["dirpath"] == "."
    exported, best = load_model(str(tmp_path / "model.pt")), load_model(str(moved / "checkpoints" / "best.ckpt"))
    assert all(torch.allclose(a, b, atol=1e-2) for a, b in zip(exported.state_dict().values(),
                                                                best.state_dict().values()))


def test_a_second_writer_is_refused_with_its_holder(data, tmp_path, restore_sigterm):
    """F5, F6: an fcntl lock on the run and prediction folders; the second run names the holder."""
    from folder_lock import lock_folder
    import inference
    import train
    with lock_folder(str(tmp_path / "run"), "train.py"):
        with pytest.raises(SystemExit) as raised:
            train.main(["--root_dir", data, "--out_dir", str(tmp_path / "run"), *TINY])
        assert f"{tmp_path / 'run'}: in use by train.py (pid {os.getpid()}" in str(raised.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
    torch.save({"hyper_parameters": dict(UNet(input_size=32).hparams), "state_dict": UNet().state_dict()},
               tmp_path / "model.ckpt")
    with lock_folder(str(tmp_path / "pred"), "inference.py"):
        with pytest.raises(SystemExit) as raised:
            inference.main(["--root_dir", data, "--seqs", "c", "--model", str(tmp_path / "model.ckpt"),
                            "--pred_dir", str(tmp_path / "pred"), "--num_workers", "0", "--postprocess_workers", "0"])
        assert "in use by inference.py" in str(raised.value)
    assert not (tmp_path / "pred" / "c").exists()


def test_broken_resume_state_is_named(data, tmp_path, restore_sigterm):
    """F16: Lightning's keys with wrong contents, a corrupt metrics.csv: one line naming the file."""
    import train
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    model = UNet(input_size=32)
    torch.save({"global_step": 3, "loops": {}, "hyper_parameters": dict(model.hparams),
                "state_dict": model.state_dict()}, folder / "last.ckpt")
    (tmp_path / "run" / "metrics.csv").write_text("epoch,step,train_loss\n0,1,0.5\n")
    with pytest.raises(SystemExit) as raised:
        train.main(["--root_dir", data, "--out_dir", str(tmp_path / "run"), "--resume", *TINY])
    assert str(raised.value) == f"error: {folder / 'last.ckpt'}: not a checkpoint of this project (no record of the " \
                                f"epochs it holds (loops.fit_loop))"
    loops = {"fit_loop": {"epoch_progress": {"current": {"processed": 1}}}}
    torch.save({"global_step": 3, "loops": loops, "hyper_parameters": dict(model.hparams),
                "state_dict": model.state_dict()}, folder / "last.ckpt")
    (tmp_path / "run" / "metrics.csv").write_bytes(b"epoch,step,train_loss\n0,one,\x00\x01\n")
    with pytest.raises(SystemExit) as raised:
        train.main(["--root_dir", data, "--out_dir", str(tmp_path / "run"), "--resume", *TINY])
    assert str(raised.value).startswith(f"error: {tmp_path / 'run' / 'metrics.csv'}: not a metrics log of train.py")


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "argument --batch_size: expected an integer of at least 1, got '0'"),
    (["--num_workers", "-1"], "argument --num_workers: expected"),
    (["--max_time", "abc"], "argument --max_time: DD:HH:MM:SS expected"),
    (["--num_epochs", "x"], "--num_epochs"),
])
def test_train_numeric_flags_get_a_usage_line(data, tmp_path, flags, message, capsys):
    """F17: refused by argparse before anything is read or written."""
    import train
    with pytest.raises(SystemExit) as raised:
        train.main(["--root_dir", data, "--out_dir", str(tmp_path / "run"), *flags])
    assert raised.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_recipe_values_are_checked_before_anything_is_written(data, tmp_path):
    import train
    for setting, named in (("lr=-1", "lr: -1"), ("patch_size=100", "patch_size: 100"), ("view=whole", "view")):
        with pytest.raises(SystemExit) as raised:
            train.main(["--root_dir", data, "--out_dir", str(tmp_path / "run"), "--set", setting])
        assert str(raised.value).startswith("error: ") and named in str(raised.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--cell_width", "-5"], "--cell_width"), (["--cell_width", "0"], "--cell_width"),
    (["--cell_width", "nan"], "--cell_width"), (["--num_workers", "-1"], "--num_workers"),
    (["--postprocess_workers", "-1"], "--postprocess_workers"), (["--batch_size", "0"], "--batch_size"),
])
def test_inference_numeric_flags_get_a_usage_line(data, tmp_path, flags, message, capsys):
    """F14 (inference.py): refused by argparse, nothing written."""
    import inference
    with pytest.raises(SystemExit) as raised:
        inference.main(["--root_dir", data, "--seqs", "c", "--pred_dir", str(tmp_path / "pred"), *flags])
    assert raised.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "pred").exists()


def test_inference_on_a_root_without_the_default_sequences_names_what_it_found(tmp_path):
    root = write_dataset(tmp_path / "data", sequences=("x",), unlabelled=("y",), frames=1)
    import inference
    with pytest.raises(SystemExit) as raised:
        inference.main(["--root_dir", root, "--pred_dir", str(tmp_path / "pred")])
    assert str(raised.value) == f"error: {root}: no sequence d, e (the test split's default); it holds x, y: " \
                                f"choose with --seqs, e.g. --seqs x,y"
    with pytest.raises(SystemExit) as raised:
        inference.main(["--root_dir", root, "--seqs", "x", "--model", str(tmp_path / "no.ckpt")])
    assert "checkpoint not found (without --model the bundled model" in str(raised.value)


def test_training_masks_without_cells_are_refused_and_bool_masks_train(tmp_path, restore_sigterm):
    """F7: no cell in the training masks: one line, nothing written. F8: bool masks are one cell each."""
    import train
    root = write_dataset(tmp_path / "data", sequences=("a", "c"), unlabelled=(), frames=2)
    for t in range(2):
        path = os.path.join(root, "a_GT", f"man_seg{t:04d}.tif")
        tifffile.imwrite(path, np.zeros_like(tifffile.imread(path)))
    with pytest.raises(SystemExit) as raised:
        train.main(["--root_dir", root, "--train_seqs", "a", "--val_seqs", "c", "--out_dir", str(tmp_path / "run")])
    assert str(raised.value) == f"error: {os.path.join(root, 'a_GT', 'man_seg0000.tif')}: the training masks hold no cell"
    assert not (tmp_path / "run").exists()
    from scale import median_cell_width
    rod = np.zeros((20, 40), bool)
    rod[5:14, 5:35] = True
    assert median_cell_width([rod]) == 9.0


@pytest.mark.slow
def test_repredicting_the_same_frames_without_native_after_a_native_run(data, tmp_path):
    """F24: the frames' own-size maps of an earlier --native run of the same frames are not 'another run's'; they
    are removed, since they would no longer match the new predictions."""
    torch.save({"hyper_parameters": dict(UNet(input_size=32).hparams), "state_dict": UNet().state_dict()},
               tmp_path / "model.ckpt")
    common = ["inference.py", "--root_dir", data, "--seqs", "c", "--model", tmp_path / "model.ckpt",
              "--pred_dir", tmp_path / "pred", "--num_workers", 0, "--postprocess_workers", 0]
    assert run(*common, "--native").returncode == 0
    assert sorted(os.listdir(tmp_path / "pred" / "c")) == [f"mask{t:04d}.tif" for t in range(3)] + \
        [f"t{t:04d}_256.tif" for t in range(3)]
    again = run(*common)
    assert again.returncode == 0, again.stderr
    assert sorted(name for name in os.listdir(tmp_path / "pred" / "c") if name.endswith(".tif")) == \
        [f"t{t:04d}_256.tif" for t in range(3)]


def test_an_old_flag_spelling_still_works_and_says_so(data, tmp_path, capsys):
    import inference
    with pytest.raises(SystemExit) as raised:
        inference.main(["--root_dir", data, "--seqs", "c", "--from_checkpoint", str(tmp_path / "missing.ckpt")])
    assert "note: --from_checkpoint is deprecated, use --model" in capsys.readouterr().err
    assert str(raised.value).startswith(f"error: {tmp_path / 'missing.ckpt'}: checkpoint not found")


def test_a_checkpoint_with_a_nan_cell_width_is_refused(tmp_path):
    """F7's second half: such checkpoints came from training on masks without cells."""
    from unet import CheckpointError
    torch.save({"hyper_parameters": {"view": "tiled", "cell_width": float("nan")}, "state_dict": UNet().state_dict()},
               tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=r"nan\.ckpt: not a checkpoint of this project \(cell_width is not a "):
        load_model(str(tmp_path / "nan.ckpt"))
