"""Signals and SLURM: how a run stops and continues. A single-process run stops at once on SIGTERM
(stop_on_sigterm); under SLURM the job's warning signal saves a checkpoint and requeues the job (RequeueOnSignal), and
the requeued job resumes by itself (train.py). slurm_settings gives Lightning the job's processes and nodes."""
import os
import signal
import subprocess

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment


def slurm_settings(devices=None, num_nodes=None) -> tuple[bool, list, object, int]:
    """(under SLURM, the Trainer's plugins, devices, nodes). Under srun, one process per task:
    Lightning's SLURMEnvironment reads ranks from the job (without CUDA the same processes train on the CPU, DDP
    over gloo); its own auto-requeue is off (RequeueOnSignal does that)."""
    slurm = SLURMEnvironment.detect()
    plugins = [SLURMEnvironment(auto_requeue=False)] if slurm else []
    devices = devices or (os.environ.get("SLURM_NTASKS_PER_NODE", "1") if slurm else "auto")
    num_nodes = num_nodes or (int(os.environ.get("SLURM_NNODES", 1)) if slurm else 1)
    return slurm, plugins, devices, num_nodes


def requeued() -> bool:
    """A job that SLURM requeued (time limit, preemption) continues its run without being told."""
    return int(os.environ.get("SLURM_RESTART_COUNT", 0)) > 0


class RequeueOnSignal(Callback):
    """SLURM's warning signal before the time limit: save a checkpoint, then `scontrol requeue` the job, which
    resumes from it. Lightning's own auto-requeue does both inside the signal handler, on each rank at whatever
    moment the signal lands; under DDP the handler's barrier can meet another rank's gradient all-reduce and both
    wait forever (Lightning issue #21406; 2 of 5 tries hung here). So the handler only takes note, and all ranks act
    on it together at the end of a training step."""

    def __init__(self, path: str):
        self.path, self.signalled = path, False
        # at once: until a handler is set, SIGUSR1 ends the process. Forked loader workers inherit it: harmless there.
        signal.signal(signal.SIGUSR1, lambda signum, frame: setattr(self, "signalled", True))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Not after an epoch's last batch: resumed from there, Lightning would end the epoch without its train_loss
        # (the epoch's mean is not in a checkpoint). The epoch's end writes last.ckpt; the next batch acts on it.
        if trainer.num_training_batches > 1 and batch_idx + 1 == trainer.num_training_batches:
            return
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):  # no rank got it
            return
        self.signalled = False
        trainer.save_checkpoint(self.path)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            job = os.environ["SLURM_JOB_ID"]
            print(f"warning signal: saved {self.path}, requeueing job {job}", flush=True)
            # SLURM then ends this start (SIGTERM); the job starts again with SLURM_RESTART_COUNT > 0
            if subprocess.run(["scontrol", "requeue", job]).returncode:
                print(f"warning: scontrol requeue {job} failed; continue later with --resume", flush=True)


class Terminated(BaseException):
    """Raised by the SIGTERM handler wherever the main thread is; BaseException so that no `except Exception` in
    between swallows it."""


def stop_on_sigterm():
    """`kill <pid>` stops training at once. Lightning's own handler only sets a flag that the loop reads at the end of
    a step, a minute away on a CPU at the default size. This handler raises instead: Lightning tears the loaders down
    (their workers with them) and the checkpoints on disk stay those of the last complete epoch (Lightning writes a
    checkpoint to a temporary file and renames it, so an interrupted save leaves the old one). Single process only:
    under DDP (and SLURM, whose requeue path sends SIGTERM to every rank) ranks must stop together, at a step's end."""
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid:  # a forked loader worker: the parent stops it
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process outright
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)  # Lightning calls it after its own, from the handler it installs in fit
