"""Tracking: hand-built sequences with a known lineage give exactly the expected res_track.txt and track maps; the
simulator's TRA ground truth is valid by py-ctcmetrics; the IoU detection scores equal hand-computed values; bad
input to track.py gives one error line and writes nothing."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import tifffile

import simulate
import track
from conftest import ROOT
from data_files import list_frames, read_tracks
from metrics import IOU_THRESHOLDS, detection_scores, iou_counts, mean_ap


def rod(shape, top, left, height, width, label, into=None):
    labels = np.zeros(shape, np.uint16) if into is None else into
    labels[top:top + height, left:left + width] = label
    return labels


def hand_built_sequence():
    """Six frames of 40 x 60 with four cells, labels renumbered every frame (as a segmentation gives them):
    A moves right by 2 px a frame; B divides between frames 2 and 3 (two halves, each growing a little);
    C leaves at the right edge after frame 3; D is missing in frame 2 (a segmentation miss) and back in frame 3;
    E enters at the left edge in frame 4."""
    shape, frames = (40, 60), []
    for t in range(6):
        labels = np.zeros(shape, np.uint16)
        next_label = iter(range(3 + 7 * t, 100, 2))  # other labels every frame, rising in the order drawn
        rod(shape, 2, 2 + 2 * t, 5, 14, next(next_label), labels)  # A
        if t <= 2:
            rod(shape, 12, 10, 5, 20 + t, next(next_label), labels)  # B, growing
        else:
            rod(shape, 12, 10, 5, 10 + t - 3, next(next_label), labels)  # B's daughters, apart by one pixel
            rod(shape, 12, 21 + t - 3, 5, 10, next(next_label), labels)
        if t <= 3:
            rod(shape, 22, 44 + 4 * t, 5, 12, next(next_label), labels)  # C, moving out (clipped at the edge)
        if t != 2:
            rod(shape, 32, 20, 5, 12, next(next_label), labels)  # D
        if t >= 4:
            rod(shape, 22, 0, 5, 4 + 3 * (t - 4), next(next_label), labels)  # E, coming in
        frames.append(labels)
    return frames


# track ids in order of appearance (within a frame, of the input labels): frame 0 gives A 1, B 2, C 3, D 4; frame 3 B's daughters 5, 6, D's return 7;
# frame 4 E 8
EXPECTED_TRACKS = [(1, 0, 5, 0), (2, 0, 2, 0), (3, 0, 3, 0), (4, 0, 1, 0), (5, 3, 5, 2), (6, 3, 5, 2), (7, 3, 5, 4),
                   (8, 4, 5, 0)]


def test_hand_built_sequence_gives_the_expected_tracks_and_maps():
    frames = hand_built_sequence()
    track_maps, tracks = track.link_tracks(frames)
    assert [tuple(row) for row in tracks] == EXPECTED_TRACKS
    for t, (labels, track_map) in enumerate(zip(frames, track_maps)):
        assert track_map.dtype == np.uint16
        assert ((track_map > 0) == (labels > 0)).all()
        assert track_map[3, 2 + 2 * t + 5] == 1  # A keeps its id
        if t <= 2:
            assert track_map[13, 12] == 2
        else:
            assert track_map[13, 12] == 5 and track_map[13, 24] == 6
        if t <= 3:
            assert track_map[23, 45 + 4 * t] == 3 and (t < 3 or (track_map == 3).sum() == 5 * 4)
        assert track_map[33, 25] == {0: 4, 1: 4, 2: 0}.get(t, 7)
        if t >= 4:
            assert track_map[23, 1] == 8


def test_track_statistics_of_the_hand_built_sequence():
    track_maps, tracks = track.link_tracks(hand_built_sequence())
    table = track.track_statistics(track_maps, tracks).set_index("track_id")
    assert list(table["divided"]) == [False, True, False, False, False, False, False, False]
    assert list(table["generation"]) == [0, 0, 0, 0, 1, 1, 0, 0]  # D's continuation after the gap stays gen 0
    assert table.loc[2, "area_birth"] == 5 * 20 and table.loc[2, "area_end"] == 5 * 22
    assert table.loc[5, "area_birth"] == 50 and table.loc[5, "area_end"] == 60
    assert np.isclose(table.loc[1, "growth_rate"], 0)  # A keeps its size
    # B: areas 100, 105, 110 -> the least-squares slope of log(area)
    assert np.isclose(table.loc[2, "growth_rate"], np.polyfit([0, 1, 2], np.log([100, 105, 110]), 1)[0])
    assert np.isnan(table.loc[8, "growth_rate"]) or table.loc[8, "frames"] == 2
    # a 5 x 20 rectangle: variance of 20 uniform columns (20^2 - 1) / 12 along its long axis
    assert np.isclose(table.loc[2, "length_birth"], 4 * np.sqrt((20 ** 2 - 1) / 12))


def test_daughters_pushed_apart_and_a_sliding_neighbour_are_not_confused():
    """A cell that merely slides half its length past where another was is a continuation, not a division."""
    shape = (20, 60)
    first = rod(shape, 2, 10, 5, 20, 1)
    rod(shape, 8, 10, 5, 20, 2, first)
    second = rod(shape, 2, 18, 5, 20, 1)  # cell 1 slid 8 px
    rod(shape, 8, 10, 5, 20, 2, second)
    _, tracks = track.link_tracks([first, second])
    assert [tuple(row) for row in tracks] == [(1, 0, 1, 0), (2, 0, 1, 0)]


def run_track(*args):
    """track.py's main in this process (a subprocess would spend seconds importing torch): (exit status, the error
    line that sys.exit prints, or "")."""
    try:
        track.main([str(a) for a in args])
    except SystemExit as stop:
        return (1, str(stop.code)) if isinstance(stop.code, str) else (stop.code, "")
    return 0, ""


def test_track_py_writes_the_ctc_result(tmp_path):
    labels = tmp_path / "pred"
    labels.mkdir()
    for t, frame in enumerate(hand_built_sequence()):  # our predictions' names, in an arbitrary write order
        tifffile.imwrite(labels / f"t{t:04d}_256.tif", frame)
    assert run_track("--labels", labels, "--out_dir", tmp_path / "res") == (0, "")
    assert sorted(os.listdir(tmp_path / "res")) == ["drift.csv"] + [f"mask{t:03d}.tif" for t in range(6)] + [
        "res_track.txt", "tracks.csv"]
    assert [tuple(row) for row in read_tracks(str(tmp_path / "res" / "res_track.txt"))] == EXPECTED_TRACKS
    assert (tmp_path / "res" / "res_track.txt").read_text().splitlines()[4] == "5 3 5 2"
    assert list(pd.read_csv(tmp_path / "res" / "tracks.csv").columns) == track.TRACK_COLUMNS
    assert tifffile.imread(tmp_path / "res" / "mask003.tif")[13, 24] == 6
    status, error = run_track("--labels", labels, "--out_dir", tmp_path / "res")
    assert status == 1 and "already exists" in error
    # upscaled to a native size: the same lineage, maps at that size
    assert run_track("--labels", labels, "--out_dir", tmp_path / "big", "--out_size", 80, 120)[0] == 0
    assert tifffile.imread(tmp_path / "big" / "mask000.tif").shape == (80, 120)
    assert [tuple(row) for row in read_tracks(str(tmp_path / "big" / "res_track.txt"))] == EXPECTED_TRACKS


@pytest.mark.parametrize("case, message", [
    ("empty", "no instance maps"),
    ("gap", "gap in the frame numbering, no frame 2"),
    ("sizes", "frame size (30, 40) differs from (40, 60)"),
    ("float", "must be integers, got dtype float32"),
    ("mixed", "more than one kind of name"),
])
def test_track_py_bad_input_one_line_and_nothing_written(tmp_path, case, message):
    labels = tmp_path / "labels"
    labels.mkdir()
    frames = {t: f for t, f in enumerate(hand_built_sequence()[:4])}
    if case == "gap":
        del frames[2]
    if case == "sizes":
        frames[3] = frames[3][:30, :40]
    if case == "float":
        frames[1] = frames[1].astype(np.float32)
    if case != "empty":
        for t, frame in frames.items():
            tifffile.imwrite(labels / f"man_seg{t:03d}.tif", frame)
    if case == "mixed":
        tifffile.imwrite(labels / "mask004.tif", frames[0])
    status, error = run_track("--labels", labels, "--out_dir", tmp_path / "out" / "res")
    assert status == 1 and "\n" not in error
    assert error.startswith(f"error: {labels}") and message in error, error
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_track_py_command_line_error(tmp_path):
    """The real command line: one `error:` line on stderr, exit status 1."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "track.py"), "--labels", str(tmp_path / "none"),
                             "--out_dir", str(tmp_path / "res")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == f"error: {tmp_path / 'none'}: label folder does not exist\n"
    assert not os.path.exists(tmp_path / "res")


