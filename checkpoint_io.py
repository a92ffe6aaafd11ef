"""Checkpoints that survive a full disk, a kill and a copy to another filesystem: Lightning's own save writes to a
temporary file wherever fsspec puts it (often $TMPDIR, another filesystem than the run folder) and, where the rename
across filesystems fails, truncates the old checkpoint and copies into it; a full disk then leaves an empty or cut
`last.ckpt`. Here the checkpoint is serialised in memory, written to a temporary file in its own folder, flushed and
fsynced, renamed over the old one (atomic within one filesystem) and the folder fsynced, so that the rename itself
survives a power cut. Any failure leaves the old checkpoint as it was and no temporary file.

    trainer = lightning.Trainer(..., plugins=[AtomicCheckpointIO()])

A failed write raises an OSError whose filename is the checkpoint (data_files.error_line:
`error: <run>/checkpoints/last.ckpt: disk full`).
"""
import io
import os
import tempfile

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from data_files import new_file_mode


def fsync_folder(folder: str):
    """Make a rename in `folder` durable (where the OS lets a folder be opened; not on every platform)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename is done all the same
        pass
    finally:
        os.close(fd)


def write_bytes_atomically(path: str, data: bytes):
    """`data` into `path`, whole or not at all: a temporary file beside it, fsync, rename, fsync of the folder. An
    OSError names `path` (not the temporary file) and the temporary file is gone."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, new_file_mode())  # mkstemp's 0600 would hide the checkpoint from the group
        os.replace(tmp, path)
        tmp = None
        fsync_folder(folder)
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), path) from error
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose save never harms the previous checkpoint (see the module's docstring). Loading and
    removing are Lightning's."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # in memory first: a checkpoint that cannot be serialised touches no file
        write_bytes_atomically(path, buffer.getbuffer())
