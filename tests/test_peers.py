"""The peer (Cellpose 3, peer_cellpose.py) in benchmark_real.py: its masks go through our conversion and scoring; the
pieces of the side-by-side table. None of these needs Cellpose installed."""
import doctest
import json
import os

import numpy as np
import pytest
import tifffile

import benchmark_real
import metrics
import peer_cellpose
from conftest import write_dataset
from data_files import list_frames, prediction_name, read_mask
from eval import evaluate, sequence_scores


def write_native_predictions(root, pred_dir, transform=lambda labels: labels):
    """Cellpose-style output: one label TIFF per test frame at the frame's own size, written as peer_cellpose does."""
    os.makedirs(os.path.join(pred_dir, "c"), exist_ok=True)
    for frame in list_frames(root, "c", with_masks=True):
        peer_cellpose.write_labels_atomically(
            os.path.join(pred_dir, "c", peer_cellpose.native_prediction_name(frame.number)),
            transform(read_mask(frame.mask_path)))


def test_ground_truth_through_the_peer_path_scores_one(tmp_path):
    root, pred_dir = str(tmp_path / "data"), str(tmp_path / "pred")
    write_dataset(root, frames=3, shape=(60, 76))
    write_native_predictions(root, pred_dir, lambda labels: labels.astype(np.uint32) * 7)  # other ids, other dtype
    benchmark_real.write_score_size_predictions(pred_dir)
    assert sorted(os.listdir(os.path.join(pred_dir, "c"))) == sorted(
        [prediction_name(n) for n in range(3)] + [prediction_name(n, native=True) for n in range(3)])
    assert tifffile.imread(os.path.join(pred_dir, "c", prediction_name(0))).shape == (256, 256)
    assert benchmark_real.test_scores(pred_dir, root) == {"dice_256": 1.0, "dice_native": 1.0, "ap50_256": 1.0,
                                                          "ap50_native": 1.0}


def test_a_missed_cell_costs_the_peer_what_it_costs_us(tmp_path):
    root, pred_dir = str(tmp_path / "data"), str(tmp_path / "pred")
    write_dataset(root, frames=2, shape=(60, 76))
    write_native_predictions(root, pred_dir, lambda labels: np.where(labels == 1, 0, labels))
    benchmark_real.write_score_size_predictions(pred_dir)
    scores = benchmark_real.test_scores(pred_dir, root)
    masks = [read_mask(f.mask_path) for f in list_frames(root, "c", with_masks=True)]
    counts = [len(np.unique(m)) - 1 for m in masks]
    # each frame: n - 1 matches of Dice 1 among n entries; AP pooled: (N - 2) / N
    assert scores["dice_native"] == pytest.approx(np.mean([(n - 1) / n for n in counts]))
    assert scores["ap50_native"] == pytest.approx((sum(counts) - 2) / sum(counts))


def test_the_peer_names_its_masks_as_inference_does():
    for number in (0, 7, 42, 1234):
        assert peer_cellpose.native_prediction_name(number) == prediction_name(number, native=True)


def test_pooled_ap_known_answers_and_eval_agrees(tmp_path):
    assert doctest.testmod(metrics).failed == 0
    gt = np.zeros((20, 20), np.uint16)
    gt[2:8, 2:8], gt[10:18, 10:18], gt[2:6, 12:18] = 1, 2, 3
    shifted = np.zeros_like(gt)
    shifted[2:8, 4:10] = 1  # IoU 24/48 = 0.5: not above 0.5, a miss and a false positive
    shifted[10:18, 10:18] = 2
    assert metrics.pooled_ap([(gt, shifted)]) == pytest.approx(1 / 4)  # TP 1, FP 1, FN 2
    assert metrics.pooled_ap([(gt, shifted)], threshold=0.4) == pytest.approx(2 / 3)
    # the same pooling as eval.py's line per sequence
    root, pred_dir = str(tmp_path / "data"), str(tmp_path / "pred")
    write_dataset(root, frames=3, shape=(60, 76), seed=3)
    write_native_predictions(root, pred_dir, lambda labels: np.where(labels % 3 == 0, 0, labels))
    pairs = [(read_mask(f.mask_path), read_mask(os.path.join(pred_dir, "c", prediction_name(f.number, True))))
             for f in list_frames(root, "c", with_masks=True)]
    assert metrics.pooled_ap(pairs) == pytest.approx(sequence_scores(evaluate(pred_dir, root, ["c"], True))["ap50"])


