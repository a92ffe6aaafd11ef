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
OLD_AND_NEW = [f"bacteria_generalist.pt inference {path}: {stage}"
               for path in ("frame by frame (old)", "batched (new)")
               for stage in ("reading + model", "postprocessing", "end to end (+ reading, writing)")]


@pytest.mark.slow
def test_benchmark_prints_and_writes_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--num_frames", "2", "--size", "128", "--input_size", "64", "--batch_size", "2", "--num_workers", "1",
                    "--json", str(out)])
    result = json.loads(out.read_text())
    stages = [r["stage"] for r in result["rows"]]
    augmentation = ["training patches, augment.py one at a time (CPU)",
                    "training patches, augment_torch batch of 2 (cpu)"]
    first = len(EXPECTED_ROWS) + len(augmentation) + len(OLD_AND_NEW)
    assert stages[:first] == EXPECTED_ROWS + augmentation + OLD_AND_NEW
    # then the shipped models, each alone, postprocessed and end to end
    shipped = [path for path in benchmark.SHIPPED_MODELS if os.path.isfile(path)]
    assert len(stages) == first + 3 * len(shipped)
    assert all(stage.startswith(os.path.basename(path)) for path in shipped
               for stage in stages[first:][3 * shipped.index(path):3 * shipped.index(path) + 3])
    # each fast path is compared with its straightforward version (how much faster is the benchmark's figure, not the
    # test's: timings on a shared machine say nothing here)
    speedups = {r["stage"]: r["speedup"] for r in result["rows"]}
    assert all(speedups[fast] is not None for fast in ("border-core targets, all at once", "instance_dice"))
    assert all(r["frames_per_s"] > 0 and r["ms_per_frame"] > 0 for r in result["rows"])
    printed = capsys.readouterr().out
    assert all(name in printed for name in EXPECTED_ROWS) and "speed-up" in printed


@pytest.mark.parametrize("bf16_units", [False, True])
def test_old_and_new_inference_side_by_side_with_outputs_compared(tmp_path, capsys, monkeypatch, bf16_units):
    """--only inference: the bundled model frame by frame and batched on 3 frames in batches of 2 (the last one
    smaller), frames larger than the model's tile_size. The old path tiles them as the model recorded, the new one
    predicts them whole (cheapest on a CPU), in bf16 on a CPU with bf16 units: their agreement is given."""
    import precision
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: bf16_units)
    out = tmp_path / "bench.json"
    benchmark.main(["--only", "inference", "--num_frames", "3", "--size", "72x300", "--batch_size", "2",
                    "--num_workers", "0", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["stage"] for r in result["rows"]] == OLD_AND_NEW
    assert all(r["speedup"] is not None for r in result["rows"][3:])  # the new path against the old one
    old, new = result["inference"]["frame by frame (old)"], result["inference"]["batched (new)"]
    assert (old["batch_size"], old["tile_batch"], old["tiling"]) == (1, 4, "fixed")
    assert (new["batch_size"], new["tile_batch"], new["tiling"]) == (2, None, "auto")
    assert old["frames"] == new["frames"] == 3 and new["frame_shape"] == [72, 300]
    # 72 x 300 padded to 72 x 304: the old path's two tiles of 72 x 256 (the model's tile_size), the new path's one
    # pass over the whole frame; the counted FLOPs are those of each path's forward passes
    assert (old["tile_shape"], old["tiles_per_frame"]) == ([72, 256], 2)
    assert (new["tile_shape"], new["tiles_per_frame"]) == ([72, 304], 1)
    from torch.utils.flop_counter import FlopCounterMode
    import torch
    from unet import load_model

    model = load_model(benchmark.BUNDLED_MODEL)
    for summary, tiles in ((old, torch.zeros(2, 1, 72, 256)), (new, torch.zeros(1, 1, 72, 304))):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(tiles)
        assert summary["gflop_per_frame"] == pytest.approx(counter.get_total_flops() / 1e9)
    assert new["share_of_peak"] is None and "machine: " in capsys.readouterr().out  # no GPU peak on a CPU
    agreement = result["inference"]["map_agreement"]
    differences = ("fp32 vs bf16, " if bf16_units else "") + "72 x 256 tiles vs 72 x 304 tiles"
    assert 0.95 <= agreement <= 1 and result["rows"][-1]["note"].endswith(
        f"maps agree on {100 * agreement:.2f} % of the pixels ({differences})")


def test_patch_augmentation_on_the_cpu_against_a_batch_on_the_device(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(["--only", "augmentation", "--num_frames", "2", "--size", "100x120", "--patch_size", "48",
                    "--batch_size", "3", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["stage"] for r in rows] == ["training patches, augment.py one at a time (CPU)",
                                          "training patches, augment_torch batch of 3 (cpu)"]
    assert rows[0]["speedup"] is None and rows[1]["speedup"] > 0 and all(r["frames_per_s"] > 0 for r in rows)


def test_frame_sizes_and_the_chips_peak(monkeypatch):
    import argparse

    assert benchmark.frame_size("512") == (512, 512) and benchmark.frame_size("1022x1024") == (1022, 1024)
    for bad in ("8", "axb", "1x2x3", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            benchmark.frame_size(bad)
    import torch

    cpu = torch.device("cpu")
    assert benchmark.peak_bf16_flops(cpu) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert benchmark.peak_bf16_flops(torch.device("cuda")) == pytest.approx(756.5e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert benchmark.peak_bf16_flops(torch.device("cuda")) == pytest.approx(989.4e12)
    monkeypatch.setenv("BENCHMARK_PEAK_TFLOPS", "100")
    assert benchmark.peak_bf16_flops(cpu) == pytest.approx(1e14)


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
