"""Faults and bad values of issue 41 outside training and inference (docs/bad_input.md lists what each gets): each
test reproduces a case F<n> and checks what the user now gets. Disk full is tested twice: with an injected ENOSPC
(anywhere) and with a small real tmpfs (where the tests run as root and may mount; skipped with the reason
otherwise)."""
import errno
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import tifffile

import cli_types
import data_files
from conftest import ROOT, write_dataset
from data_files import DataError, error_line

# ------------------------------------------------------------------------------------------------------------- helpers


def exit_message(main, argv) -> str:
    """What a script's main exits with when it stops on bad input (sys.exit(message): one line, exit status 1)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert isinstance(exit_info.value.code, str), exit_info.value.code
    return exit_info.value.code


def usage_error(main, argv, capsys) -> str:
    """argparse's refusal: exit status 2, the usage line, and the message naming the flag."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: "), err
    return err.strip().splitlines()[-1]


def files_under(folder) -> list[str]:
    """Every file and folder under `folder`, hidden ones too, relative to it."""
    found = []
    for base, folders, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(base, n), folder) for n in folders + names]
    return sorted(found)


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size) -> a folder on a fresh tmpfs of that many bytes; unmounted afterwards. Skips without root."""
    mounted = []

    def mount(size: int, name: str = "tmpfs"):
        folder = tmp_path / name
        folder.mkdir()
        if os.geteuid() != 0:
            pytest.skip("a real full disk needs a tmpfs mount, which needs root")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder, leave: int = 0):
    """Fill the filesystem of `folder` up to `leave` bytes free, with one file 'filler'."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(os.path.join(folder, "filler"), "wb") as file:
        file.write(b"\0" * max(free - leave, 0))


def short_write(real, after: int = 1000):
    """Stand-in for a writer: writes `after` bytes of what `real` would write, then fails as a full disk does (numpy's
    tofile reports it without an errno: '<n> requested and <m> written')."""
    def write(path, *args, **kwargs):
        real(path, *args, **kwargs)
        with open(path, "r+b") as file:
            file.truncate(after)
        raise OSError(f"65536 requested and {after} written")
    return write


# ----------------------------------------------------------------------------------------- F14/F23: numeric flags


def test_cli_types_take_good_values_and_refuse_bad_ones():
    import argparse

    assert cli_types.positive_int("3") == 3 and cli_types.non_negative_int("0") == 0
    assert cli_types.positive_float("1e-4") == 1e-4 and cli_types.fraction("1") == 1.0
    assert cli_types.int_list("0, 10,39") == [0, 10, 39]
    assert cli_types.frame_range("5:8") == range(5, 8)
    for kind, value in [(cli_types.positive_int, "0"), (cli_types.positive_int, "-5"), (cli_types.positive_int, "abc"),
                        (cli_types.positive_int, "1.5"), (cli_types.non_negative_int, "-1"),
                        (cli_types.positive_float, "0"), (cli_types.positive_float, "nan"),
                        (cli_types.positive_float, "inf"), (cli_types.positive_float, "-1"),
                        (cli_types.non_negative_float, "-0.1"), (cli_types.fraction, "1.5"),
                        (cli_types.int_list, "0,a"), (cli_types.int_list, "0,-1"), (cli_types.int_list, ""),
                        (cli_types.frame_range, "5:5"), (cli_types.frame_range, "8:5"), (cli_types.frame_range, "5:"),
                        (cli_types.frame_range, "-1:5"), (cli_types.frame_range, "5")]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(value))):
            kind(value)


@pytest.mark.parametrize("argv, message", [
    (["--size", "0"], "argument --size: expected an integer of at least 1, got '0'"),
    (["--size", "-5"], "argument --size: expected an integer of at least 1, got '-5'"),
    (["--size", "1", "2", "3"], "argument --size: one size S or two sizes H W, got 3 values"),
    (["--size", "100000"], "argument --size: 100000 x 100000 is more than 268435456 pixels a frame, more than the "
                           "scripts read"),
    (["--num_frames", "0"], "argument --num_frames/--frames: expected an integer of at least 1, got '0'"),
    (["--num_sequences", "-1"], "argument --num_sequences/--sequences: expected an integer of at least 1, got '-1'"),
    (["--num_sequences", "2", "--without_gt", "3"], "argument --without_gt: 3 is more than the 2 sequence(s)"),
    (["--seed", "-1"], "argument --seed: expected an integer of at least 0, got '-1'"),
])
def test_simulate_refuses_bad_numbers_with_a_usage_line_and_writes_nothing(tmp_path, capsys, argv, message):
    import simulate

    last = usage_error(simulate.main, ["--out_dir", tmp_path / "sim", *argv], capsys)
    assert last.endswith(f": error: {message}"), last  # after the program's name
    assert not (tmp_path / "sim").exists()


