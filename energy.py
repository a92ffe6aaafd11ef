"""Energy a job consumed, read from the hardware's own cumulative counters, where they are readable.

    GPU  NVML's total-energy counter of each GPU the process uses (nvidia-ml-py, `pynvml`; millijoules; Volta and newer)
    CPU  RAPL package and DRAM counters under /sys/class/powercap (microjoules; often root-only since Linux 5.10)

Energy is the difference of a counter between two reads, corrected for wrap-around, never power × time. Where no
counter is readable the meter says "energy: not measurable here" and reports wall time and CPU time instead; it never
prints an estimate.

In a script (inference.py, eval.py):

    from energy import EnergyMeter
    with EnergyMeter() as meter:           # every CUDA device visible to the process, plus RAPL
        ...                                # the work; EnergyMeter(gpus=[device.index]) for one GPU, gpus=[] for none
    print(meter.report(frames=n_frames))   # "energy: 12.3 Wh (GPU 10.1, CPU 2.2), 0.0154 Wh/frame, 800 frames in 95.2 s"

In training, train.py's EnergyCallback (a Lightning callback around this meter) adds per-epoch and run-total columns
to the logger (metrics.csv). torch is imported only where a GPU is asked for, so that eval.py starts in a second.
"""
import glob
import os
import resource
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

POWERCAP_ROOT = "/sys/class/powercap"
J_PER_WH = 3600.0
NVML_WRAP = 2 ** 64  # NVML's counter is an unsigned 64-bit count of mJ: it never wraps in practice


@dataclass(frozen=True)
class Counter:
    """One cumulative energy counter: `read()` returns its raw value, which counts up in `joules_per_unit` steps
    and restarts from 0 at `wrap`."""
    name: str
    kind: str  # "gpu" or "cpu"
    read: Callable[[], int]
    joules_per_unit: float
    wrap: int


def counter_delta(before: int, after: int, wrap: int) -> int:
    """Units counted from `before` to `after`; a smaller `after` means the counter wrapped once in between."""
    delta = after - before
    return delta + wrap if delta < 0 else delta


# ----------------------------------------------------------------------------------------------------------- RAPL

def _read_int(path: str) -> int:
    with open(path) as file:
        return int(file.read().strip())


def _read_name(zone: str) -> str:
    try:
        with open(os.path.join(zone, "name")) as file:
            return file.read().strip()
    except OSError:
        return ""


def rapl_counters(powercap_root: str = POWERCAP_ROOT) -> tuple[list[Counter], list[str]]:
    """The RAPL counters to sum, and a line per problem (absent tree, unreadable file).

    Counted: every top-level zone `intel-rapl:N` named `package-N`, and every zone (top-level or sub-zone) named `dram`
    (DRAM is outside the package domain). Skipped: the other sub-zones (`core`, `uncore`: parts of the package) and
    `psys` (the platform, which contains the package), so nothing is counted twice. sysfs lists sub-zones both at the
    root and inside their package; each zone is taken once, by its real path.
    """
    if not os.path.isdir(powercap_root):
        return [], [f"CPU: {powercap_root} absent"]
    zones = glob.glob(os.path.join(powercap_root, "intel-rapl:*")) + \
        glob.glob(os.path.join(powercap_root, "intel-rapl:*", "intel-rapl:*"))
    counters, problems, seen = [], [], set()
    for zone in sorted(zones, key=lambda path: os.path.basename(path)):
        real = os.path.realpath(zone)
        if real in seen:
            continue
        seen.add(real)
        zone_id, name = os.path.basename(zone), _read_name(zone)
        is_package = zone_id.count(":") == 1 and name.startswith("package")
        if not (is_package or name == "dram"):
            continue
        energy_file = os.path.join(zone, "energy_uj")
        try:
            _read_int(energy_file)
            wrap = _read_int(os.path.join(zone, "max_energy_range_uj"))
        except (OSError, ValueError) as error:
            problems.append(f"CPU: {energy_file} unreadable ({type(error).__name__})")
            continue
        counters.append(Counter(f"{zone_id} {name}", "cpu", lambda path=energy_file: _read_int(path), 1e-6, wrap))
    if not counters and not problems:
        problems.append(f"CPU: no RAPL package or dram zone under {powercap_root}")
    return counters, problems


