"""One daemon per archive folder: an flock on the folder itself.

Two daemons on one folder would each consume and delete the other's journal segments. The
kernel releases the flock when the process ends however it ends (kill -9 included), so a
killed daemon never leaves the folder locked.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from linewatch.runtime.sinks.archive.errors import ArchiveError


class FolderLock:
    """An exclusive, non-blocking flock on `folder`: acquire() or ArchiveError naming the folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None  # fd of the folder, flocked while held

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ArchiveError(f"runtime.archive.path: {self.folder} is in use by another linewatch "
                                   "(one daemon per archive folder)") from None
            raise ArchiveError(f"runtime.archive.path: cannot lock {self.folder}: {e.strerror or e}") from None
        self._fd = fd

    def release(self) -> None:
        """Let go of the folder (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # (the flock goes with it)
            self._fd = None