def test_checkpoints_chosen_at_the_budgets_every_n_epochs_and_the_last():
    checkpoints = [{"epochs": e, "cpu_seconds": 12.0 * e} for e in (11, 21, 31, 41, 51, 61, 71, 81, 91, 101, 105)]
    chosen = benchmark_real.chosen_checkpoints(checkpoints, reference_cpu=200.0, every=50)
    # budgets 200, 400, 800 CPU-s -> epochs 21 (252), 41 (492), 71 (852); every 50 -> 51, 101; the last, 105
    assert [c["epochs"] for c in chosen] == [21, 41, 51, 71, 101, 105]
    assert [c["epochs"] for c in benchmark_real.chosen_checkpoints(checkpoints, None, 0)] == [105]


def test_cellpose_at_equal_cpu_interpolates_between_its_checkpoints():
    rows = [{"dataset": "d", "recipe": "cellpose (11 epochs)", "cpu_seconds": 100.0, "dice_256": 0.2},
            {"dataset": "d", "recipe": "cellpose (21 epochs)", "cpu_seconds": 300.0, "dice_256": 0.6},
            {"dataset": "d", "recipe": "patches", "cpu_seconds": 250.0, "dice_256": 0.9},
            {"dataset": "d", "recipe": "early", "cpu_seconds": 50.0, "dice_256": 0.4},
            {"dataset": "e", "recipe": "patches", "cpu_seconds": 250.0, "dice_256": 0.9},
            {"dataset": "d", "recipe": "ceiling", "dice_256": 0.97}]
    benchmark_real.add_cellpose_at_equal_cpu(rows)
    assert rows[2]["cellpose_at_equal_cpu"] == pytest.approx(0.5)
    assert rows[2]["ahead_of_cellpose"] == pytest.approx(0.4)
    assert all("ahead_of_cellpose" not in row for row in rows[3:])  # outside Cellpose's range, no peer, no training


def test_results_block_replaced_and_the_rest_of_the_file_kept(tmp_path):
    path = str(tmp_path / "results.md")
    benchmark_real.write_results_block(path, "first table")
    assert open(path).read() == f"{benchmark_real.RESULTS_START}\nfirst table\n{benchmark_real.RESULTS_END}\n"
    with open(path, "w") as file:
        file.write(f"# Results\n\nintro\n\n{benchmark_real.RESULTS_START}\nold\n{benchmark_real.RESULTS_END}\n\nafter\n")
    benchmark_real.write_results_block(path, "new table\n")
    assert open(path).read() == (f"# Results\n\nintro\n\n{benchmark_real.RESULTS_START}\nnew table\n"
                                 f"{benchmark_real.RESULTS_END}\n\nafter\n")
    with open(path, "w") as file:
        file.write("# Results without markers\n")
    benchmark_real.write_results_block(path, "t")
    assert open(path).read() == (f"# Results without markers\n\n{benchmark_real.RESULTS_START}\nt\n"
                                 f"{benchmark_real.RESULTS_END}\n")