def test_simulate_names_more_than_26_sequences_like_spreadsheet_columns(tmp_path):
    import simulate

    assert simulate.sequence_names(3) == ["a", "b", "c"]
    assert simulate.sequence_names(30)[24:] == ["y", "z", "aa", "ab", "ac", "ad"]
    assert simulate.sequence_names(703)[-2:] == ["zz", "aaa"]
    simulate.main(["--out_dir", str(tmp_path / "sim"), "--num_sequences", "28", "--without_gt", "1", "--num_frames", "1",
                   "--size", "16"])
    folders = sorted(os.listdir(tmp_path / "sim"))
    assert len([f for f in folders if not f.endswith("_GT")]) == 28
    assert "aa" in folders and "aa_GT" in folders and "ab" in folders and "ab_GT" not in folders


def test_eval_and_pictures_refuse_bad_numbers_with_a_usage_line(tmp_path, capsys):
    import eval as evaluation
    import pictures

    assert usage_error(evaluation.main, ["--ctc_res", tmp_path, "--ctc_gt", tmp_path, "--ctc_threads", "0"],
                       capsys).endswith("argument --ctc_threads: expected an integer of at least 1, got '0'")
    assert usage_error(pictures.main, ["lineage", "--track_dir", tmp_path, "--max_tracks", "-3"],
                       capsys).endswith("argument --max_tracks: expected an integer of at least 1, got '-3'")


# ---------------------------------------------------------------------------------------------- F4: submit_chain.sh

FAKE_SBATCH = """#!/bin/bash
# counts its calls, records the arguments, fails the call numbered $FAIL_AT
n=$(( $(cat "$LOG.count" 2>/dev/null || echo 0) + 1 )); echo $n > "$LOG.count"
echo "$*" >> "$LOG"
if [ "$n" = "${FAIL_AT:-0}" ]; then echo "sbatch: error: Batch job submission failed: Invalid account" >&2; exit 1; fi
echo "$((100 + n));cluster"
"""


def submit_chain(tmp_path, fail_at: int, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    result = subprocess.run(["bash", os.path.join(ROOT, "submit_chain.sh")], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(log),
                                                 FAIL_AT=str(fail_at), **env))
    return result, log.read_text().splitlines() if log.exists() else []


def test_submit_chain_chains_every_job_on_the_id_before_it(tmp_path):
    result, calls = submit_chain(tmp_path, fail_at=0, TRACK="1")
    assert result.returncode == 0, result.stderr
    assert len(calls) == 4
    assert "--dependency" not in calls[0]
    assert "--dependency=afterok:101 " in calls[1] and "--dependency=afterok:102 " in calls[2]
    assert "--dependency=afterok:102 " in calls[3]
    assert result.stdout.splitlines()[:3] == ["train: job 101", "inference: job 102 (after 101)",
                                              "eval: job 103 (after 102)"]


@pytest.mark.parametrize("fail_at, name, already", [
    (1, "train.sh", ""),
    (2, "inference.sh", "; already submitted: train.sh job 101 (scancel 101 if the chain is not wanted)"),
    (3, "eval.sh", "; already submitted: train.sh job 101, inference.sh job 102 (scancel 101 102 if the chain is not "
                   "wanted)"),
])
def test_submit_chain_stops_at_the_first_failed_submission(tmp_path, fail_at, name, already):
    """F4: the rest was submitted with an empty `afterok:` and the script exited 0."""
    result, calls = submit_chain(tmp_path, fail_at=fail_at)
    assert result.returncode == 1
    assert len(calls) == fail_at  # nothing after the failed one
    assert not any(re.search(r"afterok:(\s|$)", call) for call in calls)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: submitting {name} failed (sbatch exit status 1); nothing after it was submitted"
                      + already]


