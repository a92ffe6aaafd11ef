"""Bad input and faults, as a new user meets them (issue 9; docs/bad_input.md lists what the user gets). Each case is
run through the script's main (fast: the exit message, what is (not) left on disk) and, marked slow, once as a user
runs it, as a subprocess: exit status 1 and one `error: <path>: <problem>` line, no traceback."""
import errno
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from border_core import resize_nearest
from conftest import ROOT, write_dataset
from data_files import error_line, list_frames, read_mask
from dataset import ResizedFrames
from views import Resized
from unet import UNet, load_checkpoint, load_model

TINY = ("--config", "recipes/faithful.yaml", "--num_epochs", 1, "--set", "input_size=32", "--batch_size", 2, "--num_workers", 0)


def run(script, *args, umask=-1, env=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, umask=umask, env=env)


def assert_ok(result):
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


def assert_one_error_line(result, pattern: str):
    """Exit status 1, no traceback, and the last line of stderr (Lightning logs a line or two before it) is the only
    `error:` line and matches the pattern in full."""
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr
    assert re.fullmatch(pattern, lines[-1]), lines[-1]


def exit_message(main, argv) -> str:
    """What a script's main exits with (sys.exit(message) prints it to stderr and exits 1)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert isinstance(exit_info.value.code, str), exit_info.value.code
    return exit_info.value.code


def tree(folder) -> dict:
    """Every file under a folder (hidden ones too, but the writer's lock file, folder_lock.py) with its bytes."""
    files = {}
    for base, _, names in os.walk(folder):
        for name in names:
            if name == ".lock" and base == str(folder):
                continue
            path = os.path.join(base, name)
            with open(path, "rb") as file:
                files[os.path.relpath(path, folder)] = file.read()
    return files


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("bad") / "data", sequences=("a", "b", "c"), unlabelled=("d",),
                         frames=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint as train.py writes it (the keys every script reads), made without training: a model at
    input_size 32 with random weights."""
    torch.manual_seed(0)
    model = UNet(input_size=32)
    path = tmp_path_factory.mktemp("checkpoint") / "model.ckpt"
    torch.save({"epoch": 0, "global_step": 4, "loops": {}, "hyper_parameters": dict(model.hparams),
                "state_dict": model.state_dict()}, path)
    return path


class RunsCommand:
    """Unpickling this calls os.system(command): what a planted checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def planted(tmp_path):
    """(write(path): plant a checkpoint whose unpickling touches the marker, marker path). The planted file is checked
    to really run code when unpickled the unsafe way, so that the tests below can fail."""
    marker = tmp_path / "code_ran"

    def write(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"global_step": 10 ** 9, "loops": {}, "hyper_parameters": {},
                    "state_dict": RunsCommand(f"touch {marker}")}, path)
        return path

    probe = write(tmp_path / "probe.ckpt")
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()
    os.unlink(probe)
    return write, marker


