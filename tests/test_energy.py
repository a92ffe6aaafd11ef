"""energy.py: RAPL reader on a fake powercap tree, GPU reader on a fake NVML, the meter's report, the Lightning callback."""
import builtins
import csv
import os
import sys
import types

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import energy
from energy import Counter, EnergyMeter, Reading, counter_delta, format_report, gpu_counters, rapl_counters
from callbacks import EnergyCallback

MAX_UJ = 262_143_328_850  # a real max_energy_range_uj
WH_UJ = 3_600_000_000  # 1 Wh in µJ
WH_MJ = 3_600_000  # 1 Wh in mJ


# ------------------------------------------------------------------------------------------------ fake powercap tree

def write_zone(path, name, energy_uj, max_uj=MAX_UJ):
    os.makedirs(path)
    for file, value in (("name", name), ("energy_uj", energy_uj), ("max_energy_range_uj", max_uj)):
        with open(os.path.join(path, file), "w") as f:
            f.write(f"{value}\n")


def set_energy(path, energy_uj):
    with open(os.path.join(path, "energy_uj"), "w") as f:
        f.write(f"{energy_uj}\n")


@pytest.fixture
def powercap(tmp_path):
    """The sysfs layout: zones live under devices/, sub-zones inside their package; class/powercap (the root) holds
    a link to every zone, sub-zones included, plus the mmio interface that duplicates package-0."""
    devices, root = tmp_path / "devices", tmp_path / "powercap"
    zones = {
        "intel-rapl:0": ("package-0", 10 * WH_UJ),
        "intel-rapl:0/intel-rapl:0:0": ("core", 5 * WH_UJ),
        "intel-rapl:0/intel-rapl:0:1": ("dram", 2 * WH_UJ),
        "intel-rapl:1": ("package-1", MAX_UJ - 720_000_000),  # wraps in the test
        "intel-rapl:1/intel-rapl:1:0": ("dram", 0),
        "intel-rapl:2": ("psys", 50 * WH_UJ),
        "intel-rapl-mmio:0": ("package-0", 10 * WH_UJ),
    }
    for rel, (name, value) in zones.items():
        write_zone(devices / rel, name, value)
    root.mkdir()
    for rel in zones:
        os.symlink(devices / rel, root / os.path.basename(rel))
    return {os.path.basename(rel): str(devices / rel) for rel in zones} | {"root": str(root)}


def test_counter_delta_wraps_once():
    assert counter_delta(100, 900, 1000) == 800
    assert counter_delta(900, 100, 1000) == 200
    assert counter_delta(MAX_UJ - 720_000_000, 1_080_000_000, MAX_UJ) == WH_UJ // 2


def test_rapl_zones_counted_once_in_wh(powercap):
    counters, problems = rapl_counters(powercap["root"])
    assert problems == []
    assert sorted(c.name for c in counters) == ["intel-rapl:0 package-0", "intel-rapl:0:1 dram",
                                                "intel-rapl:1 package-1", "intel-rapl:1:0 dram"]
    meter = EnergyMeter(gpus=[], powercap_root=powercap["root"], poll_seconds=None).start()
    set_energy(powercap["intel-rapl:0"], 11 * WH_UJ)  # +1 Wh
    set_energy(powercap["intel-rapl:0:1"], 2 * WH_UJ + WH_UJ // 2)  # +0.5 Wh
    set_energy(powercap["intel-rapl:0:0"], 15 * WH_UJ)  # core: part of package-0, not added
    set_energy(powercap["intel-rapl:1"], 1_080_000_000)  # wrapped: +0.5 Wh
    set_energy(powercap["intel-rapl:1:0"], WH_UJ // 10)  # +0.1 Wh
    set_energy(powercap["intel-rapl:2"], 80 * WH_UJ)  # psys contains the packages: not added
    set_energy(powercap["intel-rapl-mmio:0"], 30 * WH_UJ)  # the same package through another interface
    reading = meter.stop()
    assert reading.cpu_wh == pytest.approx(2.1)
    assert reading.gpu_wh is None
    assert reading.energy_wh == pytest.approx(2.1)
    assert meter.report().startswith("energy: 2.1 Wh (GPU not measurable, CPU 2.1) in ")


def test_rapl_unreadable_energy_file_is_skipped_and_named(powercap):
    os.remove(os.path.join(powercap["intel-rapl:1"], "energy_uj"))
    os.mkdir(os.path.join(powercap["intel-rapl:1"], "energy_uj"))  # chmod 000 does not stop root; a directory does
    counters, problems = rapl_counters(powercap["root"])
    assert sorted(c.name for c in counters) == ["intel-rapl:0 package-0", "intel-rapl:0:1 dram", "intel-rapl:1:0 dram"]
    assert problems == [f"CPU: {powercap['root']}/intel-rapl:1/energy_uj unreadable (IsADirectoryError)"]


def test_rapl_permission_denied_everywhere_is_not_measurable(powercap, monkeypatch):
    real_open = builtins.open

    def denying_open(path, *args, **kwargs):  # the usual case since Linux 5.10: energy_uj is readable by root only
        if str(path).endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denying_open)
    meter = EnergyMeter(gpus=[], powercap_root=powercap["root"], poll_seconds=None)
    assert not meter.measurable
    zones = ["intel-rapl:0", "intel-rapl:0:1", "intel-rapl:1", "intel-rapl:1:0"]
    assert meter.problems == ["GPU: no CUDA device in this process"] + \
        [f"CPU: {powercap['root']}/{zone}/energy_uj unreadable (PermissionError)" for zone in zones]


def test_rapl_absent_root(tmp_path):
    assert rapl_counters(str(tmp_path / "none")) == ([], [f"CPU: {tmp_path / 'none'} absent"])


# ------------------------------------------------------------------------------------------------------ fake NVML

def fake_nvml(energy_mj, init_error=None):
    """A pynvml stand-in: GPUs by NVML UUID with their counters in mJ; None marks a GPU without the counter."""
    class NVMLError(Exception):
        pass

    def init():
        if init_error:
            raise NVMLError(init_error)

    def handle_by_uuid(uuid):
        if uuid not in energy_mj:
            raise NVMLError("Not Found")
        return uuid

    def total_energy(handle):
        if energy_mj[handle] is None:
            raise NVMLError("Not Supported")
        return energy_mj[handle]

    return types.SimpleNamespace(NVMLError=NVMLError, nvmlInit=init, nvmlDeviceGetHandleByUUID=handle_by_uuid,
                                 nvmlDeviceGetTotalEnergyConsumption=total_energy)


@pytest.fixture
def torch_to_nvml(monkeypatch):
    """torch's CUDA 0, 1, 2 are NVML's GPU-cc, GPU-bb, GPU-aa (CUDA_VISIBLE_DEVICES=2,1,0): matched by UUID."""
    uuids = {0: "cc", 1: "bb", 2: "aa"}
    properties = lambda index: types.SimpleNamespace(uuid=uuids[index])
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)