def test_submit_chain_refuses_an_answer_without_a_job_id(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/bash\necho 'Submitted to nowhere'\n")
    (bin_dir / "sbatch").chmod(0o755)
    result = subprocess.run(["bash", os.path.join(ROOT, "submit_chain.sh")], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: submitting train.sh failed (sbatch printed no job id: Submitted to "
                                     "nowhere); nothing after it was submitted")


# ------------------------------------------------------------------------------------ F9, F18: pictures.py inputs


def write_res_track(folder, text: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "res_track.txt").write_text(text)
    return str(folder)


@pytest.mark.parametrize("text, problem", [
    ("1 0 5 0\n1 6 9 1\n", "track 1 6 9 1: a track is its own parent"),  # F9: this one never ended
    ("1 0 5 2\n2 6 9 1\n", "track 1 0 5 2: its ancestors form a cycle (a track is its own ancestor)"),
    ("1 0 5 0\n2 6 9 3\n3 0 5 4\n4 1 2 2\n", "track 2 6 9 3: its ancestors form a cycle (a track is its own ancestor)"),
    ("1 0 5 0\n2 6 9 -1\n", "track 2 6 9 -1: a parent label must be at least 0 (0: no parent)"),  # F18
    ("1 0 5 0\n2 6 9 7\n", "track 2 6 9 7: its parent is not a track of the file"),
    ("1 0 5 0\n1 6 9 0\n", "track 1 6 9 0: its label names another track too"),
    ("1 5 4 0\n", "track 1 5 4 0: begin must be at least 0 and end at least begin"),
    ("0 0 4 0\n", "track 0 0 4 0: a track label must be at least 1"),
    ("1 0 5\n2 0 5\n3 0 5\n4 0 5\n", "not a track file of lines `label begin end parent` (line 1 has 3 values)"),
    ("1 0 5 0\n2 0 x 1\n", "not a track file of lines `label begin end parent` (line 2 is not four whole numbers)"),
    ("1 0 5 0\n99999999999999999999 0 1 0\n", "line 2: a value beyond the 64-bit range"),
])
def test_lineage_of_a_bad_track_file_is_one_line(tmp_path, text, problem):
    import pictures

    folder = write_res_track(tmp_path / "res", text)
    message = exit_message(pictures.main, ["lineage", "--track_dir", folder, "--out", tmp_path / "lineage.png"])
    assert message == f"error: {os.path.join(folder, 'res_track.txt')}: {problem}"
    assert not (tmp_path / "lineage.png").exists()


def test_lineage_of_a_binary_track_file_is_one_line(tmp_path):
    import pictures

    folder = tmp_path / "res"
    folder.mkdir()
    (folder / "res_track.txt").write_bytes(bytes(range(256)) * 4)
    message = exit_message(pictures.main, ["lineage", "--track_dir", folder, "--out", tmp_path / "lineage.png"])
    assert message == (f"error: {folder / 'res_track.txt'}: not a track file of lines `label begin end parent` "
                       "(not a text file)")


@pytest.mark.slow
def test_lineage_of_a_self_parent_as_a_user_meets_it(tmp_path):
    """F9 as a subprocess: before, it never ended (memory grew 17 MB/s)."""
    folder = write_res_track(tmp_path / "res", "1 0 5 0\n1 6 9 1\n")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "pictures.py"), "lineage", "--track_dir", folder,
                             "--out", str(tmp_path / "lineage.png")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {folder}/res_track.txt: track 1 6 9 1: a track is its own parent"


def test_lineage_of_a_sound_file_is_drawn(tmp_path):
    import pictures

    folder = write_res_track(tmp_path / "res", "1 0 5 0\n2 6 9 1\n3 6 9 1\n4 10 12 3\n")
    pictures.main(["lineage", "--track_dir", folder, "--out", str(tmp_path / "lineage.png")])
    assert (tmp_path / "lineage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files_under(tmp_path) == ["lineage.png", "res", "res/res_track.txt"]


def test_overlay_frames_that_are_not_numbers_get_a_usage_line(tmp_path, capsys):
    import pictures

    assert usage_error(pictures.main, ["overlay", "--root_dir", tmp_path, "--pred_dir", tmp_path, "--frames", "0,a"],
                       capsys).endswith("argument --frames: expected comma-separated whole numbers of at least 0 "
                                        "(0,10,39), got '0,a'")
    assert usage_error(pictures.main, ["tracks", "--track_dir", tmp_path, "--frames", "1,,2"],
                       capsys).endswith("got '1,,2'")


@pytest.mark.parametrize("content, problem", [
    (b"", "not a metrics.csv of a run (No columns to parse from file)"),
    (bytes(range(256)) * 8, None),
    (b"a,b\n1,2\n", "not a metrics.csv of a run (no numeric epoch column; columns ['a', 'b'])"),
])
def test_curves_of_an_empty_or_binary_file_is_one_line(tmp_path, content, problem):
    import pictures

    metrics = tmp_path / "metrics.csv"
    metrics.write_bytes(content)
    message = exit_message(pictures.main, ["curves", "--metrics", metrics, "--out", tmp_path / "curves.png"])
    assert message.startswith(f"error: {metrics}: not a metrics.csv of a run (") and "\n" not in message, message
    if problem:
        assert message == f"error: {metrics}: {problem}"
    assert not (tmp_path / "curves.png").exists()


def test_tracks_with_a_label_of_4e9_are_drawn_without_a_table_per_label(tmp_path):
    """F18: the colour table had one entry per label id up to the largest (4e9: 29.8 GiB asked for)."""
    import pictures

    res = tmp_path / "res"
    res.mkdir()
    labels = np.zeros((40, 40), np.uint32)
    labels[5:15, 5:15], labels[20:30, 20:30] = 4_000_000_000, 7
    tifffile.imwrite(res / "mask000.tif", labels)
    tifffile.imwrite(res / "mask001.tif", labels)
    pictures.main(["tracks", "--track_dir", str(res), "--frames", "0,1", "--out", str(tmp_path / "tracks.png")])
    assert (tmp_path / "tracks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- F11, F12: disk full


def test_disk_full_while_writing_a_png_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    """F11 injected: the PNG writer fails halfway with ENOSPC; the old picture stays, no temporary file is left."""
    import pictures

    folder = write_res_track(tmp_path / "res", "1 0 5 0\n2 6 9 1\n3 6 9 1\n")
    out = tmp_path / "pictures" / "lineage.png"
    out.parent.mkdir()
    out.write_bytes(b"the old picture")
    real_savefig = pictures.plt.Figure.savefig

    def savefig(self, path, *args, **kwargs):
        real_savefig(self, path, *args, **kwargs)
        with open(path, "r+b") as file:
            file.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pictures.plt.Figure, "savefig", savefig)
    message = exit_message(pictures.main, ["lineage", "--track_dir", folder, "--out", out])
    assert message == f"error: {out}: cannot write (disk full)"
    assert out.read_bytes() == b"the old picture"
    assert os.listdir(out.parent) == ["lineage.png"]


def test_disk_full_on_a_real_tmpfs_while_drawing(tmp_path, small_tmpfs):
    """F11 on a full filesystem: before, a cut PNG was left and the line said only `error: disk full`."""
    import pictures

    disk = small_tmpfs(256 * 1024)
    folder = write_res_track(tmp_path / "res", "".join(f"{k} 0 50 0\n" for k in range(1, 300)))
    fill(disk, leave=8 * 1024)
    message = exit_message(pictures.main, ["lineage", "--track_dir", folder, "--out", disk / "lineage.png"])
    assert message == f"error: {disk / 'lineage.png'}: cannot write (disk full)"
    assert os.listdir(disk) == ["filler"]


def test_short_write_of_a_tiff_is_named_disk_full(tmp_path, monkeypatch):
    """F12 injected: tifffile (numpy's tofile) reports a full disk as '65536 requested and 24320 written'."""
    path = tmp_path / "t0000_256.tif"
    monkeypatch.setattr(data_files.tifffile, "imwrite", short_write(tifffile.imwrite))
    with pytest.raises(DataError) as error:
        data_files.write_tiff_atomically(str(path), np.ones((256, 256), np.uint16))
    assert error_line(error.value) == f"error: {path}: cannot write (disk full)"
    assert os.listdir(tmp_path) == []
    assert error_line(OSError("65536 requested and 24320 written")) == "error: disk full"
    assert data_files.os_error_reason(OSError(errno.ENOSPC, "No space left on device")) == "disk full"


def test_tiff_writers_on_a_full_tmpfs(small_tmpfs):
    """F12 on a real full filesystem: a prediction, and a whole simulated sequence (staged, then moved)."""
    import simulate

    disk = small_tmpfs(128 * 1024)
    with pytest.raises(DataError) as error:
        data_files.write_tiff_atomically(str(disk / "t0000_256.tif"), np.ones((400, 400), np.uint16))
    assert error_line(error.value) == f"error: {disk / 't0000_256.tif'}: cannot write (disk full)"
    assert os.listdir(disk) == []
    message = exit_message(simulate.main, ["--out_dir", disk / "sim", "--num_sequences", 1, "--without_gt", 0,
                                           "--num_frames", 20, "--size", 96])
    assert message == f"error: {disk / 'sim' / 'a'}: cannot write the sequence (disk full)"
    assert os.listdir(disk / "sim") == []  # no sequence, no staging folder


# ---------------------------------------------------------------------------- F10, F22: inputs bounded, files only


def declare_huge(path, side: int = 30720):
    """A 282-byte zlib TIFF whose header declares side x side pixels (F10: 30720 x 30720 decoded to 5 GB)."""
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(side)
        tif.pages[0].tags["ImageLength"].overwrite(side)
    return str(path)


def test_a_frame_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    path = declare_huge(tmp_path / "t0000.tif")
    assert os.path.getsize(path) < 1000
    monkeypatch.setattr(tifffile.TiffFile, "asarray", lambda *a, **k: pytest.fail("decoded"))
    expected = (f"{path}: declares 30720 x 30720 = 943718400 pixels, more than the limit of 268435456; refused "
                "before decoding")
    for read in (data_files.read_tiff_2d, data_files.frame_shape, data_files.read_tiff_stack):
        with pytest.raises(DataError, match=re.escape(expected)):
            read(path)


def test_the_pixel_limit_is_an_argument(tmp_path):
    path = str(tmp_path / "t0000.tif")
    tifffile.imwrite(path, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), compression="zlib")
    assert data_files.read_tiff_2d(path, max_pixels=64 * 64).shape == (64, 64)
    assert data_files.frame_shape(path, max_pixels=64 * 64) == (64, 64)
    with pytest.raises(DataError, match="4096 pixels, more than the limit of 4095"):
        data_files.read_tiff_2d(path, max_pixels=64 * 64 - 1)
    assert data_files.MAX_PIXELS == 2 ** 28


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_fifos_devices_and_folders_among_the_frames_are_refused_unopened(tmp_path, kind):
    """F22: a FIFO named t0003.tif hung inference with no output."""
    root = write_dataset(tmp_path / "data", sequences=("a",), unlabelled=(), frames=3)
    path = tmp_path / "data" / "a" / "t0003.tif"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        os.symlink("/dev/zero", path)
    else:
        path.mkdir()
    what = {"fifo": "a FIFO (named pipe)", "device": "a device", "folder": "a folder"}[kind]
    with pytest.raises(DataError) as error:
        data_files.list_frames(root, "a", with_masks=False)
    assert str(error.value) == f"{path}: {what}, not a regular file; refused"
    for read in (data_files.read_tiff_2d, data_files.frame_shape, data_files.read_tiff_stack):
        with pytest.raises(DataError, match=re.escape(f"{path}: {what}, not a regular file; refused")):
            read(str(path))


@pytest.mark.slow
def test_a_fifo_among_the_frames_as_a_user_meets_it(tmp_path):
    """F22 with a script that reads frames (eval.py over a prediction folder with a FIFO in it): one line, no hang."""
    root = write_dataset(tmp_path / "data", sequences=("c",), unlabelled=(), frames=2)
    pred = tmp_path / "pred" / "c"
    pred.mkdir(parents=True)
    tifffile.imwrite(pred / "t0000_256.tif", np.zeros((256, 256), np.uint16))
    os.mkfifo(pred / "t0001_256.tif")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--pred_dir", str(tmp_path / "pred"),
                             "--root_dir", root], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {pred / 't0001_256.tif'}: a FIFO (named pipe), not a regular file; refused"


