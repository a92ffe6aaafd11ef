"""What a training run shows and logs beside the loss: energy and CPU time per epoch and for the whole fit
(EnergyCallback, energy.py's meter), and one line per epoch on the console (EpochLine)."""
import time

import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging

from energy import POWERCAP_ROOT, Counter, EnergyMeter, Reading, format_report


class EnergyCallback(Callback):
    """Logs energy and time per training epoch and for the whole fit.

    Per epoch (the row of train_loss in metrics.csv; the epoch includes its validation):
        epoch_seconds, epoch_cpu_seconds                      always
        energy_wh, power_w                                    where any counter is readable
        energy_gpu_wh / energy_cpu_wh                         where that kind is readable
    Run totals, from fit start to train end, one extra row without `epoch` (so a --resume does not restore them; after
    a resume they cover the resumed part): run_seconds, run_cpu_seconds, and where readable run_energy_wh,
    run_power_w, run_energy_gpu_wh, run_energy_cpu_wh.

    It prints "energy: ..." at the start (what is measured, or "energy: not measurable here (why)") and the run's
    line at the end. Under DDP every rank reads its own GPU and local rank 0 of each node the RAPL counters; energies
    and CPU seconds are summed over ranks, power_w is the sum of the ranks' average powers, epoch_seconds is the
    slowest rank's and run_seconds rank 0's.
    counters: use these in every process instead of discovering (tests).
    """

    def __init__(self, powercap_root: str = POWERCAP_ROOT, poll_seconds: float | None = 30.0,
                 counters: list[Counter] | None = None):
        self.powercap_root, self.poll_seconds, self.counters = powercap_root, poll_seconds, counters
        self.meter = None

    def _sum_over_ranks(self, trainer, pl_module, values: list[float]) -> list[float]:
        dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64  # MPS has no float64
        tensor = torch.tensor(values, dtype=dtype, device=pl_module.device)
        return trainer.strategy.reduce(tensor, reduce_op="sum").tolist()

    def on_fit_start(self, trainer, pl_module):
        # after the strategy's set-up, so the model is on its device and the process group exists
        device = pl_module.device
        self.meter = EnergyMeter(gpus=[device.index or 0] if device.type == "cuda" else [],
                                 rapl=trainer.local_rank == 0, powercap_root=self.powercap_root,
                                 poll_seconds=self.poll_seconds, counters=self.counters).start()
        # every rank must log the same columns: a kind counts if any rank reads it
        gpu_count, cpu_count = self._sum_over_ranks(trainer, pl_module,
                                                    [self.meter.has("gpu"), self.meter.has("cpu")])
        self.kinds = [kind for kind, count in (("gpu", gpu_count), ("cpu", cpu_count)) if count > 0]
        # a run resumed in the middle of an epoch (SLURM requeue checkpoint) gets no on_train_epoch_start for it
        self.epoch_start = self.meter.read()
        if trainer.is_global_zero:
            why = f" ({'; '.join(self.meter.problems)})" if self.meter.problems else ""
            if self.kinds:
                print(f"energy: measuring {' and '.join(k.upper() for k in self.kinds)} counters "
                      f"(rank 0: {', '.join(c.name for c in self.meter.counters)}){why}")
            else:
                print(f"energy: not measurable here{why}; logging epoch_seconds and epoch_cpu_seconds instead")

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start = self.meter.read()

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = self.meter.read() - self.epoch_start
        values = {"epoch_seconds": (epoch.seconds, "max"), "epoch_cpu_seconds": (epoch.cpu_seconds, "sum")}
        if self.kinds:
            values["energy_wh"] = (epoch.energy_wh or 0.0, "sum")
            values["power_w"] = (epoch.power_w or 0.0, "sum")
        for kind in self.kinds:
            values[f"energy_{kind}_wh"] = ((epoch.gpu_wh if kind == "gpu" else epoch.cpu_wh) or 0.0, "sum")
        for name, (value, reduce_fx) in values.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx=reduce_fx)

    def on_train_end(self, trainer, pl_module):
        run = self.meter.stop()
        summed = self._sum_over_ranks(trainer, pl_module, [run.gpu_wh or 0.0, run.cpu_wh or 0.0, run.cpu_seconds])
        total = Reading(run.seconds, summed[2], summed[0] if "gpu" in self.kinds else None,
                        summed[1] if "cpu" in self.kinds else None)
        metrics = {"run_seconds": total.seconds, "run_cpu_seconds": total.cpu_seconds}
        if total.measured:
            metrics.update(run_energy_wh=total.energy_wh, run_power_w=total.power_w or 0.0)
        for kind in self.kinds:
            metrics[f"run_energy_{kind}_wh"] = total.gpu_wh if kind == "gpu" else total.cpu_wh
        for logger in trainer.loggers:  # loggers write on rank 0 only
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            print(f"{format_report(total)} (whole fit)")


class EpochLine(Callback):
    """One line per epoch on the console: what a newcomer looks at while a run trains. It also logs
    train_images_per_second: images (patches or frames) of the epoch's training part over its wall time, validation
    left out, summed over the processes under DDP; the GPU figure of docs/results.md."""

    def on_fit_start(self, trainer, pl_module):
        self.start = self.train_end = None  # a run resumed in the middle of an epoch starts no epoch before its end
        self.images = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.start, self.train_end, self.images = time.perf_counter(), None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += len(batch["image"])

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking and self.train_end is None:
            self.train_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):  # after the epoch's validation
        now = time.perf_counter()
        train_seconds = (self.train_end or now) - (self.start or now)
        rate = self.images / train_seconds if self.start and train_seconds > 0 else 0.0
        pl_module.log("train_images_per_second", rate, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="sum")
        if trainer.is_global_zero:
            metrics = trainer.callback_metrics
            values = "  ".join(f"{name} {float(metrics[name]):.4f}" for name in
                               ("train_loss", "val_loss", "val_instance_dice") if name in metrics)
            took = f"{now - self.start:.1f} s ({rate:.3g} images/s in training)" if self.start else ""
            print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {values}  {took}", flush=True)


def warmed_ema(decay: float):
    """AveragedModel's avg_fn for an exponential moving average whose decay grows towards `decay` over the first
    updates: min(decay, (1 + n) / (10 + n)) at the n-th (the warm-up of TensorFlow's and timm's EMA), so that the
    average of a run of a few hundred steps is not held near its starting weights.

    >>> average = warmed_ema(0.99)
    >>> float(average(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1)))  # decay 2/11 at the first update
    0.8181818127632141
    """
    def average(averaged: torch.Tensor, current: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        n = float(updates)
        weight = min(decay, (1 + n) / (10 + n))
        return averaged * weight + current * (1 - weight)
    return average


class WarmedEMA(WeightAveraging):
    """Lightning's weight averaging (the average is validated and checkpointed, and kept at the end) with warmed_ema."""

    def __init__(self, decay: float):
        super().__init__(use_buffers=True, avg_fn=warmed_ema(decay))
