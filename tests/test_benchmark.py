"""benchmark.py runs end to end on a small simulated colony and reports every row (its own asserts check that each
fast path gives the output of its straightforward version). Timings are not tested: they are the script's output."""
import json
import os

import pytest

import benchmark



EXPECTED_ROWS = [
    "border-core targets, per-instance loop", "border-core targets, all at once",
    "instances_from_border_core_torch (cpu, batch of 2)", "instances, acvl-utils 0.2.6", "instances_from_border_core",
    "Instance Dice, acvl-utils matching", "instance_dice",
    "training loader, decode + loop targets per item", "training loader, prepared once and cached",
    "training step alone (forward + backward)",
    "inference, reading + model only", "inference end to end (+ postprocessing, writing)",
    "tracking, linking",
]


@pytest.mark.slow
def test_benchmark_prints_and_writes_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--num_frames", "2", "--size", "128", "--input_size", "64", "--batch_size", "2", "--num_workers", "1",
                    "--json", str(out)])
    result = json.loads(out.read_text())
    stages = [r["stage"] for r in result["rows"]]
    assert stages[:len(EXPECTED_ROWS)] == EXPECTED_ROWS
    # then the shipped models, each alone, postprocessed and end to end
    shipped = [path for path in benchmark.SHIPPED_MODELS if os.path.isfile(path)]
    assert len(stages) == len(EXPECTED_ROWS) + 3 * len(shipped)
    assert all(stage.startswith(os.path.basename(path)) for path in shipped
               for stage in stages[len(EXPECTED_ROWS):][3 * shipped.index(path):3 * shipped.index(path) + 3])
    # each fast path is compared with its straightforward version (how much faster is the benchmark's figure, not the
    # test's: timings on a shared machine say nothing here)
    speedups = {r["stage"]: r["speedup"] for r in result["rows"]}
    assert all(speedups[fast] is not None for fast in ("border-core targets, all at once", "instance_dice"))
    assert all(r["frames_per_s"] > 0 and r["ms_per_frame"] > 0 for r in result["rows"])
    printed = capsys.readouterr().out
    assert all(name in printed for name in EXPECTED_ROWS) and "speed-up" in printed


@pytest.mark.slow
def test_benchmark_gpu_script_runs_both_recipes_and_writes_the_table(tmp_path):
    """benchmark_gpu.sh on tiny frames with small settings, on whatever device there is: every row of its table is
    filled from the runs' own metrics and inference lines."""
    import os
    import subprocess
    import sys

    from conftest import write_dataset

    root = write_dataset(tmp_path / "data", sequences=("a", "b"), unlabelled=(), frames=3, shape=(90, 110))
    env = dict(os.environ, PYTHON=sys.executable, TRAIN_REPEAT="2", INFER_REPEAT="1", PATCHES="8", FAITHFUL_EPOCHS="2",
               PATCH_EPOCHS="2", INPUT_SIZE="64", PATCH_SIZE="64", BATCH_SIZE="4", WORKERS="0")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(["bash", os.path.join(repo, "benchmark_gpu.sh"), str(root), str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (tmp_path / "out" / "gpu_figures.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines() if
            line.startswith("| ") and not line.startswith("| ---")}
    assert rows["faithful"][-1].startswith("6 frames resized to 64 px")  # a's 3 frames, twice
    assert rows["patches"][-1].startswith("8 patches of 64 px, batch 4")
    assert float(rows["faithful"][0]) > 0 and float(rows["patches"][0]) > 0 and float(rows["patches"][1]) > 0
    inference = [cells for name, cells in rows.items() if "output" in name]
    assert len(inference) == 3 and all(float(cells[0]) > 0 for cells in inference)
    assert "6 frames on" in table  # a's and b's frames, once


def test_the_table_goes_into_its_own_block_of_the_results_page(tmp_path):
    from data_files import write_marked_block

    page = tmp_path / "results.md"
    page.write_text("# Results\n\n<!-- benchmark:start -->\nold table\n<!-- benchmark:end -->\n\nwritten by hand\n")
    machine = {"device": "cpu", "cpu_cores": 2, "torch": "2.13.0", "frames": 2, "frame_size": [64, 64],
               "cells_per_frame": 5}
    rows = [{"stage": "instance_dice", "frames_per_s": 10.0, "ms_per_frame": 100.0, "speedup": 2.0, "peak_mib": 1.0,
             "energy_wh": None, "note": "equal"}]
    write_marked_block(str(page), "benchmark", benchmark.results_markdown(machine, rows, ["--num_frames", "2"]))
    text = page.read_text()
    assert "old table" not in text and text.startswith("# Results") and text.endswith("written by hand\n")
    assert "| instance_dice | 10.00 | 100.0 | 2.0× | 1.0 | n/m | equal |" in text
    assert "`python benchmark.py --num_frames 2` on cpu (2 cores" in text