# ------------------------------------------------------------------------------------------ F15: staging on SIGTERM

WRITER = """
import os, sys, time
import numpy as np
sys.path.insert(0, {root!r})
import data_files

def frames():
    for t in range(1000):
        if t == 3:
            open({ready!r}, "w").close()  # a few frames are staged: the test may now stop us
        if t >= 3:
            time.sleep(0.05)
        yield np.full((32, 32), t, np.uint8), np.ones((32, 32), np.uint16)

data_files.write_sequence({data!r}, "a", frames())
"""


def start_writer(tmp_path):
    ready = tmp_path / "ready"
    script = WRITER.format(root=ROOT, ready=str(ready), data=str(tmp_path / "data"))
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the writer never got going"
        time.sleep(0.05)
    return process


@pytest.mark.slow
def test_sigterm_while_a_sequence_is_staged_leaves_nothing(tmp_path):
    """F15: SIGTERM during import or simulation left a hidden staging folder that later runs kept."""
    process = start_writer(tmp_path)
    assert [e for e in os.listdir(tmp_path / "data") if e.startswith(".write-a-")]  # staged: there is something to lose
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, process.stderr.read()
    assert os.listdir(tmp_path / "data") == []


@pytest.mark.slow
def test_a_staging_folder_left_by_sigkill_is_removed_by_the_next_run(tmp_path):
    process = start_writer(tmp_path)
    process.kill()
    process.wait(timeout=60)
    left = [e for e in os.listdir(tmp_path / "data") if e.startswith(".write-a-")]
    assert len(left) == 1 and left[0].startswith(f".write-a-{process.pid}@{socket.gethostname()}-")
    data_files.write_sequence(str(tmp_path / "data"), "a", [(np.zeros((8, 8), np.uint8), np.zeros((8, 8)))])
    assert sorted(os.listdir(tmp_path / "data")) == ["a", "a_GT"]


