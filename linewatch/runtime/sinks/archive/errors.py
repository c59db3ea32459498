"""What goes wrong in the archive: named (ArchiveError: it cannot be opened; RowRefused: the
journal did not take a row; failure_reason: a short, stable label for a failed write), and
reported (Losses: rows and pictures dropped, counted and logged at a bounded rate)."""

from __future__ import annotations

import errno
import sqlite3
import threading
from typing import Any

from linewatch.runtime.pipeline.clock import Clock
from linewatch.runtime.ops.logs import RateLimiter
from linewatch.runtime.ops.metrics import Metrics
from linewatch.wire import Verdict

LOG_INTERVAL_S = 10.0  # at most one log line per failure reason per interval


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


class Losses:
    """Reports what the archive loses: a dropped row or picture is counted (`rows`, `pictures`,
    and sink_dropped{sink="archive_row" / "archive_image", reason}) and logged; any log line
    goes out at most once per key per `interval_s`, with how many were held back since."""

    def __init__(self, metrics: Metrics, log: Any, clock: Clock, interval_s: float = LOG_INTERVAL_S) -> None:
        self._metrics = metrics
        self._log = log
        self._clock = clock
        self._limiter = RateLimiter(interval_s)
        self._lock = threading.Lock()  # (rows are dropped on the output thread and the background thread)
        self.rows = 0
        self.pictures = 0

    def log(self, key: str, level: str, event: str, **fields: Any) -> None:
        """`event` at `level` ("error", "warning"), unless one for `key` went out within the interval."""
        held_back = self._limiter.allow(key, self._clock.monotonic())
        if held_back is not None:
            getattr(self._log, level)(event, **fields, not_logged_since_last=held_back)

    def row(self, reason: str, error: BaseException | None = None, **where: Any) -> None:
        with self._lock:
            self.rows += 1
        self._metrics.sink_dropped.labels(sink="archive_row", reason=reason).inc()
        self.log(f"row:{reason}", "error", "archive_row_failed", reason=reason,
                 error=repr(error) if error else None, **where)

    def picture(self, reason: str, verdict: Verdict, error: BaseException | None = None) -> None:
        with self._lock:
            self.pictures += 1
        self._metrics.sink_dropped.labels(sink="archive_image", reason=reason).inc()
        self.log(f"picture:{reason}", "warning", "archive_picture_dropped", reason=reason, camera=verdict.camera,
                 frame_id=verdict.frame_id, error=repr(error) if error else None)