# ------------------------------------------------------------------------------------------------------------ GPU

def cuda_uuid(index: int) -> str:
    """NVML's UUID ("GPU-...") of torch's CUDA device `index`. Matching by UUID, not by number, because NVML numbers
    every GPU of the node in PCI order while torch numbers only those in CUDA_VISIBLE_DEVICES, in CUDA's order."""
    import torch

    return "GPU-" + str(torch.cuda.get_device_properties(index).uuid).removeprefix("GPU-")


def gpu_counters(devices: Optional[Sequence[int]] = None) -> tuple[list[Counter], list[str]]:
    """The NVML energy counters of torch's CUDA devices `devices` (None: every device visible to this process), and a
    line per problem (no CUDA device, pynvml missing, no driver, counter not supported)."""
    if devices is None:
        import torch

        devices = range(torch.cuda.device_count()) if torch.cuda.is_available() else []
    if not devices:
        return [], ["GPU: no CUDA device in this process"]
    try:
        import pynvml
    except ImportError:
        return [], ["GPU: pynvml not installed (pip install nvidia-ml-py)"]
    try:
        pynvml.nvmlInit()  # reference-counted; not shut down because the handles are read until the process ends
    except Exception as error:
        return [], [f"GPU: NVML unavailable ({error})"]
    counters, problems = [], []
    for index in devices:
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(cuda_uuid(index))
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # fails here on GPUs without the counter
        except Exception as error:
            problems.append(f"GPU {index}: energy counter unreadable ({error})")
            continue
        read = lambda handle=handle: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        counters.append(Counter(f"cuda:{index}", "gpu", read, 1e-3, NVML_WRAP))
    return counters, problems


# ---------------------------------------------------------------------------------------------------------- meter

def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that have exited (e.g. data loader workers,
    which exit at the end of every epoch unless persistent)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@dataclass(frozen=True)
class Reading:
    """Energy and time over an interval. gpu_wh / cpu_wh are None where no counter of that kind was readable."""
    seconds: float
    cpu_seconds: float
    gpu_wh: Optional[float]
    cpu_wh: Optional[float]

    @property
    def measured(self) -> bool:
        return self.gpu_wh is not None or self.cpu_wh is not None

    @property
    def energy_wh(self) -> Optional[float]:
        """GPU + CPU of what was measured; None where nothing was."""
        return (self.gpu_wh or 0.0) + (self.cpu_wh or 0.0) if self.measured else None

    @property
    def power_w(self) -> Optional[float]:
        return self.energy_wh * J_PER_WH / self.seconds if self.measured and self.seconds > 0 else None

    def __sub__(self, earlier: "Reading") -> "Reading":
        minus = lambda a, b: None if a is None else a - b
        return Reading(self.seconds - earlier.seconds, self.cpu_seconds - earlier.cpu_seconds,
                       minus(self.gpu_wh, earlier.gpu_wh), minus(self.cpu_wh, earlier.cpu_wh))


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def format_report(reading: Reading, frames: Optional[int] = None) -> str:
    """One line: the energy where measured, else plainly that it is not, with wall and CPU time.

    energy: 12.3 Wh (GPU 10.1, CPU 2.2), 0.0154 Wh/frame, 800 frames in 95.2 s
    energy: 12.3 Wh (GPU 10.1, CPU 2.2) in 95.2 s, 465 W average
    energy: not measurable here; 800 frames in 95.2 s (0.119 s/frame), CPU time 180.3 s
    """
    if not reading.measured:
        work = f"{frames} frames in {reading.seconds:.1f} s ({_number(reading.seconds / frames)} s/frame)" \
            if frames else f"{reading.seconds:.1f} s"
        return f"energy: not measurable here; {work}, CPU time {reading.cpu_seconds:.1f} s"
    part = lambda wh: "not measurable" if wh is None else _number(wh)
    energy = f"energy: {_number(reading.energy_wh)} Wh (GPU {part(reading.gpu_wh)}, CPU {part(reading.cpu_wh)})"
    if frames:
        return f"{energy}, {_number(reading.energy_wh / frames)} Wh/frame, {frames} frames in {reading.seconds:.1f} s"
    power = f", {_number(reading.power_w)} W average" if reading.power_w is not None else ""
    return f"{energy} in {reading.seconds:.1f} s{power}"


