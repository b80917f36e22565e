"""Crash-safe checkpoints: a file that is either the old checkpoint or the new one, never a torn mix.

A plain ``torch.save(state, path)`` truncates ``path`` and then writes it: a kill, an out-of-memory or a
full disk midway leaves a file that no longer loads, and the previous checkpoint is gone with it.

    from fused_lagrangian.checkpoint import save_atomic
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, "run/last.pt")

``save_atomic`` writes a temporary file in the same directory, flushes it and fsyncs it to the disk,
then renames it over ``path`` (``os.replace``: atomic on POSIX and Windows within one file system) and
fsyncs the directory so that the rename itself survives a power loss.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Union

import torch

PathLike = Union[str, os.PathLike]


def save_atomic(obj: Any, path: PathLike, **save_options) -> None:
    """``torch.save(obj, path, **save_options)``, all or nothing: on any failure ``path`` is unchanged."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        # mkstemp makes the file private (0600); give it what torch.save would have left.
        os.chmod(temporary, _mode_for(path))
        with os.fdopen(descriptor, "wb") as file:
            torch.save(obj, file, **save_options)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _mode_for(path: str) -> int:
    """The replaced file's permissions, or those a new file gets under the process's umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_directory(directory: str) -> None:
    """Makes a rename in ``directory`` durable (POSIX; Windows has no directory handles to fsync)."""
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
