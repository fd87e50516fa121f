"""An advisory lock on a directory one looplm process writes for a long time (a training run).

A second process started on the same directory (the same command run twice, a resume while the
run still trains, ``--overwrite`` aimed at a running run) would otherwise write beside the first:
checkpoints and metrics interleaved, keep-last pruning deleting the other's checkpoints, or the
running run's files emptied.  ``DirectoryLock`` takes ``flock`` on the directory itself: no lock
file to leave behind, and the kernel releases it when the process ends, however it ends.  Where
there is no ``flock`` (Windows) or the file system refuses it, no lock is taken.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from looplm.errors import LoopLMError


class DirectoryLock:
    """``acquire`` the lock on ``directory`` (which exists) or raise one line naming ``option``;
    ``release`` it (also when the object is dropped)."""

    def __init__(self, directory: Path, option: str = "--out"):
        self.directory, self.option, self._descriptor = Path(directory), option, None

    def acquire(self) -> DirectoryLock:
        try:
            import fcntl
        except ImportError:  # Windows: no flock
            return self
        descriptor = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LoopLMError(f"{self.option} {str(self.directory)!r} is in use by another looplm process (a run"
                                  " training there): wait for it to finish or stop it, or choose another"
                                  f" {self.option}") from None
            return self  # a file system without flock (some network mounts): no lock
        self._descriptor = descriptor
        return self

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the descriptor drops the lock
            self._descriptor = None

    def __del__(self) -> None:
        self.release()