def test_stale_staging_of_a_live_process_or_another_host_is_kept(tmp_path):
    mine = tmp_path / f".write-a-{os.getpid()}@{socket.gethostname()}-abc123"
    other_host = tmp_path / ".write-a-1@some-other-host-abc123"
    other_name = tmp_path / f".write-ab-999999999@{socket.gethostname()}-abc123"
    dead = tmp_path / f".write-a-999999999@{socket.gethostname()}-x_y1"
    for folder in (mine, other_host, other_name, dead):
        folder.mkdir()
    assert data_files.remove_stale_staging(str(tmp_path), "write-a") == [str(dead)]
    assert sorted(os.listdir(tmp_path)) == sorted(f.name for f in (mine, other_host, other_name))


def test_sigterm_during_the_final_renames_waits_for_them(tmp_path):
    """Both folders of a sequence or neither: a SIGTERM during the renames takes effect after them."""
    with data_files.sigterm_raises():
        with pytest.raises(SystemExit) as exit_info:
            with data_files.sigterm_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # the handler runs here and only takes note
                (tmp_path / "renamed").mkdir()
        assert exit_info.value.code == 128 + signal.SIGTERM
    assert (tmp_path / "renamed").is_dir()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ---------------------------------------------------------------------------------------------- F3: uint64 labels


def test_uint64_labels_beyond_int64_are_renumbered_in_order():
    labels = np.array([[0, 2 ** 64 - 1, 2 ** 63], [5, 2 ** 63, 0]], np.uint64)
    np.testing.assert_array_equal(data_files.compact_labels(labels), [[0, 3, 2], [1, 2, 0]])
    no_background = np.array([2 ** 64 - 1, 2 ** 63], np.uint64)
    np.testing.assert_array_equal(data_files.compact_labels(no_background), [2, 1])
    small = np.array([0, 7, 2 ** 40], np.uint64)
    np.testing.assert_array_equal(data_files.compact_labels(small), small.astype(np.int64))