@pytest.fixture
def restore_sigterm():
    """train.main installs its SIGTERM handler in the process that calls it: give pytest its own back."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


# ------------------------------------------------------------------ 1. code execution from a checkpoint: never

def refused(path) -> str:
    return rf"error: {re.escape(str(path))}: not a checkpoint of this project \(it holds a Python object, " \
           r"posix\.system, that loading would have to run; refused\)"


def test_planted_checkpoint_in_a_run_folder_never_runs(data, planted, tmp_path, checkpoint, restore_sigterm):
    import train

    write, marker = planted
    run_dir = tmp_path / "run"
    last = write(run_dir / "checkpoints" / "last.ckpt")
    for resume in ([], ["--resume"]):
        message = exit_message(train.main, ["--root_dir", data, "--out_dir", run_dir, *TINY, *resume])
        assert re.fullmatch(refused(last), message), message
    # a sound last.ckpt and a planted requeue.ckpt: both are read to find the newer
    last.write_bytes(checkpoint.read_bytes())
    requeue = write(run_dir / "checkpoints" / "requeue.ckpt")
    message = exit_message(train.main, ["--root_dir", data, "--out_dir", run_dir, *TINY, "--resume"])
    assert re.fullmatch(refused(requeue), message), message
    assert not marker.exists()
    assert sorted(os.listdir(run_dir)) == ["checkpoints"]  # nothing written


@pytest.mark.slow
def test_planted_checkpoint_in_a_run_folder_as_a_user_meets_it(data, planted, tmp_path):
    write, marker = planted
    last = write(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert_one_error_line(run("train.py", "--root_dir", data, "--out_dir", tmp_path / "run", *TINY), refused(last))
    assert not marker.exists()


@pytest.mark.slow
def test_planted_checkpoint_never_runs_in_inference(data, planted, tmp_path):
    write, marker = planted
    path = write(tmp_path / "model.ckpt")
    result = run("inference.py", "--root_dir", data, "--model", path, "--pred_dir", tmp_path / "pred")
    assert_one_error_line(result, refused(path))
    assert not marker.exists() and not (tmp_path / "pred").exists()


def test_planted_hpc_checkpoint_never_runs_under_slurm(data, planted, tmp_path, monkeypatch, restore_sigterm):
    """Under SLURM Lightning resumes by itself from hpc_ckpt_<n>.ckpt in the run folder; train.py checks those too."""
    import train

    write, marker = planted
    path = write(tmp_path / "run" / "hpc_ckpt_1.ckpt")
    for name, value in dict(SLURM_NTASKS="1", SLURM_JOB_NAME="train", SLURM_JOB_ID="7", SLURM_PROCID="0",
                            SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NNODES="1").items():
        monkeypatch.setenv(name, value)
    message = exit_message(train.main, ["--root_dir", data, "--out_dir", tmp_path / "run", *TINY])
    assert re.fullmatch(refused(path), message), message
    assert not marker.exists()


@pytest.mark.slow
def test_lightning_reads_the_resumed_checkpoint_weights_only(data, planted, tmp_path, monkeypatch, restore_sigterm):
    """Lightning's trainer.fit(ckpt_path=...) reads the checkpoint once more. Were the file swapped for a planted one
    after train.py checked it, that read refuses it too: train.py passes weights_only=True, which holds even where
    the environment turns torch's default off (as here: without the explicit flag the code would run)."""
    import train

    write, marker = planted
    write(tmp_path / "run" / "checkpoints" / "last.ckpt")
    monkeypatch.setattr(train, "checkpoint_to_resume",
                        lambda out_dir, resume: str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(Exception, match="Weights only load failed") as raised:
        train.main(["--root_dir", data, "--out_dir", str(tmp_path / "run"), "--resume", *map(str, TINY)])
    assert any("checkpoint_connector" in str(entry.path) for entry in raised.traceback)  # Lightning's own read
    assert not marker.exists()


# ------------------------------------------------------------------ 2. broken checkpoints: one line naming the file

def broken_checkpoints(folder, checkpoint, data):
    """name -> (path, reason pattern) of files that are not checkpoints of ours."""
    sound = checkpoint.read_bytes()
    files = {"truncated": (sound[: len(sound) // 2], r"truncated or corrupt archive"),
             "text": (b"epoch: 3\nloss: 0.1\n", r"not a PyTorch zip archive: a text file"),
             "tiff": (open(os.path.join(data, "a", "t0000.tif"), "rb").read(), r"not a PyTorch zip archive: a TIFF image"),
             "empty": (b"", r"empty file")}
    paths = {}
    for name, (content, reason) in files.items():
        paths[name] = (folder / f"{name}.ckpt", reason)
        paths[name][0].write_bytes(content)
    torch.save({"model": torch.zeros(3)}, folder / "dict.ckpt")
    paths["dict"] = (folder / "dict.ckpt", r"no (global_step, loops, )?hyper_parameters, state_dict")
    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"].pop("head.bias")
    torch.save(state, folder / "other_model.ckpt")
    paths["other_model"] = (folder / "other_model.ckpt", r'weights do not fit the U-Net: Missing key\(s\) in state_dict: "head\.bias"\.')
    return paths


def test_broken_checkpoints_give_one_line_naming_the_file(data, checkpoint, tmp_path):
    import inference

    for name, (path, reason) in broken_checkpoints(tmp_path, checkpoint, data).items():
        message = exit_message(inference.main, ["--root_dir", data, "--model", path,
                                                "--pred_dir", tmp_path / "pred", "--postprocess_workers", 0])
        assert re.fullmatch(rf"error: {re.escape(str(path))}: not a checkpoint of this project \({reason}\)",
                            message), (name, message)
    assert not (tmp_path / "pred").exists()


@pytest.mark.slow
def test_broken_checkpoint_as_a_user_meets_it(data, checkpoint, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:100000])
    assert_one_error_line(run("inference.py", "--root_dir", data, "--model", truncated, "--pred_dir",
                              tmp_path / "pred"),
                          rf"error: {re.escape(str(truncated))}: not a checkpoint of this project "
                          r"\(truncated or corrupt archive\)")


@pytest.mark.parametrize("size", [5000, 100000])
def test_broken_checkpoint_in_a_run_folder(data, checkpoint, tmp_path, size, restore_sigterm):
    import train

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(checkpoint.read_bytes()[:size])
    message = exit_message(train.main, ["--root_dir", data, "--out_dir", tmp_path / "run", "--resume", *TINY])
    assert message == f"error: {last}: not a checkpoint of this project (truncated or corrupt archive)"


def test_a_sound_checkpoint_loads_as_the_model_it_holds(checkpoint):
    model = load_model(checkpoint)
    state = load_checkpoint(checkpoint)["state_dict"]
    assert model.hparams.input_size == 32
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


# ------------------------------------------------------------------ 3. labels above 2**31 - 1 (uint32)

def write_wide_label_dataset(root):
    """The tiny dataset with every mask stored as uint32 and its labels moved above 2**31 - 1."""
    write_dataset(root, sequences=("a", "b", "c"), unlabelled=(), frames=4)
    for seq in ("a", "b", "c"):
        for t in range(4):
            path = os.path.join(root, f"{seq}_GT", f"man_seg{t:04d}.tif")
            labels = tifffile.imread(path).astype(np.uint32)
            tifffile.imwrite(path, np.where(labels > 0, labels + np.uint32(2 ** 31 + 100), 0).astype(np.uint32))
    return str(root)


def test_wide_labels_are_kept_as_instances(tmp_path):
    root = write_wide_label_dataset(tmp_path / "data")
    frames = list_frames(root, "c", with_masks=True)
    dataset = ResizedFrames(frames, Resized(32), "baseline")
    for i, frame in enumerate(frames):
        mask = read_mask(frame.mask_path)
        assert mask.dtype == np.uint32 and mask.max() > 2 ** 31
        np.testing.assert_array_equal(dataset.instances[i], resize_nearest(mask.astype(np.int64), (256, 256)))
        assert dataset[i]["instances"].min() >= 0


def test_wide_labels_in_eval_and_pictures(tmp_path):
    root = write_wide_label_dataset(tmp_path / "data")
    pred = tmp_path / "pred" / "c"
    pred.mkdir(parents=True)
    for t in range(4):  # a perfect prediction, stored in the same wide dtype
        gt = tifffile.imread(os.path.join(root, "c_GT", f"man_seg{t:04d}.tif"))
        tifffile.imwrite(pred / f"t{t:04d}_256.tif", resize_nearest(gt, (256, 256)))
    import eval as evaluation
    import pictures

    assert evaluation.main(["--pred_dir", str(tmp_path / "pred"), "--root_dir", root]) == 1.0
    assert list(pd.read_csv(tmp_path / "pred" / "instance_dice.csv")["gt_count"]) == [6, 6, 6, 6]
    pictures.main(["overlay", "--root_dir", root, "--pred_dir", str(tmp_path / "pred"), "--seqs", "c",
                   "--frames", "0,3", "--out_dir", str(tmp_path / "pictures")])
    assert sorted(os.listdir(tmp_path / "pictures")) == ["overlay_c_t0000.png", "overlay_c_t0003.png"]


@pytest.mark.slow
def test_wide_labels_train(tmp_path):
    root = write_wide_label_dataset(tmp_path / "data")
    assert_ok(run("train.py", "--root_dir", root, "--out_dir", tmp_path / "run", *TINY))
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv").dropna(subset=["val_instance_dice"])
    assert len(metrics) == 1 and metrics["val_instance_dice"].between(0, 1).all()
    assert metrics["val_frames"].iloc[0] == 4


# ------------------------------------------------------------------ 4. disk full while writing predictions

DISK_FULL = """
import errno, runpy, sys, tifffile
def disk_full(path, *args, **kwargs):
    with open(path, "wb") as file:
        file.write(b"half a TIFF")
    raise OSError(errno.ENOSPC, "No space left on device")
tifffile.imwrite = disk_full
sys.argv = sys.argv[:]
runpy.run_path("inference.py", run_name="__main__")
"""


def disk_full(path, *args, **kwargs):
    with open(path, "wb") as file:
        file.write(b"half a TIFF")
    raise OSError(errno.ENOSPC, "No space left on device")


def disk_full_line(pred_dir) -> str:
    return rf"error: {re.escape(str(pred_dir / 'c'))}/t000\d_256\.tif: cannot write \(disk full\)"


@pytest.mark.parametrize("postprocess_workers", [0, 2])
def test_disk_full_while_writing_predictions(data, checkpoint, tmp_path, monkeypatch, postprocess_workers):
    """Every tifffile.imwrite fails as on a full disk (in the pool's processes too: forked, they inherit the patch)."""
    import inference

    monkeypatch.setattr(tifffile, "imwrite", disk_full)
    message = exit_message(inference.main, ["--root_dir", data, "--seqs", "c", "--model", checkpoint,
                                            "--pred_dir", tmp_path / "pred", "--num_workers", 0,
                                            "--postprocess_workers", postprocess_workers])
    assert re.fullmatch(disk_full_line(tmp_path / "pred"), message), message
    assert tree(tmp_path / "pred") == {}  # no file, not even a temporary one


@pytest.mark.slow
def test_disk_full_as_a_user_meets_it(data, checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "-c", DISK_FULL, "--root_dir", data, "--seqs", "c", "--model",
                             str(checkpoint), "--pred_dir", str(tmp_path / "pred"), "--num_workers", "0",
                             "--postprocess_workers", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert_one_error_line(result, disk_full_line(tmp_path / "pred"))
    assert tree(tmp_path / "pred") == {}


def test_error_line_of_os_errors():
    assert error_line(OSError(errno.ENOSPC, "No space left on device", "/x/y.tif")) == "error: /x/y.tif: disk full"
    assert error_line(PermissionError(errno.EACCES, "Permission denied", "/x")) == "error: /x: Permission denied"


# ------------------------------------------------------------------ 5. stale predictions from another run

def test_stale_predictions_are_refused_and_overwrite_clears_them(data, checkpoint, tmp_path):
    folder = tmp_path / "pred" / "c"
    folder.mkdir(parents=True)
    for t in range(6, 10):  # another run's predictions of frames the data does not have
        tifffile.imwrite(folder / f"t{t:04d}_256.tif", np.full((256, 256), t, np.uint8))
    (folder / "notes.txt").write_text("kept")
    before = tree(tmp_path / "pred")
    import inference

    args = ["--root_dir", data, "--seqs", "c,d", "--model", checkpoint, "--pred_dir", tmp_path / "pred",
            "--num_workers", 0, "--postprocess_workers", 0]
    assert exit_message(inference.main, args) == (
        f"error: {folder}: holds 4 prediction(s) of frames this run does not predict (t0006_256.tif, t0007_256.tif, "
        "t0008_256.tif, ...), left from another run; --overwrite clears the old predictions first")
    assert tree(tmp_path / "pred") == before  # nothing written, nothing deleted
    inference.main([str(a) for a in args + ["--overwrite"]])
    assert sorted(os.listdir(folder)) == ["notes.txt"] + [f"t{t:04d}_256.tif" for t in range(4)]
    first = tree(tmp_path / "pred")
    inference.main([str(a) for a in args])  # the same frames again: nothing stale, the same files written
    assert tree(tmp_path / "pred") == first


# ------------------------------------------------------------------ 6. file modes follow the umask

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"])
def test_written_files_get_the_umask_mode(data, checkpoint, tmp_path, umask, mode):
    import eval as evaluation
    import inference

    pred = tmp_path / "pred"
    previous = os.umask(umask)
    try:  # the pool's processes fork from here and inherit the umask, as they do from the script
        inference.main(["--root_dir", data, "--seqs", "c", "--model", str(checkpoint), "--pred_dir",
                        str(pred), "--num_workers", "0", "--postprocess_workers", "2"])
        evaluation.main(["--pred_dir", str(pred), "--root_dir", data])
    finally:
        os.umask(previous)
    files = [os.path.join(pred, "c", name) for name in os.listdir(pred / "c")] + [str(pred / "instance_dice.csv")]
    assert len(files) == 5
    for path in files:
        assert oct(os.stat(path).st_mode & 0o777) == oct(mode), path


# ------------------------------------------------------------------ 7. import_sequence: negative labels, bad crop

def test_import_refuses_negative_labels_and_bad_crops(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "movie.tif"
    tifffile.imwrite(images, rng.integers(0, 255, (3, 40, 50), dtype=np.uint8), photometric="minisblack")
    masks = tmp_path / "masks.tif"
    labels = np.zeros((3, 40, 50), np.int16)
    labels[:, 10:20, 10:20] = 1
    labels[1, 30:35, 30:35] = -3
    tifffile.imwrite(masks, labels, photometric="minisblack")
    import import_sequence

    root = tmp_path / "data"
    common = ["--images", images, "--root_dir", root, "--name", "a", "--masks", masks]
    assert exit_message(import_sequence.main, common) == f"error: {masks}: frame 1: negative instance label -3"
    for crop in (("0", "30"), ("-5", "30")):
        assert exit_message(import_sequence.main, common + ["--crop", *crop]) == \
            f"error: {images}: --crop must be two positive sizes, got ({crop[0]}, 30)"
    assert not root.exists() or tree(root) == {}


@pytest.mark.slow
def test_import_of_negative_labels_as_a_user_meets_it(tmp_path):
    images, masks = tmp_path / "movie.tif", tmp_path / "masks.tif"
    tifffile.imwrite(images, np.zeros((2, 40, 50), np.uint8), photometric="minisblack")
    tifffile.imwrite(masks, np.full((2, 40, 50), -1, np.int32), photometric="minisblack")
    result = run("import_sequence.py", "--images", images, "--masks", masks, "--root_dir", tmp_path / "data",
                 "--name", "a", "--crop", "-5", "30")
    assert_one_error_line(result, rf"error: {re.escape(str(images))}: --crop must be two positive sizes, got "
                                  r"\(-5, 30\)")
    result = run("import_sequence.py", "--images", images, "--masks", masks, "--root_dir", tmp_path / "data",
                 "--name", "a")
    assert_one_error_line(result, rf"error: {re.escape(str(masks))}: frame 0: negative instance label -1")
    assert not (tmp_path / "data").exists() or tree(tmp_path / "data") == {}


# ------------------------------------------------------------------ 8. pictures: an absent frame

def test_overlay_of_an_absent_frame_writes_nothing(data, tmp_path):
    import pictures

    (tmp_path / "pred" / "c").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "pred" / "c" / "t0000_256.tif", np.zeros((256, 256), np.uint8))
    argv = ["overlay", "--root_dir", data, "--pred_dir", tmp_path / "pred", "--seqs", "c", "--out_dir",
            tmp_path / "pictures"]
    absent = f"error: {os.path.join(data, 'c')}: no frame 99 (frames 0..3)"
    unpredicted = f"error: {tmp_path / 'pred' / 'c' / 't0001_256.tif'}: prediction of frame 1 not found"
    for frames, expected in (("0,99", absent), ("99,0", absent), ("0,1", unpredicted)):
        assert exit_message(pictures.main, argv + ["--frames", frames]) == expected
    assert not (tmp_path / "pictures").exists()


@pytest.mark.slow
def test_overlay_of_an_absent_frame_as_a_user_meets_it(data, tmp_path):
    (tmp_path / "pred" / "c").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "pred" / "c" / "t0000_256.tif", np.zeros((256, 256), np.uint8))
    result = run("pictures.py", "overlay", "--root_dir", data, "--pred_dir", tmp_path / "pred", "--seqs", "c",
                 "--frames", "0,99", "--out_dir", tmp_path / "pictures")
    assert_one_error_line(result, rf"error: {re.escape(os.path.join(data, 'c'))}: no frame 99 \(frames 0\.\.3\)")
    assert not (tmp_path / "pictures").exists()


# ------------------------------------------------------------------ 9. bad frames: before training, nothing written

def corrupt(root):
    path = os.path.join(root, "b", "t0002.tif")
    with open(path, "r+b") as file:
        file.truncate(40)
    return path, r"unreadable TIFF \(.*\)"


def mask_of_other_size(root):
    path = os.path.join(root, "c_GT", "man_seg0001.tif")
    tifffile.imwrite(path, np.zeros((30, 30), np.uint16))
    return path, r"mask size \(30, 30\) differs from image size \(60, 76\) of .*t0001\.tif"


def float_mask(root):
    path = os.path.join(root, "a_GT", "man_seg0003.tif")
    tifffile.imwrite(path, tifffile.imread(path).astype(np.float32))
    return path, r"instance labels must be integers, got dtype float32"


def rgb_image(root):
    path = os.path.join(root, "c", "t0000.tif")
    tifffile.imwrite(path, np.zeros((60, 76, 3), np.uint8), photometric="rgb")
    return path, r"expected one 2-D single-channel frame, got an array of shape \(60, 76, 3\)"


def image_with_gaps(root):
    path = os.path.join(root, "a", "t0002.tif")
    image = tifffile.imread(path).astype(np.float32)
    image[3:5, 10:13] = np.nan
    image[7, 7] = np.inf
    tifffile.imwrite(path, image)
    return path, r"7 pixel\(s\) are NaN or infinite"


@pytest.mark.parametrize("damage", [corrupt, mask_of_other_size, float_mask, rgb_image, image_with_gaps])
def test_bad_frames_stop_training_before_the_run_folder(tmp_path, damage, restore_sigterm):
    import train

    root = write_dataset(tmp_path / "data", sequences=("a", "b", "c"), unlabelled=(), frames=4)
    path, problem = damage(root)
    message = exit_message(train.main, ["--root_dir", root, "--out_dir", tmp_path / "run", *TINY])
    assert re.fullmatch(rf"error: {re.escape(path)}: {problem}", message), message
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bad_frame_as_a_user_meets_it(tmp_path):
    root = write_dataset(tmp_path / "data", sequences=("a", "b", "c"), unlabelled=(), frames=4)
    path, problem = float_mask(root)
    assert_one_error_line(run("train.py", "--root_dir", root, "--out_dir", tmp_path / "run", *TINY),
                          rf"error: {re.escape(path)}: {problem}")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 10. SIGTERM stops training promptly

def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_sigterm_stops_training_and_its_workers(tmp_path):
    root = write_dataset(tmp_path / "data", sequences=("a", "b", "c"), unlabelled=(), frames=8, shape=(90, 110))
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "train.py", "--root_dir", root, "--out_dir", str(run_dir),
                                "--config", "recipes/faithful.yaml", "--num_epochs", "1000", "--set", "input_size=64",
                                "--batch_size", "2", "--num_workers", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # into the next epoch's steps
    workers = children(process.pid)
    assert process.poll() is None and len(workers) >= 2, process.communicate()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)  # generous: a busy machine slows everything several-fold
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == \
        f"stopped by SIGTERM; {last} holds the last complete epoch, continue with --resume"
    deadline = time.monotonic() + 60
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers)), workers
    checkpoint = load_checkpoint(last)  # whole and ours
    assert checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] >= 1


