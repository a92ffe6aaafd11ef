"""Checkpoints that survive a full disk, a kill and a copy to another filesystem: Lightning's own save writes to a
temporary file wherever fsspec puts it (often $TMPDIR, another filesystem than the run folder) and, where the rename
across filesystems fails, truncates the old checkpoint and copies into it; a full disk then leaves an empty or cut
`last.ckpt`. Here the checkpoint is serialised in memory, written to a temporary file in its own folder, flushed and
fsynced, renamed over the old one (atomic within one filesystem) and the folder fsynced, so that the rename itself
survives a power cut. Any failure leaves the old checkpoint as it was and no temporary file.

    trainer = lightning.Trainer(..., plugins=[AtomicCheckpointIO()])

The write is data_files.atomic_write's (durable): a failed write raises a DataError naming the checkpoint
(`error: <run>/checkpoints/last.ckpt: cannot write (disk full)`).
"""
import io
import os

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from data_files import atomic_write


def write_bytes(path: str, data) -> None:
    with open(path, "wb") as file:
        file.write(data)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose save never harms the previous checkpoint (see the module's docstring). Loading and
    removing are Lightning's."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # in memory first: a checkpoint that cannot be serialised touches no file
        atomic_write(os.fspath(path), lambda tmp: write_bytes(tmp, buffer.getbuffer()), ".ckpt.tmp", durable=True)
