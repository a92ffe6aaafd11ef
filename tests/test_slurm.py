"""The project's real sbatch scripts on a throwaway single-node SLURM (tests/slurm/cluster.sh; needs root, installs
slurm-wlm and munge with apt-get when missing): the chain train.sh -> inference.sh -> eval.sh with 2 DDP tasks on
the CPU, `sbatch train.sh -r aihero-gpu`, and a training job that gets the time-limit warning signal, requeues itself
and resumes. Every wait is bounded; a job that overruns is cancelled, and a failed job's log is in the failure."""
import fcntl
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, write_dataset
from unet import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

CLUSTER_SH = os.path.join(ROOT, "tests", "slurm", "cluster.sh")
STATE_DIR = "/tmp/aihero-test-slurm"  # fixed, so that `up` stops whatever a killed earlier session left running
LOCK_FILE = "/tmp/aihero-test-slurm.lock"  # one test cluster per machine: another checkout's suite waits its turn
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED"}
FRAMES = 5  # per sequence: a, b train (10 frames), c validates, d has no GT
TINY = ["--batch_size", "2", "--config", os.path.join(ROOT, "recipes", "faithful.yaml"), "--set", "input_size=64"]


class Cluster:
    def __init__(self, env: dict):
        self.env = env

    def run(self, *command, env=None, timeout=60) -> str:
        result = subprocess.run(command, env=dict(self.env, **(env or {})), cwd=ROOT, capture_output=True,
                                text=True, timeout=timeout)
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def sbatch(self, *args, env=None) -> str:
        return self.run("sbatch", "--parsable", *args, env=env).strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """Fields of `scontrol show job` (first word of each value), plus the job's log as "log"."""
        fields = dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "--oneliner", "show", "job", job_id)))
        log = Path(fields.get("StdOut", ""))
        fields["log"] = log.read_text() if log.is_file() else ""
        return fields

    def wait(self, job_id: str, until=lambda job: job["JobState"] in FINAL_STATES, timeout=300) -> dict:
        deadline = time.monotonic() + timeout
        while not until(job := self.job(job_id)):
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], env=self.env, timeout=30)
                pytest.fail(f"job {job_id} still {job['JobState']} after {timeout} s; cancelled. Log:\n{job['log']}")
            time.sleep(0.5)
        return job


def assert_completed(job: dict):
    state = (job["JobState"], job["ExitCode"])
    assert state == ("COMPLETED", "0:0"), f"job {job['JobId']}: {state}. Log:\n{job['log']}"


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the test SLURM needs root (munged, slurmctld, slurmd)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(SLURM_CONF=os.path.join(STATE_DIR, "slurm.conf"), VENV=sys.prefix)
    with open(LOCK_FILE, "w") as lock:
        deadline = time.monotonic() + 900
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test session has held the test SLURM ({LOCK_FILE}) for 15 minutes")
                time.sleep(1)
        try:
            up = subprocess.run(["bash", CLUSTER_SH, "up", STATE_DIR], env=env, capture_output=True, text=True,
                                timeout=900)
            assert up.returncode == 0, f"tests/slurm/cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
            yield Cluster(env)
        finally:
            subprocess.run(["bash", CLUSTER_SH, "down", STATE_DIR], env=env, capture_output=True, timeout=120)


def test_chain_trains_with_two_ddp_tasks_then_predicts_then_scores(cluster, tmp_path):
    root = write_dataset(tmp_path / "data", frames=FRAMES)
    run, pred = tmp_path / "run", tmp_path / "pred"
    stdout = cluster.run("bash", "submit_chain.sh", f"--output={tmp_path}/%x-%j.out", env=dict(
        DATA=root, RUN_DIR=str(run), PRED_DIR=str(pred), GPU_RESERVATION="aihero-gpu", CPU_RESERVATION="aihero",
        TRAIN_SBATCH="--ntasks-per-node=2", TRAIN_ARGS=" ".join(["--num_epochs", "2", "--num_workers", "0", *TINY]),
        INFERENCE_ARGS="--batch_size 4 --num_workers 0 --postprocess_workers 0"))
    jobs = dict(re.findall(r"^(train|inference|eval): job (\d+)", stdout, re.M))
    assert set(jobs) == {"train", "inference", "eval"}, stdout

    train = cluster.wait(jobs["train"], timeout=300)
    assert_completed(train)
    assert (train["Partition"], train["Reservation"]) == ("accelerated", "aihero-gpu")
    # Lightning's DDP over the job's 2 tasks; without CUDA (the 4 GPUs are fake) on the CPU with gloo
    assert "distributed_backend=gloo" in train["log"] and "Starting with 2 processes" in train["log"], train["log"]
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    val = pd.read_csv(run / "metrics.csv").dropna(subset=["val_instance_dice"])
    assert list(val["epoch"]) == [0, 1] and list(val["val_frames"]) == [FRAMES, FRAMES]

    inference = cluster.wait(jobs["inference"], timeout=180)
    assert_completed(inference)
    assert inference["StartTime"] >= train["EndTime"]  # afterok: not before training ended
    assert sorted(os.listdir(pred / "c")) == [f"t{t:04d}_256.tif" for t in range(FRAMES)]  # the val split

    evaluation = cluster.wait(jobs["eval"], timeout=180)
    assert_completed(evaluation)
    assert (evaluation["Partition"], evaluation["Reservation"]) == ("cpuonly", "aihero")
    assert evaluation["StartTime"] >= inference["EndTime"]
    scores = re.findall(r"^Mean Instance Dice: ([0-9.]+)$", evaluation["log"], re.M)
    assert len(scores) == 1 and 0 <= float(scores[0]) <= 1, evaluation["log"]