def test_eval_scores_uint64_labels_beyond_int64(tmp_path):
    """F3: eval.py raised `negative instance label` on them."""
    import eval as evaluation

    root = write_dataset(tmp_path / "data", sequences=("c",), unlabelled=(), frames=2)
    for t in range(2):
        path = tmp_path / "data" / "c_GT" / f"man_seg{t:04d}.tif"
        labels = tifffile.imread(path).astype(np.uint64)
        wide = np.where(labels > 0, labels + np.uint64(2 ** 63 + 5), 0).astype(np.uint64)
        tifffile.imwrite(path, wide)
        (tmp_path / "pred" / "c").mkdir(parents=True, exist_ok=True)
        from border_core import resize_nearest
        tifffile.imwrite(tmp_path / "pred" / "c" / f"t{t:04d}_256.tif", resize_nearest(wide, (256, 256)))
    assert evaluation.main(["--pred_dir", str(tmp_path / "pred"), "--root_dir", root]) == 1.0


# ----------------------------------------------------------------------------- F19: eval --ctc_res, a bad track file


def ctc_folders(tmp_path, res_track: str):
    labels = np.zeros((16, 16), np.uint16)
    labels[2:6, 2:6] = 1
    res, gt = tmp_path / "01_RES", tmp_path / "01_GT"
    (gt / "TRA").mkdir(parents=True)
    (gt / "SEG").mkdir()
    res.mkdir()
    for t in range(2):
        tifffile.imwrite(res / f"mask{t:03d}.tif", labels)
        tifffile.imwrite(gt / "TRA" / f"man_track{t:03d}.tif", labels)
        tifffile.imwrite(gt / "SEG" / f"man_seg{t:03d}.tif", labels)
    (gt / "TRA" / "man_track.txt").write_text("1 0 1 0\n")
    (res / "res_track.txt").write_text(res_track)
    return res, gt


@pytest.mark.parametrize("res_track, problem", [
    ("1 0 1\n", "not a track file of lines `label begin end parent` (line 1 has 3 values)"),
    ("one 0 1 0\n", "not a track file of lines `label begin end parent` (line 1 is not four whole numbers)"),
    ("1 0 1 1\n", "track 1 0 1 1: a track is its own parent"),
    ("1 0 1 -4\n", "track 1 0 1 -4: a parent label must be at least 0 (0: no parent)"),
])
def test_eval_ctc_with_a_malformed_res_track_is_one_line(tmp_path, res_track, problem):
    import eval as evaluation

    res, gt = ctc_folders(tmp_path, res_track)
    message = exit_message(evaluation.main, ["--ctc_res", res, "--ctc_gt", gt])
    assert message == f"error: {res / 'res_track.txt'}: {problem}"


def test_eval_ctc_with_a_sound_result_scores_it(tmp_path, capsys):
    import eval as evaluation

    res, gt = ctc_folders(tmp_path, "1 0 1 0\n")
    scores = evaluation.main(["--ctc_res", str(res), "--ctc_gt", str(gt)])
    assert (scores["SEG"], scores["DET"], scores["TRA"]) == (1.0, 1.0, 1.0)


# ------------------------------------------------------------------------- issue 40: eval.py --gt stack --pred stack


def write_stack(path, stack):
    tifffile.imwrite(path, stack, photometric="minisblack")  # a T x Y x X stack, not 3 colour planes


def cell_stack(frames: int = 3, size: int = 96):
    """A T x Y x X stack of 4 square cells per frame (labels 1..4), large enough to survive the resize to 256."""
    stack = np.zeros((frames, size, size), np.uint16)
    half = size // 2
    for k, (y, x) in enumerate([(0, 0), (0, half), (half, 0), (half, half)]):
        stack[:, y + 4:y + half - 4, x + 4:x + half - 4] = k + 1
    return stack


def test_eval_of_identical_stacks_is_one_at_both_sizes(tmp_path, capsys):
    import eval as evaluation

    write_stack(tmp_path / "masks.tif", cell_stack())
    write_stack(tmp_path / "labels.tif", cell_stack().astype(np.uint32) * 1000)  # other ids, same cells
    assert evaluation.main(["--gt", str(tmp_path / "masks.tif"), "--pred", str(tmp_path / "labels.tif")]) == 1.0
    out = capsys.readouterr().out
    assert "sequence labels@native: 3 frames, Instance Dice 1.000000" in out
    assert "sequence labels@256: 3 frames, Instance Dice 1.000000" in out
    table = pd.read_csv(tmp_path / "labels_instance_dice.csv")
    assert list(table.columns) == evaluation.COLUMNS
    assert list(table["sequence"]) == ["labels@native"] * 3 + ["labels@256"] * 3
    assert list(table["frame"]) == [0, 1, 2] * 2 and list(table["gt_count"]) == [4] * 6