def test_results_markdown_lists_every_row_with_its_command():
    rows = [{"dataset": "trpL", "recipe": "patches", "dice_256": 0.9, "dice_native": 0.89, "ap50_256": 0.8,
             "ap50_native": 0.81, "cpu_seconds": 761.0, "ahead_of_cellpose": 0.25, "command": "python train.py x",
             "data": "runs/d", "machine": "2-core CPU"},
            {"dataset": "trpL", "recipe": "ceiling", "dice_256": 0.97}]
    text = benchmark_real.results_markdown(rows)
    assert "| patches | 0.9000 | 0.8900 | 0.8000 | 0.8100 | 761 | +0.250 |" in text
    assert "| ceiling | 0.9700 | — | — | — | — | — |" in text
    assert "- patches: `python train.py x`" in text and "Machine: 2-core CPU." in text
    # a row measured on another machine is marked, and the machines named
    rows.append({**rows[0], "recipe": "faithful", "machine": "16-core CPU", "cpu_seconds": 3000.0})
    text = benchmark_real.results_markdown(rows)
    assert "Machines: 2-core CPU; ¹ 16-core CPU (rows marked so)." in text
    assert "| faithful ¹ | 0.9000 |" in text and "| patches | 0.9000 |" in text


def test_the_results_page_shows_the_committed_table():
    """docs/results.md's block is drawn from docs/benchmark_real.json, the rows kept in the repository: an edit by hand
    of either, or a table that lost its rows, shows here."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "benchmark_real.json")) as file:
        rows = json.load(file)
    with open(os.path.join(root, "docs", "results.md")) as file:
        block = file.read().split(benchmark_real.RESULTS_START)[1].split(benchmark_real.RESULTS_END)[0]
    assert block.strip() == benchmark_real.results_markdown(rows).strip()
    assert {"trpL", "usiigaci", "simulated"} <= {row["dataset"] for row in rows}
    assert all(any(r["dataset"] == dataset and r["recipe"].startswith("cellpose") for r in rows)
               for dataset in ("trpL", "usiigaci", "simulated"))


def test_merged_rows_replace_reruns_and_keep_the_rest():
    old = [{"dataset": "a", "recipe": "patches", "v": 1}, {"dataset": "a", "recipe": "ceiling", "v": 2}]
    new = [{"dataset": "a", "recipe": "patches", "v": 3}, {"dataset": "b", "recipe": "patches", "v": 4}]
    assert [r["v"] for r in benchmark_real.merge_rows(old, new)] == [2, 3, 4]


def test_plot_has_a_panel_per_dataset(tmp_path):
    rows = [{"dataset": d, "recipe": r, "dice_256": s, "cpu_seconds": c} for d in ("x", "y")
            for r, s, c in (("cellpose (11 epochs)", 0.1, 100.0), ("cellpose (21 epochs)", 0.5, 200.0),
                            ("patches", 0.9, 150.0))] + [{"dataset": "x", "recipe": "ceiling", "dice_256": 0.97}]
    rows[0]["machine"] = "one CPU"
    rows.append({"dataset": "x", "recipe": "patches e480", "dice_256": 0.95, "cpu_seconds": 900.0, "machine": "other"})
    path = str(tmp_path / "race.png")
    benchmark_real.plot_race(rows, path)
    image = __import__("matplotlib.image", fromlist=["imread"]).imread(path)
    assert image.shape[1] == pytest.approx(2 * 4.5 * 110, abs=2)


def test_peer_training_refuses_frames_that_min_train_masks_would_all_drop(tmp_path, capsys):
    root = str(tmp_path / "data")
    write_dataset(root, frames=2, shape=(60, 76))  # six cells a frame
    counts = [len(np.unique(read_mask(f.mask_path))) - 1 for f in list_frames(root, "a", with_masks=True)]
    with pytest.raises(SystemExit) as exit_info:
        peer_cellpose.main(["train", "--root_dir", root, "--out_dir", str(tmp_path / "run"),
                            "--min_train_masks", str(max(counts) + 1)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {root}: every training frame has fewer than --min_train_masks")
    assert not os.path.exists(tmp_path / "run")


def test_peer_reports_a_frame_without_its_mask(tmp_path, capsys):
    root = str(tmp_path / "data")
    write_dataset(root, frames=2, shape=(60, 76))
    os.remove(os.path.join(root, "a_GT", "man_seg0001.tif"))
    with pytest.raises(SystemExit):
        peer_cellpose.main(["train", "--root_dir", root, "--out_dir", str(tmp_path / "run")])
    assert capsys.readouterr().err.strip() == (f"error: {os.path.join(root, 'a', 't0001.tif')}: no mask "
                                               "man_seg0001.tif in a_GT")


def test_peer_checkpoint_record_is_read_by_the_benchmark(tmp_path):
    """A finished peer run (checkpoints.json) is reused, not retrained."""
    run = tmp_path / "cellpose" / "run"
    run.mkdir(parents=True)
    record = {"checkpoints": [{"epochs": 11, "model": "models/cellpose_epoch_0010", "cpu_seconds": 130.0,
                               "wall_seconds": 140.0}]}
    (run / "checkpoints.json").write_text(json.dumps(record))
    original = benchmark_real.cellpose_python
    benchmark_real.cellpose_python = lambda log_dir: "/nonexistent/python"
    try:
        checkpoints, command = benchmark_real.train_cellpose("data", str(tmp_path / "cellpose"), 0)
    finally:
        benchmark_real.cellpose_python = original
    assert checkpoints == record["checkpoints"]
    assert "peer_cellpose.py train --root_dir data --train_seqs a --test_seqs b" in command


def test_simulated_dataset_has_train_select_and_test_sequences_with_masks(tmp_path):
    root = benchmark_real.prepare("unused", "simulated", str(tmp_path))
    for sequence in "abc":
        frames = list_frames(root, sequence, with_masks=True)
        assert len(frames) == 20 and read_mask(frames[-1].mask_path).shape == (256, 256)
    assert sorted(os.listdir(tmp_path)) == ["simulated"]  # nothing half-written left beside it
    stamp = os.stat(os.path.join(root, "a", "t0000.tif")).st_mtime_ns
    assert benchmark_real.prepare("unused", "simulated", str(tmp_path)) == root  # reused, not rewritten
    assert os.stat(os.path.join(root, "a", "t0000.tif")).st_mtime_ns == stamp


def test_an_interrupted_prediction_is_not_taken_for_a_whole_one(tmp_path):
    root, pred_dir = str(tmp_path / "data"), str(tmp_path / "pred")
    write_dataset(root, frames=3, shape=(60, 76))
    assert not benchmark_real.predicted_every_frame(pred_dir, root)
    write_native_predictions(root, pred_dir)
    assert benchmark_real.predicted_every_frame(pred_dir, root)
    os.remove(os.path.join(pred_dir, "c", prediction_name(2, native=True)))
    assert not benchmark_real.predicted_every_frame(pred_dir, root)


def test_spread_subsets_sample_the_whole_training_sequence():
    assert doctest.testmod(benchmark_real).failed == 0
    assert benchmark_real.spread(8, 30) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert benchmark_real.spread(5, 5) == [0, 1, 2, 3, 4]


def test_a_learning_curve_subset_keeps_the_chosen_training_frames_and_every_other_frame(tmp_path):
    root = write_dataset(str(tmp_path / "data"), frames=6, shape=(40, 44))
    subset = benchmark_real.prepare_subset(root, 2)
    assert subset == root + "_2frames" and not os.path.exists(subset + ".partial")
    images = lambda r, s: [tifffile.imread(f.image_path) for f in list_frames(r, s, with_masks=True)]
    kept, whole = images(subset, "a"), images(root, "a")
    assert len(kept) == 2 and np.array_equal(kept[0], whole[0]) and np.array_equal(kept[1], whole[5])
    for sequence in "bc":
        assert all(np.array_equal(x, y) for x, y in zip(images(subset, sequence), images(root, sequence)))
        assert len(images(subset, sequence)) == 6
    assert benchmark_real.training_frames(subset) == 2


def test_learning_curve_rows_get_their_own_table_and_plot_and_stay_out_of_the_race(tmp_path):
    rows = [{"dataset": "u", "recipe": "fine_tuned", "train_frames": 30, "dice_256": 0.7, "cpu_seconds": 900.0},
            {"dataset": "u", "recipe": "fine_tuned (1 frames)", "train_frames": 1, "subset": True, "dice_256": 0.4,
             "cpu_seconds": 500.0, "command": "python train.py one"},
            {"dataset": "u", "recipe": "cellpose (41 epochs)", "train_frames": 30, "dice_256": 0.62,
             "cpu_seconds": 1300.0, "epochs": 41},
            {"dataset": "u", "recipe": "cellpose (21 epochs)", "train_frames": 30, "dice_256": 0.46,
             "cpu_seconds": 690.0, "epochs": 21},
            {"dataset": "u", "recipe": "cellpose (1 frames, 500 epochs)", "train_frames": 1, "subset": True,
             "dice_256": 0.3, "cpu_seconds": 480.0, "epochs": 500}]
    curves = benchmark_real.learning_curve(rows, "u")
    assert {tool: [(f, r["dice_256"]) for f, r in points] for tool, points in curves.items()} == {
        "fine_tuned": [(1, 0.4), (30, 0.7)], "Cellpose 3 (from scratch)": [(1, 0.3), (30, 0.62)]}
    # a longer run of the recipe (--variant e40) is a point of the race, not the all-frames point of the curve
    longer = rows + [{"dataset": "u", "recipe": "fine_tuned e40", "train_frames": 30, "dice_256": 0.75,
                      "cpu_seconds": 2400.0, "epochs": 40}]
    assert [r["dice_256"] for _, r in benchmark_real.learning_curve(longer, "u")["fine_tuned"]] == [0.4, 0.7]
    benchmark_real.add_cellpose_at_equal_cpu(rows)
    # all frames against Cellpose on all frames (690 -> 0.46, 1300 -> 0.62); one frame only against one frame's
    assert rows[0]["cellpose_at_equal_cpu"] == pytest.approx(0.46 + 0.16 * 210 / 610)
    assert "cellpose_at_equal_cpu" not in rows[1]  # 500 CPU-s is outside the one-frame peer's only point (480)
    elsewhere = [{**rows[0], "machine": "another CPU"}] + rows[2:4]
    benchmark_real.add_cellpose_at_equal_cpu(elsewhere)
    assert "ahead_of_cellpose" not in elsewhere[0]  # CPU-seconds of two machines are not compared
    text = benchmark_real.results_markdown(rows)
    main_table = text.split("Learning curve")[0]
    assert "(1 frames" not in main_table and "| 1 | fine_tuned | 0.4000 |" in text
    assert "| 30 | Cellpose 3 (from scratch) | 0.6200 |" in text and "- fine_tuned (1 frames): `python train.py one`" in text
    path = str(tmp_path / "curve.png")
    benchmark_real.plot_learning_curves(rows, path)
    assert __import__("matplotlib.image", fromlist=["imread"]).imread(path).shape[1] == pytest.approx(4.5 * 110, abs=2)


def test_rescore_predicts_again_as_the_row_was_scored_and_keeps_its_training_figures(tmp_path):
    root = write_dataset(tmp_path / "data", sequences=("a", "c"), unlabelled=(), frames=2)
    pred_dir = str(tmp_path / "run" / "pred")
    width = benchmark_real.training_cell_width(root)
    inference = (f"python inference.py --root_dir {root} --seqs c --model models/bacteria_generalist.pt "
                 f"--pred_dir {pred_dir} --native --overwrite")
    trained = {"dataset": "x", "recipe": "patches", "dice_256": -1.0, "cpu_seconds": 123.0,
               "command": "python train.py --root_dir x", "inference_command": inference + " --cell_width 99.00"}
    row = benchmark_real.rescore(trained)
    # a model trained here is given the training frames' width, whatever width the command held
    assert row["inference_command"] == inference + f" --cell_width {width:.2f}"
    assert row["cpu_seconds"] == 123.0 and row["command"] == trained["command"]
    assert row["dice_256"] == benchmark_real.test_scores(pred_dir, root)["dice_256"] and 0 <= row["dice_256"] <= 1
    assert os.path.isfile(tmp_path / "run" / "inference.log")
    zero_shot = benchmark_real.rescore({"dataset": "x", "recipe": "zero_shot", "inference_command": inference})
    assert zero_shot["inference_command"] == inference  # the bundled model estimates the scale itself
