"""One writer per output folder: a run takes an exclusive lock on <folder>/.lock for as long as it writes there, and a
second run into the same folder stops at once with one line naming the holder.

    with lock_folder(args.out_dir, "train.py"):
        ...   # write checkpoints, logs, predictions

The lock is an flock(2) lock on an open file: the kernel drops it when the holder exits, crashes or is killed with
SIGKILL, so a stale lock file never blocks the next run. The file holds the holder's pid, host and script for the
message; it is left in place (removing it would let a third run lock a new file while a second still waits on the
old one). On NFS, Linux maps flock to a POSIX lock that every client sees; where the filesystem offers no locks at
all, the run goes on unlocked with a warning.
"""
import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import warnings

from data_files import DataError

LOCK_FILE = ".lock"


class FolderInUse(DataError):
    """Another run holds the folder's lock. The message is one line: '<folder>: in use by ...'."""


def holder_of(lock_path: str, attempts: int = 10) -> dict:
    """What the lock file says of its holder; empty if unreadable. A holder that has just taken the lock may not have
    written it yet: read again a few times, briefly."""
    for attempt in range(attempts):
        try:
            with open(lock_path) as file:
                holder = json.load(file)
            if isinstance(holder, dict):
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def in_use_message(path: str, holder: dict) -> str:
    what = holder.get("what", "another run")
    where = f"pid {holder['pid']} on host {holder['host']}" if "pid" in holder and "host" in holder \
        else "holder unknown"
    return f"{path}: in use by {what} ({where}); wait for it or choose another folder"


@contextlib.contextmanager
def lock_folder(path: str, what: str):
    """Hold an exclusive lock on `path` (created if needed) for the duration of the block; `what` names this run in
    the message a second run gets (the script, e.g. 'train.py'). Raises FolderInUse when another holds it."""
    os.makedirs(path, exist_ok=True)
    lock_path = os.path.join(path, LOCK_FILE)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUse(in_use_message(path, holder_of(lock_path))) from None
        except OSError as error:  # ENOLCK, EINVAL, ENOSYS: the filesystem has no locks to offer
            if error.errno not in (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            warnings.warn(f"{path}: the filesystem offers no file locks ({error.strerror}); a second run into this "
                          "folder would not be stopped")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record + b"\n", 0)
        yield lock_path
        os.ftruncate(fd, 0)  # still held here: no one reads a departed holder's pid
    finally:
        os.close(fd)  # releases the lock