def test_eval_of_a_stack_with_one_cell_removed(tmp_path, capsys):
    """Frame 1 lacks cell 3: 3 matched cells of Dice 1 and one unmatched GT cell, (1 + 1 + 1 + 0) / 4 = 0.75; the
    mean of the three frames (1 + 0.75 + 1) / 3."""
    import eval as evaluation

    pred = cell_stack()
    pred[1][pred[1] == 3] = 0
    write_stack(tmp_path / "masks.tif", cell_stack())
    write_stack(tmp_path / "labels.tif", pred)
    mean = evaluation.main(["--gt", str(tmp_path / "masks.tif"), "--pred", str(tmp_path / "labels.tif"),
                            "--csv", str(tmp_path / "scores.csv")])
    assert mean == pytest.approx(2.75 / 3)
    table = pd.read_csv(tmp_path / "scores.csv")
    np.testing.assert_allclose(table["score"], [1, 0.75, 1, 1, 0.75, 1])
    assert list(table["matched"]) == [4, 3, 4] * 2 and list(table["recall50"]) == [1, 0.75, 1] * 2
    assert evaluation.main(["--gt", str(tmp_path / "masks.tif"), "--pred", str(tmp_path / "labels.tif"),
                            "--native"]) == pytest.approx(2.75 / 3)


def test_eval_of_single_frames_and_of_a_256_prediction(tmp_path, capsys):
    import eval as evaluation
    from border_core import resize_nearest

    gt = cell_stack(frames=1)[0]
    tifffile.imwrite(tmp_path / "mask.tif", gt)
    tifffile.imwrite(tmp_path / "pred256.tif", resize_nearest(gt, (256, 256)))
    assert evaluation.main(["--gt", str(tmp_path / "mask.tif"), "--pred", str(tmp_path / "pred256.tif")]) == 1.0
    assert list(pd.read_csv(tmp_path / "pred256_instance_dice.csv")["sequence"]) == ["pred256@256"]
    message = exit_message(evaluation.main, ["--gt", tmp_path / "mask.tif", "--pred", tmp_path / "pred256.tif",
                                             "--native"])
    assert message == (f"error: {tmp_path / 'pred256.tif'}: frames of the challenge's 256 x 256, not the size of "
                       f"{tmp_path / 'mask.tif'}: no native score")


@pytest.mark.parametrize("pred, problem", [
    (cell_stack(frames=2), "2 frame(s), its ground truth {gt} has 3"),
    (cell_stack(size=80), "frames of 80 x 80 differ from the ground truth's 96 x 96 in {gt} (and are not the "
                          "challenge's 256 x 256)"),
    (cell_stack().astype(np.float32), "predicted instance labels must be integers, got dtype float32"),
    (np.zeros((2, 3, 4, 5), np.uint8), "expected one 2-D frame or a stack of them (T x Y x X), got an array of "
                                      "shape (2, 3, 4, 5)"),
])
def test_eval_of_stacks_that_do_not_fit_is_one_line(tmp_path, capsys, pred, problem):
    import eval as evaluation

    gt = tmp_path / "masks.tif"
    write_stack(gt, cell_stack())
    write_stack(tmp_path / "labels.tif", pred)
    message = exit_message(evaluation.main, ["--gt", gt, "--pred", tmp_path / "labels.tif"])
    assert message == f"error: {tmp_path / 'labels.tif'}: " + problem.format(gt=gt)
    assert not (tmp_path / "labels_instance_dice.csv").exists()


def test_eval_stacks_go_alone(tmp_path, capsys):
    import eval as evaluation

    assert usage_error(evaluation.main, ["--gt", "a.tif"], capsys).endswith("and --gt and --pred")
    assert usage_error(evaluation.main, ["--gt", "a.tif", "--pred", "b.tif", "--pred_dir", "p", "--root_dir", "r"],
                       capsys).endswith("go with none of --pred_dir, --root_dir, --seqs, --ctc_res")


# ------------------------------------------------------------------------------------ checkpoint_io: F1, durable


def tiny_checkpoint(value: float, size: int = 20000) -> dict:
    import torch

    return {"state_dict": {"weight": torch.full((size,), value)}, "epoch": int(value)}


def test_atomic_checkpoint_survives_enospc_mid_write(tmp_path, monkeypatch):
    """A failure halfway through the write leaves the old checkpoint byte for byte and no temporary file; the error
    names the checkpoint and says disk full."""
    import checkpoint_io

    plugin = checkpoint_io.AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    plugin.save_checkpoint(tiny_checkpoint(1.0), str(path))
    old = path.read_bytes()
    def half_then_full(tmp, data):
        with open(tmp, "wb") as file:
            file.write(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io, "write_bytes", half_then_full)
    with pytest.raises(DataError) as error:
        plugin.save_checkpoint(tiny_checkpoint(2.0), str(path))
    assert error_line(error.value) == f"error: {path}: cannot write (disk full)"
    assert path.read_bytes() == old
    assert os.listdir(path.parent) == ["last.ckpt"]