def test_a_bad_frame_read_in_a_loader_worker_during_inference(data, checkpoint, tmp_path):
    """Inference reads frames lazily, in the loader's processes: torch raises the worker's DataError again wrapped in
    its traceback; the script still prints the one line naming the frame."""
    import inference

    root = tmp_path / "data"
    (root / "d").mkdir(parents=True)
    for t in range(3):
        tifffile.imwrite(root / "d" / f"t{t:04d}.tif", np.zeros((40, 50), np.uint8))
    with open(root / "d" / "t0002.tif", "r+b") as file:
        file.truncate(40)
    message = exit_message(inference.main, ["--root_dir", root, "--seqs", "d", "--model", checkpoint,
                                            "--pred_dir", tmp_path / "pred", "--num_workers", 2, "--batch_size", 1,
                                            "--postprocess_workers", 0])
    assert re.fullmatch(rf"error: {re.escape(str(root / 'd' / 't0002.tif'))}: unreadable TIFF \(.+\)", message), message


def test_frames_with_gaps_stop_inference_and_import_with_one_line(data, checkpoint, tmp_path):
    import import_sequence
    import inference

    root = tmp_path / "data"
    (root / "d").mkdir(parents=True)
    tifffile.imwrite(root / "d" / "t0000.tif", np.ones((40, 50), np.float32))
    tifffile.imwrite(root / "d" / "t0001.tif", np.full((40, 50), np.nan, np.float32))
    message = exit_message(inference.main, ["--root_dir", root, "--seqs", "d", "--model", checkpoint,
                                            "--pred_dir", tmp_path / "pred"])
    assert message == f"error: {root / 'd' / 't0001.tif'}: 2000 pixel(s) are NaN or infinite", message
    # frames are read lazily (case 9's last paragraph): at most the sound frame's prediction is left, whole
    left = os.listdir(tmp_path / "pred" / "d") if (tmp_path / "pred" / "d").exists() else []
    assert set(left) <= {"t0000_256.tif"}, left
    for name in left:
        tifffile.imread(tmp_path / "pred" / "d" / name)
    stack = np.ones((3, 40, 50), np.float32)
    stack[2, 0, 0] = -np.inf
    tifffile.imwrite(tmp_path / "movie.tif", stack)
    message = exit_message(import_sequence.main, ["--images", tmp_path / "movie.tif", "--root_dir", tmp_path / "new",
                                                  "--name", "a"])
    assert message == f"error: {tmp_path / 'movie.tif'}: 1 pixel(s) are NaN or infinite", message
    assert not (tmp_path / "new" / "a").exists()
    tifffile.imwrite(tmp_path / "movie.tif", stack[:2].astype(np.complex64))
    message = exit_message(import_sequence.main, ["--images", tmp_path / "movie.tif", "--root_dir", tmp_path / "new",
                                                  "--name", "a"])
    assert message == f"error: {tmp_path / 'movie.tif'}: complex pixel values (complex64), expected real intensities"
    assert not (tmp_path / "new" / "a").exists()


@pytest.mark.slow
def test_fine_tuning_keeps_the_starting_models_widths(data, checkpoint, tmp_path, restore_sigterm, capsys):
    import train

    train.main(["--root_dir", data, "--out_dir", str(tmp_path / "run"), "--init_from", str(checkpoint),
                "--set", "widths=8,16,32,64,128", *map(str, TINY)])
    assert f"{checkpoint}: keeps its widths (32, 64, 128, 256) (the recipe's are (8, 16, 32, 64, 128))" in \
        capsys.readouterr().out
    tuned = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert tuple(tuned["hyper_parameters"]["widths"]) == (32, 64, 128, 256)
