"""benchmark.py runs end to end on a small simulated colony and reports every row (its own asserts check that each
fast path gives the output of its straightforward version). Timings are not tested: they are the script's output."""
import json

import pytest

import benchmark

pytestmark = [pytest.mark.slow]

EXPECTED_ROWS = [
    "border-core targets, per-instance loop", "border-core targets, all at once",
    "instances, acvl-utils 0.2.6", "instances_from_border_core",
    "Instance Dice, acvl-utils matching", "instance_dice",
    "training loader, decode + loop targets per item", "training loader, prepared once and cached",
    "training step alone (forward + backward)",
    "inference, reading + model only", "inference end to end (+ postprocessing, writing)",
    "tracking, linking",
]


def test_benchmark_prints_and_writes_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--num_frames", "2", "--size", "128", "--input_size", "64", "--batch_size", "2", "--num_workers", "1",
                    "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["stage"] for r in result["rows"]] == EXPECTED_ROWS
    speedups = {r["stage"]: r["speedup"] for r in result["rows"]}
    # the fast paths that win by orders of magnitude (docs/speed.md) must beat their straightforward versions even on
    # these tiny frames on a busy machine
    for fast in ("border-core targets, all at once", "instance_dice"):
        assert speedups[fast] is not None and speedups[fast] > 2, (fast, speedups[fast])
    assert all(r["frames_per_s"] > 0 and r["ms_per_frame"] > 0 for r in result["rows"])
    printed = capsys.readouterr().out
    assert all(name in printed for name in EXPECTED_ROWS) and "speed-up" in printed