class EnergyMeter:
    """Accumulates the energy of the GPUs this process uses and of the CPU packages/DRAM since `start()`.

        with EnergyMeter() as meter:       # or meter = EnergyMeter().start(); ...; meter.stop()
            run()
        print(meter.report(frames=800))    # one line, see format_report
        meter.read()                       # Reading(seconds, cpu_seconds, gpu_wh, cpu_wh) since start

    gpus: torch CUDA device indices (None: all visible to the process; []: none). rapl: read the RAPL counters (under
    DDP only one process per node should, they count the whole socket). counters: use these instead of discovering
    (tests, other sources). poll_seconds: a background thread reads the counters this often so that a RAPL counter
    (which wraps after roughly 260 kJ, 20-60 min at full load) is never read less than once per wrap; None: no thread.
    `measurable` tells whether any counter is read; `problems` lists why some are not.
    """

    def __init__(self, gpus: Optional[Sequence[int]] = None, rapl: bool = True, powercap_root: str = POWERCAP_ROOT,
                 poll_seconds: Optional[float] = 30.0, counters: Optional[Sequence[Counter]] = None):
        if counters is None:
            found_gpu, gpu_problems = gpu_counters(gpus)
            found_cpu, cpu_problems = rapl_counters(powercap_root) if rapl else ([], [])
            counters, self.problems = found_gpu + found_cpu, gpu_problems + cpu_problems
        else:
            self.problems = []
        self.counters = list(counters)
        self.poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._final = None

    @property
    def measurable(self) -> bool:
        return bool(self.counters)

    def has(self, kind: str) -> bool:
        return any(counter.kind == kind for counter in self.counters)

    def start(self) -> "EnergyMeter":
        self._joules = [0.0] * len(self.counters)
        self._last = [None] * len(self.counters)
        self._start_time, self._start_cpu = time.perf_counter(), cpu_seconds()
        self._final = None
        self.sample()
        if self.poll_seconds and self.counters:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, daemon=True, name="energy-meter")
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.poll_seconds):
            self.sample()

    def sample(self):
        """Read every counter and add what it counted since the last read."""
        with self._lock:
            for i, counter in enumerate(self.counters):
                try:
                    value = counter.read()
                except Exception:
                    continue  # a failed read loses nothing: the next one counts the whole interval
                if self._last[i] is not None:
                    self._joules[i] += counter_delta(self._last[i], value, counter.wrap) * counter.joules_per_unit
                self._last[i] = value

    def read(self) -> Reading:
        """Energy and time since start() (frozen at stop())."""
        if self._final is not None:
            return self._final
        self.sample()
        with self._lock:
            wh = lambda kind: sum(j for j, c in zip(self._joules, self.counters) if c.kind == kind) / J_PER_WH \
                if self.has(kind) else None
            return Reading(time.perf_counter() - self._start_time, cpu_seconds() - self._start_cpu, wh("gpu"), wh("cpu"))

    def stop(self) -> Reading:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._final is None:
            self._final = self.read()
        return self._final

    def __enter__(self) -> "EnergyMeter":
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def report(self, frames: Optional[int] = None) -> str:
        """One line for the user; see format_report."""
        return format_report(self.read(), frames)
