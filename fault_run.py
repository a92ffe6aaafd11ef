"""A longer fault run: kill training and inference at random moments (SIGKILL or SIGTERM), continue with --resume /
run again, and check that every continuation starts from a whole checkpoint and that the final model scores as an
uninterrupted run with the same seed does. A script, not a test: minutes on a CPU.

    python fault_run.py --kills 20 --out_dir runs/fault_run

Writes a small simulated dataset, trains it once uninterrupted (the reference), then once with --kills random
interruptions of training (each followed by --resume) and of inference (each followed by a rerun with --overwrite),
and prints one line per interruption and the two final scores.
"""
import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd

from cli_types import HelpFormatter, positive_int
from eval import evaluate
from unet import load_checkpoint

ROOT = os.path.dirname(os.path.abspath(__file__))


def train_args(data: str, run: str, epochs: int) -> list[str]:
    return [sys.executable, "train.py", "--root_dir", data, "--out_dir", run, "--config", "recipes/faithful.yaml",
            "--num_epochs", str(epochs), "--set", "input_size=64", "--batch_size", "4", "--num_workers", "1"]


def interrupted(command: list[str], after: float, how: int, wait_for: str | None = None) -> tuple[int, bool]:
    """Run a command, send it `how` `after` seconds after it started or, with `wait_for`, after that file was
    (re)written by it; (its exit status, whether the signal was sent: not where it had ended by itself)."""
    before = os.path.getmtime(wait_for) if wait_for and os.path.exists(wait_for) else None
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while wait_for and process.poll() is None:
        if os.path.exists(wait_for) and os.path.getmtime(wait_for) != before:
            break
        time.sleep(0.2)
    sent = False
    try:
        process.wait(timeout=after)
    except subprocess.TimeoutExpired:
        process.send_signal(how)
        sent = True
    process.communicate()
    return process.returncode, sent


def score(data: str, checkpoint: str, pred: str) -> float:
    subprocess.run([sys.executable, "inference.py", "--root_dir", data, "--seqs", "c", "--from_checkpoint", checkpoint,
                    "--pred_dir", pred, "--overwrite", "--num_workers", "0"], cwd=ROOT, check=True,
                   capture_output=True)
    return float(evaluate(pred, data, ["c"])["score"].mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--kills", type=positive_int, default=20, help="interruptions in all")
    parser.add_argument("--epochs", type=positive_int, default=12, help="epochs of each training")
    parser.add_argument("--out_dir", default="runs/fault_run", help="working folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the interruption times")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    data, reference, faulty = (os.path.join(args.out_dir, name) for name in ("data", "reference", "faulty"))
    for run in (reference, faulty):  # this script's own runs: each time anew
        shutil.rmtree(run, ignore_errors=True)
    if not os.path.isdir(data):
        subprocess.run([sys.executable, "simulate.py", "--out_dir", data, "--sequences", "3", "--without_gt", "0",
                        "--frames", "8", "--size", "128", "--seed", "0"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(train_args(data, reference, args.epochs), cwd=ROOT, check=True, capture_output=True)
    epochs = pd.read_csv(os.path.join(reference, "metrics.csv")).dropna(subset=["train_loss"])
    epoch_seconds = float(epochs["epoch_seconds"].median())
    kills, resumes, whole, defects = 0, 0, 0, []
    last = os.path.join(faulty, "checkpoints", "last.ckpt")
    while True:
        done = load_checkpoint(last)["epoch"] + 1 if os.path.isfile(last) else 0
        if done >= args.epochs and kills >= args.kills:
            break
        command = train_args(data, faulty, args.epochs) + (["--resume"] if os.path.isfile(last) else [])
        if done >= args.epochs or kills >= args.kills:  # training done: interrupt inference; or no kills left
            if kills < args.kills:
                how = rng.choice([signal.SIGKILL, signal.SIGTERM])
                predict = [sys.executable, "inference.py", "--root_dir", data, "--seqs", "c", "--from_checkpoint",
                           last, "--pred_dir", os.path.join(faulty, "pred"), "--overwrite", "--num_workers", "0",
                           "--postprocess_workers", "0"]
                status, sent = interrupted(predict, rng.uniform(1, 6), how)
                kills += sent
                print(f"{f'kill {kills}' if sent else 'no kill'}: inference, {signal.Signals(how).name}, exit {status}"
                      + ("" if sent else " (it had ended by itself)"), flush=True)
                if sent and how == signal.SIGTERM and status == 0:
                    defects.append(f"kill {kills}: inference, SIGTERM, yet exit status 0")
                continue
            subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
            continue
        how = rng.choice([signal.SIGKILL, signal.SIGTERM])
        # a moment into the epoch after the next checkpoint: training is under way, with a checkpoint to resume from
        status, sent = interrupted(command, rng.uniform(0, 1.5 * epoch_seconds), how, wait_for=last)
        if sent and how == signal.SIGTERM and status == 0:
            defects.append(f"kill {kills + 1}: SIGTERM, yet exit status 0")
        kills += sent
        if os.path.isfile(last):
            load_checkpoint(last)  # whole and ours, or this raises
            whole += 1
        resumes += "--resume" in command
        print(f"{f'kill {kills}' if sent else 'no kill'}: training at epoch {done}, {signal.Signals(how).name}, exit "
              f"{status}{'' if sent else ' (it had ended by itself)'}; last.ckpt "
              f"{'whole' if os.path.isfile(last) else 'not yet written'}", flush=True)
    scores = [score(data, os.path.join(run, "checkpoints", "last.ckpt"), os.path.join(run, "pred_final"))
              for run in (reference, faulty)]
    print(f"{kills} interruptions, {resumes} resumed runs, every last.ckpt whole after each ({whole} checked); "
          f"Instance Dice on sequence c: uninterrupted {scores[0]:.4f}, interrupted and resumed {scores[1]:.4f}; "
          f"defects: {'; '.join(defects) or 'none'}")


if __name__ == "__main__":
    main()