def test_reservation_after_the_script_name_is_reported_not_applied(cluster, tmp_path):
    root = write_dataset(tmp_path / "data", sequences=("a", "b", "c"), unlabelled=(), frames=FRAMES)
    job_id = cluster.sbatch("--ntasks-per-node=1", f"--output={tmp_path}/%x-%j.out", "train.sh", "-r", "aihero-gpu",
                            "--num_epochs", "1", "--num_workers", "0", *TINY,
                            env=dict(DATA=root, RUN_DIR=str(tmp_path / "run")))
    job = cluster.wait(job_id, timeout=300)
    assert_completed(job)  # it still trains, outside the reservation
    assert "Reservation" not in job  # scontrol names one only for a job that has it
    warnings = [line for line in job["log"].splitlines() if "NOT applied" in line]
    assert len(warnings) == 1 and "reservation aihero-gpu" in warnings[0], job["log"]
    assert warnings[0].endswith("apply it with: sbatch --reservation=aihero-gpu train.sh")
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_warning_signal_requeues_the_job_and_it_resumes_to_the_same_end(cluster, tmp_path):
    epochs = 6
    root = write_dataset(tmp_path / "data", sequences=("a", "b", "c"), unlabelled=(), frames=FRAMES)
    run = tmp_path / "run"
    # loader workers too: SLURM signals every process of the job step, and they must not act on it
    job_id = cluster.sbatch("--reservation=aihero-gpu", "--ntasks-per-node=2", f"--output={tmp_path}/%x-%j.out",
                            "train.sh", "--num_epochs", str(epochs), "--num_workers", "1", *TINY,
                            env=dict(DATA=root, RUN_DIR=str(run)))
    # the signal comes once epoch 0 is saved, so there is a run to continue; the job must still be training
    job = cluster.wait(job_id, until=lambda job: (run / "checkpoints" / "last.ckpt").is_file()
                       or job["JobState"] in FINAL_STATES, timeout=300)
    assert job["JobState"] == "RUNNING", f"job ended before the signal:\n{job['log']}"
    # what `#SBATCH --signal=USR1@180` sends 3 minutes before the time limit: SIGUSR1 to every process of its steps
    cluster.run("scancel", "--signal=USR1", job_id)
    # SLURM holds a requeued job back for about 2 minutes (BeginTime); as its administrators we start it at once
    cluster.wait(job_id, until=lambda job: job["Restarts"] != "0" and job["JobState"] == "PENDING"
                 or job["JobState"] in FINAL_STATES, timeout=120)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=cluster.env, timeout=30)
    job = cluster.wait(job_id, timeout=300)
    assert_completed(job)
    assert job["Restarts"] == "1"
    log = job["log"]
    assert log.count("warning signal: saved") == 1, log  # once, by rank 0 (the loader workers get the signal too)
    assert (run / "checkpoints" / "requeue.ckpt").is_file() and "(start 2)" in log, log
    # from requeue.ckpt, or from last.ckpt when an epoch ended before SLURM stopped the first start
    assert re.search(rf"Restored all states from the checkpoint at {run}/checkpoints/(requeue|last)\.ckpt", log), log

    # the same end as a run that was never interrupted: every epoch once, all steps, every val frame once per epoch
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.dropna(subset=["train_loss"])["epoch"]) == list(range(epochs))
    val = metrics.dropna(subset=["val_instance_dice"])
    assert list(val["epoch"]) == list(range(epochs)) and (val["val_frames"] == FRAMES).all()
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    steps_per_epoch = math.ceil(2 * FRAMES / 2 / 2)  # 10 training frames over 2 processes, batches of 2
    assert (last["epoch"], last["global_step"]) == (epochs - 1, epochs * steps_per_epoch)


def test_scripts_run_without_slurm(tmp_path):
    """bash train.sh / inference.sh / eval.sh on the machine at hand, from another folder: the repository is found
    from the script's own path, and `-r` is reported as not applied here too."""
    root = write_dataset(tmp_path / "data", frames=FRAMES)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(DATA=root, RUN_DIR=str(tmp_path / "run"), PRED_DIR=str(tmp_path / "pred"), VENV=sys.prefix)

    def bash(script, *args):
        result = subprocess.run(["bash", os.path.join(ROOT, script), *args], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{script}:\n{result.stdout}\n{result.stderr}"
        return result

    trained = bash("train.sh", "-r", "aihero-gpu", "--num_epochs", "1", "--num_workers", "0", *TINY)
    assert trained.stderr.count("NOT applied") == 1 and "sbatch --reservation=aihero-gpu train.sh" in trained.stderr
    bash("inference.sh", "--batch_size", "4", "--num_workers", "0", "--postprocess_workers", "0")
    assert sorted(os.listdir(tmp_path / "pred" / "c")) == [f"t{t:04d}_256.tif" for t in range(FRAMES)]
    scored = bash("eval.sh")
    assert re.search(r"^Mean Instance Dice: [0-9.]+$", scored.stdout, re.M), scored.stdout
