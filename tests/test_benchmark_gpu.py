"""benchmark_gpu.sh in its smoke mode (tiny sizes) on whatever device there is: every figure of its JSON and table is
filled from the runs' own outputs (benchmark.py's old and new inference paths, the trainings' metrics, inference.py's
energy lines)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_smoke_mode_fills_every_figure(tmp_path):
    import torch

    root = write_dataset(tmp_path / "data", sequences=("a", "b"), unlabelled=(), frames=3, shape=(90, 110))
    env = dict(os.environ, PYTHON=sys.executable, SMOKE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", os.path.join(REPO, "benchmark_gpu.sh"), str(root), str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((tmp_path / "out" / "gpu_figures.json").read_text())
    sequence, large = (figures["inference_old_and_new"][name] for name in ("sequence", "large"))
    for summary, frames, shape in ((sequence, 3, [96, 96]), (large, 2, [72, 300])):
        old, new = summary["frame by frame (old)"], summary["batched (new)"]
        assert (old["frames"], old["frame_shape"], old["batch_size"], new["batch_size"]) == (frames, shape, 1, 2)
        assert all(path[key] > 0 for path in (old, new) for key in
                   ("end_to_end_frames_per_s", "model_frames_per_s", "postprocessing_frames_per_s", "gflop_per_frame"))
        if torch.cuda.is_available():
            assert old["gflop_per_frame"] == new["gflop_per_frame"]  # the same tiles, batched differently
        else:  # the CPU's own layout: never more pixels through the network than the model's tile_size
            assert new["gflop_per_frame"] <= old["gflop_per_frame"]
            assert (new["gflop_per_frame"] < old["gflop_per_frame"]) == (shape == [72, 300])  # 2 tiles or 1 pass
    assert large["batched (new)"]["gflop_per_frame"] > 0
    stages = [r["stage"] for r in figures["augmentation"]]
    assert stages[0] == "training patches, augment.py one at a time (CPU)"
    assert stages[1].startswith("training patches, augment_torch batch of 4 (")  # on the device there is
    assert figures["augmentation"][1]["speedup"] > 0
    assert figures["training"]["faithful"]["epoch"].startswith("6 frames resized to 64 px")  # a's 3 frames, twice
    assert figures["training"]["patches"]["epoch"].startswith("8 patches of 64 px, batch 4")
    assert all(figures["training"][recipe]["images_per_s"] > 0 for recipe in ("faithful", "patches"))
    assert all(figures["inference_cli"][name]["frames_per_s"] > 0 and "6 frames on" in
               figures["inference_cli"][name]["line"] for name in ("faithful", "patches", "native"))  # a's and b's
    table = (tmp_path / "out" / "gpu_figures.md").read_text()
    assert "| 3 of 96 x 96 | batched (new), batch 2 |" in table and "| 2 of 72 x 300 | new / old |" in table
    assert ("No GPU here" in table) == (not torch.cuda.is_available())  # a CPU's figures are never passed off as a GPU's


def test_without_arguments_it_says_how_to_call_it():
    result = subprocess.run(["bash", os.path.join(REPO, "benchmark_gpu.sh")], capture_output=True, text=True)
    assert result.returncode != 0 and "usage: bash benchmark_gpu.sh DATA_ROOT OUT_DIR" in result.stderr