def test_gpu_energy_summed_over_the_process_gpus(monkeypatch, torch_to_nvml):
    counters_mj = {"GPU-aa": 10 * WH_MJ, "GPU-bb": 0, "GPU-cc": 5 * WH_MJ}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(counters_mj))
    meter = EnergyMeter(gpus=[0, 2], rapl=False, poll_seconds=None).start()
    assert [c.name for c in meter.counters] == ["cuda:0", "cuda:2"] and meter.problems == []
    counters_mj["GPU-cc"] += WH_MJ  # torch's cuda:0: +1 Wh
    counters_mj["GPU-aa"] += 2 * WH_MJ  # cuda:2: +2 Wh
    counters_mj["GPU-bb"] += 100 * WH_MJ  # not this process's GPU
    reading = meter.stop()
    assert reading.gpu_wh == pytest.approx(3.0)
    assert reading.cpu_wh is None
    assert meter.report(frames=100) == f"energy: 3 Wh (GPU 3, CPU not measurable), 0.03 Wh/frame, 100 frames in " \
                                       f"{reading.seconds:.1f} s"


def test_gpu_all_visible_by_default_and_unsupported_counter_named(monkeypatch, torch_to_nvml):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml({"GPU-aa": 0, "GPU-bb": None, "GPU-cc": 0}))
    counters, problems = gpu_counters()
    assert [c.name for c in counters] == ["cuda:0", "cuda:2"]
    assert problems == ["GPU 1: energy counter unreadable (Not Supported)"]


def test_gpu_without_driver_or_pynvml(monkeypatch, torch_to_nvml):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml({}, init_error="Driver Not Loaded"))
    assert gpu_counters([0]) == ([], ["GPU: NVML unavailable (Driver Not Loaded)"])
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert gpu_counters([0]) == ([], ["GPU: pynvml not installed (pip install nvidia-ml-py)"])
    assert gpu_counters([]) == ([], ["GPU: no CUDA device in this process"])


# ------------------------------------------------------------------------------------------------------- the meter

def test_meter_accumulates_several_wraps_and_survives_a_failed_read():
    values = iter([900, 300, None, 100, 700])  # wrap 1000: +400, (failed), +800 across a second wrap, +600

    def read():
        value = next(values)
        if value is None:
            raise OSError("transient")
        return value

    meter = EnergyMeter(counters=[Counter("fake", "cpu", read, 3.6e-3, 1000)], poll_seconds=None).start()
    for _ in range(3):
        meter.sample()  # what the polling thread does
    assert meter.read().cpu_wh == pytest.approx((400 + 800 + 600) * 3.6e-3 / 3600)


