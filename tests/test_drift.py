"""Tracking through stage drift (track.py's registration): a simulated movie moved along a known path is registered
within 1 px and tracked with TRA >= 0.99 from its ground-truth masks for drifts of 0 to 60 px a frame (and without
registration it is not); trpL's ground-truth masks, whose colony moves up to 100 px a frame, give its lineage; the
warning; track.py's label and --out_size checks."""
import os
import shutil

import numpy as np
import pytest
import tifffile

import simulate
import track
from conftest import SHARED_REAL
from data_files import read_tracks


def drift_path(n_frames, step, seed=0):
    """(T, 2) integer offsets: a walk of `step` px a frame in x and step // 2 in y, each in a random direction, turned
    back at the edges of a box of 2 * step so that the movie stays in a canvas that size larger."""
    rng = np.random.default_rng(seed)
    offsets, position = [], np.array([step, step])
    step_size = np.array([step // 2, step])
    for t in range(n_frames):
        if t:
            move = step_size * rng.choice([-1, 1], 2)
            outside = (position + move < 0) | (position + move > 2 * step)
            move[outside] *= -1
            position = position + move
        offsets.append(position.copy())
    return np.array(offsets)


@pytest.fixture(scope="module")
def simulated_movie(tmp_path_factory):
    """One simulated 30-frame movie (96 x 128) with tracking ground truth, CTC layout."""
    root = tmp_path_factory.mktemp("sim")
    simulate.write_dataset(str(root), n_sequences=1, n_frames=30, size=(96, 128), seed=3, n_without_gt=0, layout="ctc")
    return root


def drifted_copy(root, out, offsets):
    """The ground truth of sequence 01 (SEG and TRA) moved frame by frame by `offsets` in a larger canvas."""
    margin = int(offsets.max()) + 1
    for kind in ("SEG", "TRA"):
        source, target = root / "01_GT" / kind, out / "01_GT" / kind
        target.mkdir(parents=True)
        for name in sorted(os.listdir(source)):
            if not name.endswith(".tif"):
                shutil.copy(source / name, target / name)
                continue
            frame = tifffile.imread(source / name)
            t = int(name[-7:-4])
            canvas = np.zeros((frame.shape[0] + margin, frame.shape[1] + margin), frame.dtype)
            dy, dx = offsets[t]
            canvas[dy:dy + frame.shape[0], dx:dx + frame.shape[1]] = frame
            tifffile.imwrite(target / name, canvas)
    return out / "01_GT"


@pytest.mark.parametrize("step", [0, 7, 25, 60])
def test_drifted_simulation_is_registered_and_tracked(simulated_movie, tmp_path, step):
    from eval import ctc_scores
    offsets = drift_path(30, step, seed=step)
    gt = drifted_copy(simulated_movie, tmp_path, offsets)
    label_maps = track.read_label_maps(track.find_label_files(str(gt / "SEG")))
    shifts = track.register_frames(label_maps)
    true_shifts = np.diff(offsets, axis=0, prepend=offsets[:1])
    assert np.abs(shifts - true_shifts).max() <= 1, np.abs(shifts - true_shifts).max()
    summary = track.track(str(gt / "SEG"), str(tmp_path / "res"))
    assert summary["warning"] is None
    scores = ctc_scores(str(tmp_path / "res"), str(gt))
    assert scores["TRA"] >= 0.99, scores["TRA"]
    assert scores["tp_div(0)"] == scores["gt_divisions"] > 0 and scores["fp_div(0)"] == 0
    drift = np.loadtxt(tmp_path / "res" / "drift.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(drift[:, 1:3], shifts)
    np.testing.assert_array_equal(drift[:, 3:5], np.cumsum(shifts, 0))


def test_without_registration_a_drifting_movie_falls_apart_and_is_warned_about(simulated_movie, tmp_path):
    from eval import ctc_scores
    gt = drifted_copy(simulated_movie, tmp_path, drift_path(30, 25, seed=25))
    summary = track.track(str(gt / "SEG"), str(tmp_path / "res"), register=False)
    assert summary["warning"] is not None and summary["warning"].startswith("warning: ")
    assert ctc_scores(str(tmp_path / "res"), str(gt))["TRA"] < 0.9


def test_trpl_ground_truth_gives_its_lineage(tmp_path):
    """2 founder cells; counted by eye in the masks (docs/your_movie.md): one division between frames 7 and 8, one
    between 9 and 10, four between 11 and 12, one between 14 and 15, seven between 15 and 16, one between 18 and 19:
    15 divisions, 17 cells in frame 19, no cell entering or leaving."""
    path = os.path.join(SHARED_REAL, "trpL", "trpL_150310-11_mask.tif")
    if not os.path.exists(path):
        pytest.skip(f"{path}: the real sample of ../shared/real is absent")
    masks = list(tifffile.imread(path))
    track_maps, tracks = track.link_tracks(masks, track.register_frames(masks))
    children = np.bincount(tracks[:, 3], minlength=len(tracks) + 1)[1:]
    founders = tracks[tracks[:, 3] == 0]
    assert len(founders) == 2 and (founders[:, 1] == 0).all()
    assert (children == 2).sum() == 15 and set(children) <= {0, 2}
    division_frames = sorted(tracks[children == 2, 2].tolist())
    assert division_frames == [7, 9, 11, 11, 11, 11, 14, 15, 15, 15, 15, 15, 15, 15, 18]
    assert len(np.unique(track_maps[-1])) - 1 == 17 and len(tracks) == 32
    assert track.linking_warning(tracks, 20) is None
    _, unregistered = track.link_tracks(masks)  # linked by overlap alone, the colony's drift breaks the lineage
    assert (unregistered[:, 3] == 0).sum() > 20 and track.linking_warning(unregistered, 20) is not None


def test_uint64_labels_beyond_int64_are_tracked(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    for t in range(3):
        frame = np.zeros((20, 30), np.uint64)
        frame[2:8, 2 + t:20 + t] = np.iinfo(np.uint64).max - 5
        frame[12:18, 2:20] = 2 ** 63 + 7
        tifffile.imwrite(labels / f"man_seg{t:03d}.tif", frame)
    summary = track.track(str(labels), str(tmp_path / "res"))
    assert summary["tracks"] == 2
    assert [tuple(row) for row in read_tracks(str(tmp_path / "res" / "res_track.txt"))] == [(1, 0, 2, 0), (2, 0, 2, 0)]


@pytest.mark.parametrize("sizes, message", [(["0"], "a side of 1 to 16384 px, got 0"),
                                            (["-5"], "a side of 1 to 16384 px, got -5"),
                                            (["1", "2", "3"], "one size S or two, H W; got 3"),
                                            (["100000"], "a side of 1 to 16384 px, got 100000"),
                                            (["x"], "not a whole number of pixels")])
def test_out_size_is_validated_with_a_usage_line(tmp_path, capsys, sizes, message):
    (tmp_path / "labels").mkdir()
    with pytest.raises(SystemExit) as stop:
        track.main(["--labels", str(tmp_path / "labels"), "--out_dir", str(tmp_path / "res"), "--out_size", *sizes])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "argument --out_size" in error and message in error, error
    assert not os.path.exists(tmp_path / "res")


def test_shift_of_a_hand_built_pair_is_found():
    before = np.zeros((60, 80), np.uint8)
    before[10:20, 10:40] = 1
    before[30:40, 20:50] = 2
    after = track.shifted(before, (7, -9))
    assert track.frame_shift(before, after).tolist() == [7, -9]
    assert track.frame_shift(before, np.zeros_like(before)).tolist() == [0, 0]  # nothing to register against


def test_track_py_takes_pred_dir_and_seqs_as_eval_and_pictures_do(tmp_path, capsys):
    for seq in ("c", "d"):
        (tmp_path / "pred" / seq).mkdir(parents=True)
        for t in range(3):
            frame = np.zeros((20, 30), np.uint16)
            frame[2:8, 2 + t:20 + t] = 5
            tifffile.imwrite(tmp_path / "pred" / seq / f"t{t:04d}_256.tif", frame)
    track.main(["--pred_dir", str(tmp_path / "pred"), "--seqs", "d", "--out_dir", str(tmp_path / "track")])
    assert os.listdir(tmp_path / "track") == ["d_RES"]
    assert [tuple(r) for r in read_tracks(str(tmp_path / "track" / "d_RES" / "res_track.txt"))] == [(1, 0, 2, 0)]
    track.main(["--pred_dir", str(tmp_path / "pred"), "--out_dir", str(tmp_path / "all")])
    assert sorted(os.listdir(tmp_path / "all")) == ["c_RES", "d_RES"]
    with pytest.raises(SystemExit) as stop:
        track.main(["--pred_dir", str(tmp_path / "pred"), "--seqs", "e", "--out_dir", str(tmp_path / "none")])
    assert stop.value.code == f"error: {tmp_path / 'pred'}: no sequence e (folders found: c, d); choose with --seqs"
    assert not os.path.exists(tmp_path / "none")