@pytest.fixture(scope="module")
def simulated_ctc(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctc")
    summary = simulate.write_dataset(str(root), n_sequences=2, n_frames=40, size=(96, 128), seed=5, n_without_gt=1,
                                     layout="ctc")
    return root, summary


def test_simulator_writes_the_ctc_layout_readable_by_the_pipeline(simulated_ctc):
    root, summary = simulated_ctc
    assert sorted(os.listdir(root)) == ["01", "01_GT", "02"]
    assert sorted(os.listdir(root / "01_GT")) == ["SEG", "TRA"]
    assert os.listdir(root / "01")[0].startswith("t0") and len(os.listdir(root / "01")) == 40
    assert (root / "01" / "t039.tif").is_file() and (root / "01_GT" / "SEG" / "man_seg039.tif").is_file()
    assert (root / "01_GT" / "TRA" / "man_track039.tif").is_file()
    frames = list_frames(str(root), "01", with_masks=True)
    assert [f.number for f in frames] == list(range(40))
    from dataset import labelled_frames  # the frames training reads
    assert len(labelled_frames(str(root), ["01"])) == 40
    # the challenge layout of the same seed holds the same cells
    other = root.parent / "challenge"
    simulate.write_dataset(str(other), n_sequences=1, n_frames=40, size=(96, 128), seed=5, n_without_gt=0)
    for t in (0, 39):
        np.testing.assert_array_equal(tifffile.imread(other / "a_GT" / f"man_seg{t:04d}.tif"),
                                      tifffile.imread(root / "01_GT" / "TRA" / f"man_track{t:03d}.tif"))


def test_simulator_tra_ground_truth_is_valid_and_follows_the_lineage(simulated_ctc):
    from ctc_metrics.metrics import valid
    root, summary = simulated_ctc
    tra = root / "01_GT" / "TRA"
    masks = sorted(str(tra / name) for name in os.listdir(tra) if name.endswith(".tif"))
    tracks = read_tracks(str(tra / "man_track.txt"))
    present = [sorted(set(np.unique(tifffile.imread(m)).tolist()) - {0}) for m in masks]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # py-ctcmetrics warns about each rule a file breaks
        assert valid(masks, tracks, present) == 1
    children = np.bincount(tracks[:, 3], minlength=tracks[:, 0].max() + 1)
    assert (children[1:] <= 2).all() and (children == 2).sum() >= 5
    for label, begin, end, parent in tracks:
        assert label in present[begin] and label in present[end]
        if parent:
            assert tracks[tracks[:, 0] == parent][0, 2] == begin - 1  # a track ends where its daughters begin


def test_tracking_the_simulated_ground_truth_scores_tra_one(simulated_ctc, tmp_path):
    from eval import ctc_scores
    root, _ = simulated_ctc
    assert run_track("--labels", root / "01_GT" / "SEG", "--out_dir", tmp_path / "01_RES") == (0, "")
    scores = ctc_scores(str(tmp_path / "01_RES"), str(root / "01_GT"))
    assert scores["TRA"] > 0.99 and scores["SEG"] == 1 and scores["DET"] == 1
    assert scores["tp_div(0)"] == scores["gt_divisions"] > 0 and scores["fp_div(0)"] == 0


# ------------------------------------------------------------------------------------------ detection scores at IoU

def test_iou_counts_and_scores_equal_hand_computed_values():
    gt = np.zeros((10, 20), np.uint16)
    gt[0:4, 0:5] = 1  # 20 px
    gt[0:4, 10:15] = 2  # 20 px
    gt[6:10, 0:5] = 3  # 20 px, missed
    pred = np.zeros_like(gt)
    pred[0:4, 0:4] = 8  # IoU with 1: 16 / 20 = 0.8
    pred[0:4, 12:17] = 9  # IoU with 2: 12 / 28 = 0.4286
    pred[6:8, 10:12] = 4  # nothing there
    counts = iou_counts(gt, pred, IOU_THRESHOLDS)
    expected_tp = [1 if t < 0.8 else 0 for t in IOU_THRESHOLDS]  # IoU > t, strictly
    assert counts[:, 0].tolist() == expected_tp
    assert (counts[:, 1] == 3 - counts[:, 0]).all() and (counts[:, 2] == 3 - counts[:, 0]).all()
    scores = detection_scores(*counts[0])
    assert np.isclose(scores["precision"], 1 / 3) and np.isclose(scores["recall"], 1 / 3)
    assert np.isclose(scores["f1"], 1 / 3) and np.isclose(scores["ap"], 1 / 5)
    assert np.isclose(mean_ap(counts), (6 * 1 / 5 + 4 * 0) / 10)  # 0.5 .. 0.75 match, 0.8 .. 0.95 do not
    assert iou_counts(gt, pred, [0.4])[0].tolist() == [2, 1, 1]  # below 0.5: the assignment takes both
    empty = np.zeros_like(gt)
    assert detection_scores(*iou_counts(empty, empty)[0])["ap"] == 1.0
    assert detection_scores(*iou_counts(gt, empty)[0])["precision"] == 0.0


def test_low_threshold_matching_is_one_to_one():
    """Below IoU 0.5 one prediction can overlap two GT cells enough: the assignment still pairs it once."""
    gt = np.zeros((4, 12), np.uint16)
    gt[:, 0:4], gt[:, 4:8], gt[:, 8:12] = 1, 2, 3
    pred = np.zeros_like(gt)
    pred[:, 2:8] = 5  # IoU 2/8 with 1, 4/6 with 2
    pred[:, 8:12] = 6
    assert iou_counts(gt, pred, [0.2])[0].tolist() == [2, 0, 1]


def test_lineage_and_tracks_pictures(tmp_path):
    import matplotlib.pyplot as plt
    import pictures
    tracks = np.array([(1, 0, 5, 0), (2, 0, 2, 0), (3, 0, 3, 0), (4, 0, 1, 0), (5, 3, 5, 2), (6, 3, 5, 2),
                       (7, 3, 5, 4), (8, 4, 5, 0)])
    assert pictures.lineage_order(tracks) == [1, 2, 5, 6, 3, 4, 7, 8]  # daughters right below their mother
    labels = tmp_path / "labels"
    labels.mkdir()
    for t, frame in enumerate(hand_built_sequence()):
        tifffile.imwrite(labels / f"man_seg{t:03d}.tif", frame)
    assert run_track("--labels", labels, "--out_dir", tmp_path / "res")[0] == 0
    pictures.lineage_picture(str(tmp_path / "res"), str(tmp_path / "lineage.png"))
    pictures.tracks_picture(str(tmp_path / "res"), [0, 3], str(tmp_path / "tracks.png"))
    assert plt.imread(tmp_path / "lineage.png").shape[0] > 200 and plt.imread(tmp_path / "tracks.png").shape[1] > 400
    colours = pictures.track_colours(8)
    assert colours.shape == (9, 3) and (colours[0] == 0).all() and len({tuple(c) for c in colours}) == 9
    with pytest.raises(pictures.DataError, match="no result mask of frame 9"):
        pictures.tracks_picture(str(tmp_path / "res"), [0, 9], str(tmp_path / "none.png"))


@pytest.mark.slow
def test_track_sh_runs_without_slurm(tmp_path):
    """bash track.sh on the machine at hand: every sequence folder of PRED_DIR tracked into TRACK_DIR/<seq>_RES."""
    for seq in ("c", "d"):
        (tmp_path / "pred" / seq).mkdir(parents=True)
        for t, frame in enumerate(hand_built_sequence()):
            tifffile.imwrite(tmp_path / "pred" / seq / f"t{t:04d}_256.tif", frame)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(PRED_DIR=str(tmp_path / "pred"), TRACK_DIR=str(tmp_path / "track"), VENV=sys.prefix)
    result = subprocess.run(["bash", os.path.join(ROOT, "track.sh")], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for seq in ("c", "d"):
        tracks = read_tracks(str(tmp_path / "track" / f"{seq}_RES" / "res_track.txt"))
        assert [tuple(row) for row in tracks] == EXPECTED_TRACKS


@pytest.mark.slow
def test_track_sh_takes_a_folder_with_a_space_and_names_an_empty_pred_dir(tmp_path):
    """A sequence folder named `my seq` is one sequence; an empty PRED_DIR gets a message, not a silent exit 1."""
    (tmp_path / "pred" / "my seq").mkdir(parents=True)
    for t, frame in enumerate(hand_built_sequence()):
        tifffile.imwrite(tmp_path / "pred" / "my seq" / f"t{t:04d}_256.tif", frame)
    (tmp_path / "empty").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(PRED_DIR=str(tmp_path / "pred"), TRACK_DIR=str(tmp_path / "track"), VENV=sys.prefix)
    result = subprocess.run(["bash", os.path.join(ROOT, "track.sh")], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    tracks = read_tracks(str(tmp_path / "track" / "my seq_RES" / "res_track.txt"))
    assert [tuple(row) for row in tracks] == EXPECTED_TRACKS
    env.update(PRED_DIR=str(tmp_path / "empty"))
    result = subprocess.run(["bash", os.path.join(ROOT, "track.sh")], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and f"error: {tmp_path / 'empty'}: no sequence folder to track" in result.stderr


def test_eval_adds_detection_columns_and_a_pooled_line_per_sequence(tmp_path, capsys):
    import eval as evaluation
    from conftest import write_dataset
    root = write_dataset(tmp_path / "data", sequences=("c",), unlabelled=(), frames=2)
    pred = tmp_path / "pred" / "c"
    pred.mkdir(parents=True)
    for t in range(2):
        gt = tifffile.imread(os.path.join(root, "c_GT", f"man_seg{t:04d}.tif"))
        if t == 1:
            gt[gt == gt.max()] = 0  # one cell missed in frame 1
        tifffile.imwrite(pred / f"t{t:04d}_256.tif", gt)  # scored at the prediction's size: GT resized to it
    mean = evaluation.main(["--pred_dir", str(tmp_path / "pred"), "--root_dir", root])
    table = pd.read_csv(tmp_path / "pred" / "instance_dice.csv")
    assert list(table["ap50"]) == [1.0, 5 / 6] and list(table["tp95"]) == [6, 5]  # 6 cells a frame (blob_frame)
    assert np.allclose(table["map"], [1.0, 5 / 6]) and np.allclose(table["recall50"], [1.0, 5 / 6])
    assert list(table["precision50"]) == [1.0, 1.0]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"Mean Instance Dice: {mean:.6f}"
    # pooled over the two frames: 11 of 12 cells found, none false
    assert "precision 1.0000, recall 0.9167, F1 0.9565, AP 0.9167; mean AP 0.5:0.95 0.9167" in lines[0]


def test_eval_ctc_mode_refuses_an_incomplete_result(tmp_path, simulated_ctc):
    import eval as evaluation
    root, _ = simulated_ctc
    (tmp_path / "res").mkdir()
    with pytest.raises(SystemExit) as stop:
        evaluation.main(["--ctc_res", str(tmp_path / "res"), "--ctc_gt", str(root / "01_GT")])
    assert str(stop.value.code) == f"error: {tmp_path / 'res' / 'res_track.txt'}: missing (a CTC result folder has one)"


def test_assignment_takes_the_most_pairs_then_the_highest_iou():
    # a-0 is the best single pair, but taking it leaves b and c without a partner: a-1, b-0, c-2 pairs all three
    pair_a = np.array([0, 0, 1, 2, 2])
    pair_b = np.array([0, 1, 0, 1, 2])
    iou = np.array([0.95, 0.2, 0.15, 0.9, 0.15])
    chosen = sorted(zip(*track.assign(pair_a, pair_b, iou)))
    assert chosen == [(0, 1), (1, 0), (2, 2)]
    # with a free alternative the higher IoU wins
    assert sorted(zip(*track.assign(np.array([0, 0, 1]), np.array([0, 1, 1]), np.array([0.9, 0.5, 0.8])))) == \
        [(0, 0), (1, 1)]
    assert len(track.assign(np.array([0]), np.array([0]), np.array([0.05]))[0]) == 0  # below MIN_IOU


def test_native_maps_win_over_the_256_copies_that_inference_writes_beside_them(tmp_path):
    """inference.py --native writes t0000_256.tif and mask0000.tif side by side: the frame-size maps are linked."""
    labels = tmp_path / "pred"
    labels.mkdir()
    for t, frame in enumerate(hand_built_sequence()):
        tifffile.imwrite(labels / f"mask{t:04d}.tif", frame)
        tifffile.imwrite(labels / f"t{t:04d}_256.tif", np.zeros((256, 256), np.uint16))  # would give no track at all
    assert run_track("--labels", labels, "--out_dir", tmp_path / "res") == (0, "")
    assert [tuple(row) for row in read_tracks(str(tmp_path / "res" / "res_track.txt"))] == EXPECTED_TRACKS
