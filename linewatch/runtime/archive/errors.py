"""What goes wrong in the archive, named: ArchiveError (it cannot be opened), RowRefused (the
journal did not take a row), and failure_reason (a short, stable label for a failed write)."""

from __future__ import annotations

import errno
import sqlite3


class ArchiveError(RuntimeError):
    """The archive cannot be opened, or its folder holds something that is not one (names the path and why)."""


class RowRefused(Exception):
    """record() did not write the row, for `reason` (a metrics label)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def failure_reason(error: BaseException) -> str:
    """A short, stable label for a failed write (a metrics label): the journal's, or SQLite's."""
    if isinstance(error, RowRefused):
        return error.reason
    if isinstance(error, OSError):
        return {errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_full", errno.EIO: "io_error",
                errno.EROFS: "read_only", errno.EBADF: "closed"}.get(error.errno or 0, "error")
    if isinstance(error, sqlite3.ProgrammingError):
        return "closed"
    code = getattr(error, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    return {sqlite3.SQLITE_FULL: "disk_full", sqlite3.SQLITE_BUSY: "locked", sqlite3.SQLITE_LOCKED: "locked",
            sqlite3.SQLITE_IOERR: "io_error", sqlite3.SQLITE_READONLY: "read_only",
            sqlite3.SQLITE_CORRUPT: "corrupt"}.get(primary, "error")