def test_atomic_checkpoint_replaces_and_keeps_the_umask_mode(tmp_path):
    import torch

    import checkpoint_io

    plugin = checkpoint_io.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    old_umask = os.umask(0o027)
    try:
        plugin.save_checkpoint(tiny_checkpoint(1.0), str(path))
        plugin.save_checkpoint(tiny_checkpoint(3.0), str(path))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and float(loaded["state_dict"]["weight"][0]) == 3.0
    assert os.listdir(tmp_path) == ["last.ckpt"]
    with pytest.raises(TypeError):
        plugin.save_checkpoint(tiny_checkpoint(1.0), str(path), storage_options={})


def test_atomic_checkpoint_on_a_full_tmpfs_with_tmpdir_elsewhere(tmp_path, small_tmpfs, monkeypatch):
    """F1: the run folder on a full filesystem, $TMPDIR on another. Lightning's save left a 0-byte or cut last.ckpt."""
    import tempfile

    import checkpoint_io

    disk = small_tmpfs(1024 * 1024)
    other = tmp_path / "tmpdir"
    other.mkdir()
    monkeypatch.setenv("TMPDIR", str(other))
    monkeypatch.setattr(tempfile, "tempdir", None)
    plugin = checkpoint_io.AtomicCheckpointIO()
    path = disk / "checkpoints" / "last.ckpt"
    plugin.save_checkpoint(tiny_checkpoint(1.0, size=50000), str(path))  # 200 KB
    old = path.read_bytes()
    fill(disk, leave=100 * 1024)  # room for half of the next one
    with pytest.raises(DataError) as error:
        plugin.save_checkpoint(tiny_checkpoint(2.0, size=50000), str(path))
    assert error_line(error.value) == f"error: {path}: cannot write (disk full)"
    assert path.read_bytes() == old
    assert os.listdir(path.parent) == ["last.ckpt"] and os.listdir(other) == []


@pytest.mark.slow
def test_a_trainer_with_the_plugin_keeps_last_ckpt_when_the_disk_fills(tmp_path, small_tmpfs, monkeypatch):
    """F1 through Lightning's Trainer and ModelCheckpoint: epoch 0's last.ckpt survives the failed save of epoch 1."""
    import tempfile

    import lightning as L
    import torch

    import checkpoint_io

    disk = small_tmpfs(2 * 1024 * 1024)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(256, 256)  # 256 KB of weights, 768 KB with Adam's state

        def training_step(self, batch, _):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

        def on_train_epoch_start(self):
            if self.current_epoch == 1:  # epoch 0's checkpoint is saved: leave room for half of the next one
                fill(disk, leave=400 * 1024)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 256)), batch_size=4)
    checkpoints = disk / "checkpoints"
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[checkpoint_io.AtomicCheckpointIO()],
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(  # last.ckpt every epoch, as train.py
                            dirpath=checkpoints, filename="last", enable_version_counter=False)])
    with pytest.raises(DataError) as error:
        trainer.fit(Tiny(), data)
    assert error_line(error.value) == f"error: {checkpoints / 'last.ckpt'}: cannot write (disk full)"
    saved = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 2
    assert os.listdir(checkpoints) == ["last.ckpt"] and sorted(os.listdir(disk)) == ["checkpoints", "filler"]


# ---------------------------------------------------------------------------------------- folder_lock: F5, F6

HOLDER = """
import sys
sys.path.insert(0, {root!r})
from folder_lock import lock_folder
with lock_folder({folder!r}, "train.py"):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_a_second_holder_of_a_folder_is_refused_with_the_first_ones_pid_and_host(tmp_path):
    from folder_lock import FolderInUse, lock_folder

    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, folder=str(folder))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(FolderInUse) as error:
            with lock_folder(str(folder), "inference.py"):
                pytest.fail("a second holder got the lock")
        assert str(error.value) == (f"{folder}: in use by train.py (pid {holder.pid} on host {socket.gethostname()}); "
                                    "wait for it or choose another folder")
        assert error_line(error.value) == f"error: {error.value}"
        assert isinstance(error.value, DataError)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait(timeout=60)
    with lock_folder(str(folder), "inference.py") as lock_path:
        assert lock_path == str(folder / ".lock")
        assert f'"pid": {os.getpid()}' in (folder / ".lock").read_text()
    with lock_folder(str(folder), "inference.py"):  # released on leaving the block
        pass


def test_a_folder_lock_in_one_process_refuses_a_second_one_there_too(tmp_path):
    from folder_lock import FolderInUse, lock_folder

    with lock_folder(str(tmp_path / "new" / "run"), "train.py"):
        with pytest.raises(FolderInUse, match=f"in use by train.py \\(pid {os.getpid()} on host "):
            with lock_folder(str(tmp_path / "new" / "run"), "train.py"):
                pass
    assert (tmp_path / "new" / "run" / ".lock").read_text() == ""  # no stale pid once released