def test_report_lines():
    assert format_report(Reading(95.2, 180.3, 10.1, 2.2), frames=800) == \
        "energy: 12.3 Wh (GPU 10.1, CPU 2.2), 0.0154 Wh/frame, 800 frames in 95.2 s"
    assert format_report(Reading(90.0, 180.3, 10.0, 2.5)) == "energy: 12.5 Wh (GPU 10, CPU 2.5) in 90.0 s, 500 W average"
    assert format_report(Reading(95.2, 180.3, None, None), frames=800) == \
        "energy: not measurable here; 800 frames in 95.2 s (0.119 s/frame), CPU time 180.3 s"
    assert format_report(Reading(95.2, 180.3, None, None)) == "energy: not measurable here; 95.2 s, CPU time 180.3 s"


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl") or os.path.exists("/sys/class/powercap"),
                    reason="this machine may have readable energy counters")
def test_this_machine_says_not_measurable():
    with EnergyMeter() as meter:
        sum(i * i for i in range(200_000))
    assert not meter.measurable
    line = meter.report(frames=4)
    assert line.startswith("energy: not measurable here; 4 frames in ") and ", CPU time " in line
    assert "Wh" not in line


# ---------------------------------------------------------------------------------------------------- the callback

class Tiny(L.LightningModule):
    """4 training steps per epoch; counts them so fake counters can charge a known energy per step."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16, 1)), batch_size=4)


def fit(out_dir, callback, model):
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=CSVLogger(out_dir, name="", version=""),
                        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(model)
    with open(os.path.join(out_dir, "metrics.csv"), newline="") as file:
        rows = list(csv.DictReader(file))
    epochs = [{k: float(v) for k, v in row.items() if v} for row in rows if row["epoch"]]
    totals = [{k: float(v) for k, v in row.items() if v} for row in rows if row.get("run_seconds")]
    return rows[0].keys(), epochs, totals


@pytest.mark.slow
def test_callback_writes_energy_columns(tmp_path, capsys):
    model = Tiny()
    wrap_uj = 3 * WH_UJ  # the fake package wraps every 6 steps: once in this run
    counters = [Counter("fake gpu", "gpu", lambda: model.steps * WH_MJ, 1e-3, energy.NVML_WRAP),  # 1 Wh / step
                Counter("fake package", "cpu", lambda: model.steps * WH_UJ // 2 % wrap_uj, 1e-6, wrap_uj)]  # 0.5 Wh
    columns, epochs, totals = fit(tmp_path, EnergyCallback(counters=counters, poll_seconds=None), model)
    assert {"energy_wh", "energy_gpu_wh", "energy_cpu_wh", "power_w", "epoch_seconds", "epoch_cpu_seconds",
            "run_energy_wh", "run_energy_gpu_wh", "run_energy_cpu_wh", "run_power_w", "run_seconds",
            "run_cpu_seconds"} <= set(columns)
    assert [e["epoch"] for e in epochs] == [0, 1]
    for epoch in epochs:  # one row per epoch, the train_loss row
        assert "train_loss" in epoch
        assert (epoch["energy_gpu_wh"], epoch["energy_cpu_wh"], epoch["energy_wh"]) == (4.0, 2.0, 6.0)
        assert epoch["power_w"] == pytest.approx(6.0 * 3600 / epoch["epoch_seconds"], rel=1e-5)
    [total] = totals
    assert (total["run_energy_gpu_wh"], total["run_energy_cpu_wh"], total["run_energy_wh"]) == (8.0, 4.0, 12.0)
    assert total["run_power_w"] == pytest.approx(12.0 * 3600 / total["run_seconds"])
    assert total["run_seconds"] >= sum(e["epoch_seconds"] for e in epochs)
    printed = capsys.readouterr().out
    assert "energy: measuring GPU and CPU counters (rank 0: fake gpu, fake package)" in printed
    assert "energy: 12 Wh (GPU 8, CPU 4) in " in printed


@pytest.mark.slow
def test_callback_without_counters_says_so_and_logs_time(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    absent = tmp_path / "no_powercap"
    columns, epochs, totals = fit(tmp_path / "run", EnergyCallback(powercap_root=str(absent), poll_seconds=None),
                                  Tiny())
    assert not [c for c in columns if "energy" in c or "power" in c]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert all(e["epoch_seconds"] > 0 and e["epoch_cpu_seconds"] > 0 for e in epochs)
    [total] = totals
    assert total["run_seconds"] >= sum(e["epoch_seconds"] for e in epochs)
    assert total["run_cpu_seconds"] >= sum(e["epoch_cpu_seconds"] for e in epochs) * (1 - 1e-6)
    printed = capsys.readouterr().out
    assert (f"energy: not measurable here (GPU: no CUDA device in this process; CPU: {absent} absent); "
            "logging epoch_seconds and epoch_cpu_seconds instead") in printed
    assert "energy: not measurable here; " in printed and "Wh" not in printed
