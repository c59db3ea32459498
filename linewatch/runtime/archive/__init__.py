"""The verdict archive (traceability): every verdict a row of an SQLite file, pictures beside it.

Layout of `runtime.archive.path`::

    journal-<n>.jsonl                       verdicts recorded: a JSON array of the COLUMNS a line (see below)
    verdicts.sqlite (+ -wal, -shm)          one row per verdict, schema version in PRAGMA user_version
    images/<YYYY-MM-DD>/<id>.png            the frame as judged, lossless (RGB, 8 bit; .bmp with frame_format bmp)
                        <id>.heatmap.npz    the anomaly map, float16: np.load(f)["heatmap"]
                        <id>.overlay.jpg    heatmap + object boxes + banner, for a person

`<id>` is the verdict id ("<run_id>-<seq>"), the day is the UTC day the verdict was archived,
and a row's `pictures` column holds "images/<day>/<id>" when its pictures were queued (NULL
otherwise; cleared again when writing them failed or retention removed them). A picture
write queued but not done at a kill -9 leaves the column set and no file: readers check.

The verdict path. `record()` runs on the pipeline's output thread BEFORE the verdict goes to
the ZeroMQ publisher, inside a budget of 0.2 ms per verdict, which an SQLite commit per verdict
did not keep (p99 0.27-0.34 ms at 500 verdicts/s, 1.0 ms during retention; the journal line:
0.16-0.17 ms, 0.04-0.07 ms: `benchmarks/archive_bench.py`, shared 2-core VM, two runs each).
So it does not touch SQLite: it encodes the row as
one JSON line and appends it to the journal with one os.write() on a file opened O_APPEND.
A complete write() to a regular file is in the kernel's page cache when it returns, so every
verdict a subscriber has received is in the journal when the daemon is killed (kill -9, OOM
killer, crash), as a WAL commit was. The background thread tails the journal (every
JOURNAL_INTERVAL_S, and before each picture it writes) and INSERTs the new lines in one
transaction: a row is queryable a fraction of a second after its verdict was published.
`start()` first replays what a killed daemon left in the journal; `stop()` inserts the rest.
Verdict ids are UNIQUE, so a line inserted again (a kill after its insert, before its
segment was deleted) stays one row. A power loss or kernel crash can lose what the kernel had
not written to the disk: the journal is never fsynced, the database at each checkpoint.

The journal's segments. record() appends to the newest segment. Once the background thread
has put JOURNAL_ROTATE_BYTES of it in the database, it creates the next segment and swaps
record()'s file descriptor under `_journal_lock` (the one lock record() takes, for its
os.write), then reads what was appended to the old segment before the swap, inserts it and
deletes the file. Nothing is written to a segment after the swap, so no line can be lost
between the last read and the delete, and record() never waits for a truncate. The bytes of
the journal are bounded (`journal_limit_bytes`): a database that cannot be written for long
(locked by another process, disk full) holds rows back until then; beyond, record() drops
them, counted. One daemon per archive folder: start() takes an flock on the folder (two
daemons would each consume and delete the other's segments).

SQLite and threads. One connection, used by whoever holds `_maintenance_lock`: the background
thread (journal, pictures, checkpoints, retention) or a test calling enforce_retention().
Auto-checkpoint is off: checkpoints run on the background thread every CHECKPOINT_INTERVAL_S.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime as dt
import errno
import fcntl
import hashlib
import io
import json
import math
import multiprocessing
import os
import queue
import shutil
import signal
import sqlite3
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from linewatch.config import ArchiveConfig
from linewatch.overlay import overlay_jpeg
from linewatch.runtime.clock import SYSTEM_CLOCK, Clock
from linewatch.runtime.logs import RateLimiter
from linewatch.runtime.metrics import Metrics
from linewatch.wire import Verdict

DATABASE = "verdicts.sqlite"
IMAGES = "images"
SCHEMA_VERSION = 1
# the columns of a row, in table order (the CLI's export writes them in this order too)
COLUMNS = ("id", "run_id", "seq", "camera", "frame_id", "part_id", "capture_ts", "verdict_ts", "verdict",
           "reason", "score", "threshold", "bank_id", "backend", "latency_s", "objects", "branch_scores",
           "pictures")
JSON_COLUMNS = ("objects", "branch_scores")  # stored as JSON text (JSON values inside a journal line)
SCHEMA = """
CREATE TABLE verdicts (
    id TEXT,                    -- "<run_id>-<seq>", unique across daemon restarts
    run_id TEXT,
    seq INTEGER,
    camera TEXT NOT NULL,
    frame_id INTEGER NOT NULL,
    part_id TEXT,
    capture_ts REAL,            -- epoch seconds, the camera's clock
    verdict_ts REAL NOT NULL,   -- epoch seconds when archived (the daemon's clock); queries and retention use it
    verdict TEXT NOT NULL,      -- pass, fail, error, timeout, shed
    reason TEXT,
    score REAL,
    threshold REAL,
    bank_id TEXT,
    backend TEXT,
    latency_s REAL,             -- capture -> verdict
    objects TEXT NOT NULL,      -- JSON list
    branch_scores TEXT NOT NULL, -- JSON object
    pictures TEXT               -- "images/<day>/<id>" (+ .png or .bmp, .heatmap.npz, .overlay.jpg) or NULL
);
CREATE INDEX verdicts_time ON verdicts (verdict_ts);
CREATE INDEX verdicts_camera_time ON verdicts (camera, verdict_ts);
CREATE INDEX verdicts_pictures_time ON verdicts (verdict_ts) WHERE pictures IS NOT NULL;
"""
# Created at every start, so an archive of version 1 written before the journal gets it too
# (same schema version: a linewatch without the journal opens it as before).
UNIQUE_ID_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS verdicts_id ON verdicts (id)"
# Journal lines into rows. ON CONFLICT (id) DO NOTHING: a line inserted again (replayed after a
# kill) is skipped; any other constraint is an error. A batch of lines goes in as one JSON array
# that SQLite parses (json_each): one statement, during which Python's GIL is free for the output
# thread; lines SQLite's JSON does not take (NaN, which json writes for a float nan; a damaged
# line) go in one by one, parsed in Python.
_INSERT = f"INSERT INTO verdicts ({', '.join(COLUMNS)})"
_FROM_ARRAY = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(COLUMNS)))  # COLUMNS of a line
INSERT_LINES = f"{_INSERT} SELECT {_FROM_ARRAY} FROM json_each(?) WHERE true ON CONFLICT (id) DO NOTHING"
INSERT_ROW = f"{_INSERT} VALUES ({', '.join('?' * len(COLUMNS))}) ON CONFLICT (id) DO NOTHING"
# the files of one verdict's pictures: the `pictures` stem + these
FRAME_SUFFIXES = {"png": ".png", "bmp": ".bmp"}  # by ArchiveConfig.frame_format
HEATMAP_SUFFIX, OVERLAY_SUFFIX = ".heatmap.npz", ".overlay.jpg"
# the frame's PNG: deflate level 1 with run-length matching only (lossless like any PNG; on
# camera-like frames faster and no larger than level 1's default strategy: archive_bench.py --only encode)
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
# every file a verdict's pictures may have (a folder can hold both frame formats after a change)
PICTURE_SUFFIXES = (*FRAME_SUFFIXES.values(), HEATMAP_SUFFIX, OVERLAY_SUFFIX)

JOURNAL_PREFIX, JOURNAL_SUFFIX = "journal-", ".jsonl"  # segments journal-<n>.jsonl, n counting up
JOURNAL_INTERVAL_S = 0.05  # how often the background thread looks for new lines: the lag before a row is queryable
JOURNAL_LIMIT_BYTES = 16 * 1024 * 1024  # the journal's size limit (or max_bytes / 8): lines of ~0.5 KB, ~1 min at 500/s
JOURNAL_ROTATE_BYTES = 1024 * 1024  # a new segment once this much of the current one is in the database
# Lines per INSERT statement and transaction (a backlog goes in as several): ~250 KB of JSON
# for SQLite to parse with the GIL released. Python work holds the GIL, and the output thread
# waits for it after its os.write(); a statement per row would also cost the background thread
# up to the switch interval (5 ms) per row to get the GIL back from a thread busy in Python.
JOURNAL_BATCH_LINES = 500
CHECKPOINT_INTERVAL_S = 1.0  # WAL -> database file (and its fsync), on the background thread
RETENTION_INTERVAL_S = 60.0
RETENTION_BATCH = 100  # rows per delete statement: a short transaction
VACUUM_PAGES = 64  # pages given back to the file system per transaction
WAL_LIMIT_BYTES = 4 * 1024 * 1024  # the WAL file goes back to this size after a checkpoint (or max_bytes / 16)
# The background thread's CPU priority, below the verdict path's threads: retention and pictures
# run in C with the GIL released, a whole core's worth, and on a loaded machine they took CPU
# time from the output thread (the case retention of `benchmarks/archive_bench.py` alone, 4 runs
# each, alternating, on a shared 2-core VM: p99 of record() 0.10-1.3 ms with retention at the
# same priority, 0.03-0.08 ms with it niced by 10).
BACKGROUND_NICE = 10
PARENT_CHECK_S = 1.0  # how often the picture encoder process looks whether the daemon is still there
PICTURE_TIMEOUT_S = 30.0  # one verdict's pictures in the encoder process (a 5 MP frame: well under a second)
BUSY_TIMEOUT_MS = 5000  # another process holding the database's write lock: wait this long, then try again later
LOG_INTERVAL_S = 10.0  # at most one log line per failure reason per interval
_STOP = object()


class ArchiveError(RuntimeError):
    """The archive cannot be opened, or its folder holds something that is not one (names the path and why)."""


class _RowRefused(Exception):
    """record() did not write the row, for `reason` (a metrics label)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def picture_sampled(verdict_id: str, fraction: float) -> bool:
    """Whether a pass verdict's pictures are kept: deterministic per verdict id (a hash of it
    below `fraction`), so the same verdict is always in or out whoever asks."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    h = int.from_bytes(hashlib.blake2b(verdict_id.encode(), digest_size=8).digest(), "big")
    return h / 2.0**64 < fraction


def read_schema_version(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a database this code does not know: ArchiveError naming the path and the version."""
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        raise ArchiveError(f"{path}: not a linewatch archive ({e})") from None
    if version == SCHEMA_VERSION and "verdicts" in tables:
        return
    if version == 0 and "verdicts" not in tables:
        raise ArchiveError(f"{path}: not a linewatch archive (no verdicts table, no schema version)")
    raise ArchiveError(f"{path}: archive schema version {version}, this linewatch knows version {SCHEMA_VERSION} "
                       "(written by a newer linewatch? use that one, or another archive folder)")


def open_read_only(folder: str | Path) -> sqlite3.Connection:
    """A read-only connection to the archive in `folder` (works while a daemon writes to it:
    WAL readers see the last commit). ArchiveError when there is no archive there."""
    path = Path(folder) / DATABASE
    if not path.is_file():
        raise ArchiveError(f"{folder}: no verdict archive here ({DATABASE} not found)")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as e:
        raise ArchiveError(f"{path}: cannot open: {e}") from None
    try:
        read_schema_version(conn, path)
    except ArchiveError:
        conn.close()
        raise
    return conn


def _json_default(value: Any) -> Any:
    """numpy values in objects / branch scores as plain JSON numbers and lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# built once (json.dumps with arguments builds an encoder per call): the JSON columns' text, as
# json.dumps writes it, and the journal line around them
_COLUMN_ENCODER = json.JSONEncoder(default=_json_default)
_LINE_ENCODER = json.JSONEncoder(default=_json_default, separators=(",", ":"))


def journal_line(verdict: Verdict, verdict_ts: float, pictures: str | None) -> bytes:
    """A verdict's row as one journal line: a JSON array of the COLUMNS in order (an array: a
    third shorter and quicker to encode than an object), objects and branch_scores already as
    the JSON text stored in their columns, so the background thread only parses the line."""
    return (_LINE_ENCODER.encode([
        verdict.id, verdict.run_id, verdict.seq, verdict.camera, verdict.frame_id, verdict.part_id,
        verdict.capture_ts, verdict_ts, verdict.verdict, verdict.reason, verdict.score, verdict.threshold,
        verdict.bank_id, verdict.backend, verdict.latency_s, _COLUMN_ENCODER.encode(verdict.objects),
        _COLUMN_ENCODER.encode(verdict.branch_scores or {}), pictures]) + "\n").encode()


def _row_from_line(line: bytes) -> tuple[Any, ...]:
    """A journal line back into a row (COLUMNS order). ValueError naming what is wrong."""
    row = json.loads(line)
    if not isinstance(row, list) or len(row) != len(COLUMNS):
        raise ValueError(f"not a row of {len(COLUMNS)} columns: {line[:80]!r}")
    for column, value in zip(COLUMNS, row):
        if isinstance(value, (list, dict)) or (column in JSON_COLUMNS and not isinstance(value, str)):
            raise ValueError(f"{column}: not what the journal writes: {str(value)[:80]}")
    return tuple(row)


def lower_thread_priority(increment: int = BACKGROUND_NICE) -> None:
    """Make the calling thread nicer by `increment` (Linux: each thread has its own nice value),
    so the scheduler runs the verdict path's threads first when the CPUs are busy."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except (AttributeError, OSError):  # not Linux: the thread keeps the process's priority
        pass


def _failure_reason(error: BaseException) -> str:
    """A short, stable label for a failed write (a metrics label): the journal's, or SQLite's."""
    if isinstance(error, _RowRefused):
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


class Archive:
    """The archive sink: `record(verdict)` on the output thread, the database, pictures and
    upkeep on its own thread.

    `clock.time()` stamps rows (verdict_ts) and sets the age cutoff; `clock.monotonic()` paces
    checkpoints and retention. Tests pass a fake clock and call `enforce_retention()` themselves.
    """

    def __init__(self, config: ArchiveConfig, metrics: Metrics, log: Any = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.folder = Path(config.path)
        self.path = self.folder / DATABASE
        self._metrics = metrics
        self._log = log if log is not None else structlog.get_logger("linewatch.archive")
        self._clock = clock
        self.wal_limit_bytes = min(WAL_LIMIT_BYTES, config.max_bytes // 16)
        self.journal_limit_bytes = min(JOURNAL_LIMIT_BYTES, config.max_bytes // 8)
        self.journal_rotate_bytes = min(JOURNAL_ROTATE_BYTES, self.journal_limit_bytes // 4)
        self._images: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self._encoder = PictureEncoder()
        # record()'s lock: its os.write against the segment swap and stop(); guards the fields up to _counts
        self._journal_lock = threading.Lock()
        self._journal_fd: int | None = None  # the segment record() appends to (None: closed)
        self._writing: int | None = None  # that segment's number
        self._write_end = 0  # bytes in it
        self._journal_bytes = 0  # bytes in every segment on disk (the journal_limit_bytes check)
        self._counts = {"rows": 0, "rows_dropped": 0, "pictures": 0, "pictures_dropped": 0}
        # the tailer's position (the background thread's, under _maintenance_lock; changed under _idle too)
        self._segments: collections.deque[int] = collections.deque()  # on disk, oldest first
        self._read_offset = 0  # in the oldest: bytes that are in the database
        self._reader: int | None = None  # fd of the oldest, open for reading
        # the connection, one user at a time (the background thread; a test calling enforce_retention)
        self._maintenance_lock = threading.RLock()
        self._log_limiter = RateLimiter(LOG_INTERVAL_S)
        self._db: sqlite3.Connection | None = None
        self._folder_lock: int | None = None  # fd of the folder, flocked while open
        self._thread = threading.Thread(target=self._run, name="archive", daemon=True)
        self._abort = threading.Event()
        self._closed = False
        self._picture_bytes = 0  # sum of the files under images/ (scanned at start, then kept up to date)
        self._rows_since_checkpoint = 0
        self._pictures_pending = 0  # queued and not yet written (or dropped)
        self._day = (-1, "")  # the last UTC day a picture was queued: (days since 1970, "YYYY-MM-DD")
        self._idle = threading.Condition()  # notified when rows went in or a picture is done

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open (or create) the archive, replay the journal a killed daemon left, start the
        background thread. ArchiveError (a RuntimeError) naming the path and the reason when it cannot."""
        try:
            (self.folder / IMAGES).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArchiveError(f"runtime.archive.path: cannot create {self.folder}: {e.strerror or e}") from None
        try:
            self._lock_folder()
            self._db = self._connect()
            self._create_schema_if_new()
            read_schema_version(self._db, self.path)
            if self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise ArchiveError(f"runtime.archive: {self.path}: cannot switch to WAL mode (a network file system?)")
            self._db.execute(UNIQUE_ID_INDEX)
            rows = self._db.execute("SELECT count(*) FROM verdicts").fetchone()[0]
        except sqlite3.IntegrityError as e:
            self._release()
            raise ArchiveError(f"runtime.archive: {self.path}: two rows have the same verdict id ({e})") from None
        except sqlite3.Error as e:
            self._release()
            raise ArchiveError(f"runtime.archive: cannot open {self.path}: {e}") from None
        except ArchiveError:
            self._release()
            raise
        self._picture_bytes = _tree_bytes(self.folder / IMAGES)
        try:
            replayed = self._replay_journal()
            self._start_segment((self._segments[-1] if self._segments else 0) + 1)
        except OSError as e:
            self._release()
            raise ArchiveError(f"runtime.archive: cannot write the journal in {self.folder}: "
                               f"{e.strerror or e}") from None
        self._thread.start()
        self._log.info("archive_opened", path=str(self.path), rows=rows + replayed, replayed=replayed,
                       bytes=self.size_on_disk())

    def _lock_folder(self) -> None:
        """One daemon per archive folder: an flock on the folder, released by the kernel when the
        process ends however it ends."""
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ArchiveError(f"runtime.archive.path: {self.folder} is in use by another linewatch "
                                   "(one daemon per archive folder)") from None
            raise ArchiveError(f"runtime.archive.path: cannot lock {self.folder}: {e.strerror or e}") from None
        self._folder_lock = fd

    def _connect(self) -> sqlite3.Connection:
        """The connection, in autocommit mode (BEGIN / COMMIT where a transaction spans statements)."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute("PRAGMA schema_version").fetchone()  # reads the header: "not a database" shows here
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: commits reach the page cache, checkpoints fsync
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints happen on the background thread's schedule
            conn.execute(f"PRAGMA journal_size_limit = {self.wal_limit_bytes}")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _create_schema_if_new(self) -> None:
        conn = self._db
        assert conn is not None
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0 \
                and conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            # auto_vacuum only takes before the first table: it lets retention give pages back to the disk
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Write the pictures still queued (up to `timeout_s`), insert the journal's last lines and
        delete it, checkpoint, close. Idempotent."""
        if self._closed:
            return
        with self._journal_lock:
            self._closed = True  # record() writes no more rows and queues no more pictures
            fd, self._journal_fd, self._writing = self._journal_fd, None, None
        if fd is not None:
            os.close(fd)
        if self._thread.ident is not None:
            try:
                self._images.put(_STOP, timeout=timeout_s)
            except queue.Full:
                self._abort.set()
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self._abort.set()
                self._thread.join(1.0)
            left = sum(1 for item in list(self._images.queue) if item is not _STOP)
            if left:
                self._log.error("archive_pictures_not_written", count=left)
                self._metrics.sink_dropped.labels(sink="archive_image", reason="shutdown").inc(left)
        if self._thread.is_alive():  # stuck in a write: it keeps the connection; the journal is replayed next start
            self._log.error("archive_thread_stuck_at_stop", journal_bytes=self._journal_bytes)
            return
        self._encoder.close()
        self._release()

    def _release(self) -> None:
        """Close the connection and the journal reader, and let go of the folder."""
        self._close_reader()
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        if self._folder_lock is not None:
            os.close(self._folder_lock)  # (the flock goes with it)
            self._folder_lock = None

    def dead_threads(self) -> list[str]:
        """The background thread, if it died while the archive is open."""
        if self._thread.ident is None or self._closed:
            return []
        return [] if self._thread.is_alive() else [self._thread.name]

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every verdict recorded so far is in the database and every picture queued
        so far is written (or dropped); False on timeout."""
        with self._journal_lock:
            segment, end = self._writing, self._write_end

        def done() -> bool:
            if self._pictures_pending:
                return False
            if segment is None or not self._segments or self._segments[0] > segment:
                return True
            return self._segments[0] == segment and self._read_offset >= end

        with self._idle:
            return self._idle.wait_for(done, timeout_s)

    def stats(self) -> dict[str, int]:
        """Rows journaled and dropped, pictures written and dropped, pictures queued, the
        journal's bytes (this process)."""
        return {**self._counts, "pictures_queued": self._images.qsize(), "journal_bytes": self._journal_bytes}

    # ------------------------------------------------------------------ the verdict path

    def record(self, verdict: Verdict) -> None:
        """Append one verdict to the journal (in the kernel's page cache when this returns), then
        queue its pictures. Never raises: a row that cannot be written is counted in
        sink_dropped{sink="archive_row"}."""
        now = self._clock.time()
        stem = self._pictures_stem(verdict, now)
        try:
            self._append(journal_line(verdict, now, stem))
        except Exception as e:  # noqa: BLE001 - a failed row costs the archive its copy, never the verdict
            self._drop_row(_failure_reason(e), e, camera=verdict.camera, frame_id=verdict.frame_id)
            return
        if stem is not None:
            # after the row: a failed row queues no pictures. The image itself goes on the
            # queue, since the daemon drops verdict.image once record() returns.
            with self._idle:
                try:
                    self._images.put_nowait((stem, verdict.image, verdict))
                    self._pictures_pending += 1
                except queue.Full:  # only when stop() raced us; the row's pictures never come
                    self._drop_picture("queue_full", verdict)

    def _append(self, line: bytes) -> None:
        """One os.write of a whole line to the current segment. OSError or _RowRefused when the
        line is not in the journal."""
        with self._journal_lock:
            fd = self._journal_fd
            if fd is None:
                raise _RowRefused("closed")
            if self._journal_bytes + len(line) > self.journal_limit_bytes:
                raise _RowRefused("journal_full")
            written = os.write(fd, line)
            if written < len(line):
                self._take_back(fd, written)
                raise OSError(errno.ENOSPC, "the journal took part of a line")
            self._journal_bytes += written
            self._write_end += written
            self._counts["rows"] += 1

    def _take_back(self, fd: int, written: int) -> None:
        """A short write (the disk filled up) left the start of a line: cut it off, so the next
        line starts a line of its own. If that fails too, the piece stays: the tailer counts it
        and the line written after it as one invalid line."""
        try:
            os.ftruncate(fd, os.fstat(fd).st_size - written)
        except OSError:
            self._journal_bytes += written
            self._write_end += written

    def _drop_row(self, reason: str, error: BaseException | None = None, **where: Any) -> None:
        with self._journal_lock:
            self._counts["rows_dropped"] += 1
        self._metrics.sink_dropped.labels(sink="archive_row", reason=reason).inc()
        held_back = self._log_limiter.allow(f"row:{reason}", self._clock.monotonic())
        if held_back is not None:
            self._log.error("archive_row_failed", reason=reason, error=repr(error) if error else None, **where,
                            not_logged_since_last=held_back)

    def _pictures_stem(self, verdict: Verdict, now: float) -> str | None:
        """Where this verdict's pictures go ("images/<UTC day>/<id>"): failed parts and a
        sample of passes that come with their image, when the queue has room (a full queue
        is a counted drop). None: no pictures."""
        if verdict.image is None or verdict.id is None or self._closed:
            return None
        if verdict.verdict != "fail" and not (verdict.verdict == "pass"
                                              and picture_sampled(verdict.id, self.config.pass_image_sample)):
            return None
        if self._images.full():  # only record() adds to the queue: room now is room after the row
            self._drop_picture("queue_full", verdict)
            return None
        day = int(now // 86400)  # the UTC day (POSIX time has 86400 s a day)
        if day != self._day[0]:  # (formatting a date on every failed part costs more than the rest of this)
            self._day = (day, dt.datetime.fromtimestamp(day * 86400, dt.timezone.utc).date().isoformat())
        return f"{IMAGES}/{self._day[1]}/{verdict.id}"

    def _drop_picture(self, reason: str, verdict: Verdict, error: Exception | None = None) -> None:
        self._counts["pictures_dropped"] += 1
        self._metrics.sink_dropped.labels(sink="archive_image", reason=reason).inc()
        held_back = self._log_limiter.allow(f"picture:{reason}", self._clock.monotonic())
        if held_back is not None:
            self._log.warning("archive_picture_dropped", reason=reason, camera=verdict.camera,
                              frame_id=verdict.frame_id, error=repr(error) if error else None,
                              not_logged_since_last=held_back)

    # ------------------------------------------------------------------ the journal (background thread)

    def _segment_path(self, number: int) -> Path:
        return self.folder / f"{JOURNAL_PREFIX}{number}{JOURNAL_SUFFIX}"

    def _replay_journal(self) -> int:
        """Put the segments a killed daemon left in the database (each line once: ids are unique)
        and delete them. Returns the rows that were not in it. An SQLite error leaves them for the
        background thread (logged)."""
        found = []
        for path in self.folder.glob(f"{JOURNAL_PREFIX}*{JOURNAL_SUFFIX}"):
            number = path.name[len(JOURNAL_PREFIX):-len(JOURNAL_SUFFIX)]
            if number.isdigit():
                found.append(int(number))
                self._journal_bytes += _file_bytes(path)
        self._segments.extend(sorted(found))
        if not found:
            return 0
        try:
            with self._maintenance_lock:
                return self._ingest_journal()
        except (sqlite3.Error, OSError) as e:
            self._log.error("archive_replay_failed", reason=_failure_reason(e), error=repr(e),
                            journal_bytes=self._journal_bytes)
            return 0

    def _start_segment(self, number: int) -> None:
        """Create segment `number` and make it the one record() appends to: the one before is finished."""
        fd = os.open(self._segment_path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
        with self._journal_lock:
            if self._closed:  # stop() came first: nothing more is written
                os.close(fd)
                self._segment_path(number).unlink(missing_ok=True)
                return
            old, self._journal_fd, self._writing, self._write_end = self._journal_fd, fd, number, 0
        self._segments.append(number)
        if old is not None:
            os.close(old)

    def _ingest_journal(self) -> int:
        """Insert the journal's complete lines that are not in the database yet; delete the
        segments done with; start a new segment when the current one is long enough. Caller
        holds _maintenance_lock. Returns the rows inserted. An SQLite error (raised) leaves the
        lines for the next call."""
        inserted = 0
        while self._segments:
            number = self._segments[0]
            with self._journal_lock:  # finished before reading: what the read sees is all it will ever hold
                finished = number != self._writing
            path = self._segment_path(number)
            data = self._read_new(path)
            complete = data.rfind(b"\n") + 1
            inserted += self._insert_lines(data[:complete])
            if not finished:
                if self._read_offset < self.journal_rotate_bytes:
                    break
                self._start_segment(number + 1)
                continue
            if complete < len(data):  # a kill in the middle of a write(): that verdict was never published
                self._drop_row("torn", segment=path.name, bytes=len(data) - complete)
            self._close_reader()
            path.unlink(missing_ok=True)
            with self._journal_lock:
                self._journal_bytes -= self._read_offset + len(data) - complete
            with self._idle:
                self._read_offset = 0
                self._segments.popleft()
        with self._idle:
            self._idle.notify_all()
        return inserted

    def _read_new(self, path: Path) -> bytes:
        """What the oldest segment holds past the read offset (b"" when it was removed by hand)."""
        if self._reader is None:
            try:
                self._reader = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return b""
        size = os.fstat(self._reader).st_size
        return os.pread(self._reader, size - self._read_offset, self._read_offset) if size > self._read_offset else b""

    def _close_reader(self) -> None:
        if self._reader is not None:
            os.close(self._reader)
            self._reader = None

    def _insert_lines(self, data: bytes) -> int:
        """Insert whole lines, JOURNAL_BATCH_LINES per transaction, moving the read offset past
        each batch committed. A line that is not a row (torn by a failed write, a row SQLite
        refuses) is skipped, counted `invalid`. Returns the rows inserted."""
        lines = data.split(b"\n")[:-1]
        inserted = 0
        for start in range(0, len(lines), JOURNAL_BATCH_LINES):
            batch = lines[start:start + JOURNAL_BATCH_LINES]
            added, invalid = self._insert_batch(batch)
            with self._idle:
                self._read_offset += sum(len(line) + 1 for line in batch)
            inserted += added
            self._rows_since_checkpoint += added
            for error in invalid:
                self._drop_row("invalid", error)
        return inserted

    def _insert_batch(self, lines: list[bytes]) -> tuple[int, list[Exception]]:
        """One transaction: (rows inserted, the errors of the lines that are not rows). The lines
        as one JSON array parsed by SQLite, or, if it does not take them all, one by one."""
        conn = self._db
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            try:
                document = (b"[" + b",".join(lines) + b"]").decode()
                if not conn.execute("SELECT json_valid(?)", (document,)).fetchone()[0]:
                    raise ValueError("not JSON for SQLite")
                inserted, invalid = conn.execute(INSERT_LINES, (document,)).rowcount, []
            except (ValueError, sqlite3.IntegrityError):  # (the statement did nothing)
                inserted, invalid = self._insert_one_by_one(lines)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return inserted, invalid

    def _insert_one_by_one(self, lines: list[bytes]) -> tuple[int, list[Exception]]:
        """Each line parsed in Python (it reads NaN) and inserted on its own; a line that is not a
        row, or that SQLite refuses (an empty NOT NULL column, an integer too large), is skipped:
        (rows inserted, their errors)."""
        assert self._db is not None
        inserted, invalid = 0, []
        for line in lines:
            try:
                inserted += self._db.execute(INSERT_ROW, _row_from_line(line)).rowcount
            except (ValueError, OverflowError, sqlite3.IntegrityError) as e:
                invalid.append(e)
        return inserted, invalid

    def _tail_journal(self) -> None:
        """_ingest_journal on the background thread: a database that cannot be written now (locked,
        full) keeps the lines in the journal until a later call (logged, at most once per interval)."""
        try:
            with self._maintenance_lock:
                self._ingest_journal()
        except (sqlite3.Error, OSError) as e:
            reason = _failure_reason(e)
            held_back = self._log_limiter.allow(f"journal:{reason}", self._clock.monotonic())
            if held_back is not None:
                self._log.error("archive_rows_held_back", reason=reason, error=repr(e),
                                journal_bytes=self._journal_bytes, journal_limit_bytes=self.journal_limit_bytes,
                                not_logged_since_last=held_back)

    # ------------------------------------------------------------------ the background thread

    def _run(self) -> None:
        """Put the journal's lines in the database every JOURNAL_INTERVAL_S and before each
        picture (its row goes in first: a failed picture clears the row's `pictures`); write
        queued pictures; checkpoint every CHECKPOINT_INTERVAL_S; retention every
        RETENTION_INTERVAL_S (and once at start: the archive may have been off for a while). At a
        lower CPU priority than the verdict path (BACKGROUND_NICE)."""
        lower_thread_priority()
        next_checkpoint = next_retention = self._clock.monotonic()
        while not self._abort.is_set():
            try:
                item = self._images.get(timeout=JOURNAL_INTERVAL_S)
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            self._tail_journal()
            try:
                if item is not None:
                    try:
                        self._write_pictures(*item)
                    finally:
                        with self._idle:
                            self._pictures_pending -= 1
                            self._idle.notify_all()
                now = self._clock.monotonic()
                if now >= next_retention:
                    next_retention = now + RETENTION_INTERVAL_S
                    self.enforce_retention()
                if now >= next_checkpoint and self._rows_since_checkpoint:
                    next_checkpoint = now + CHECKPOINT_INTERVAL_S
                    self.checkpoint()
            except Exception as e:  # noqa: BLE001 - a full disk now must not end the upkeep for good
                held_back = self._log_limiter.allow("maintenance", self._clock.monotonic())
                if held_back is not None:
                    self._log.error("archive_maintenance_failed", error=repr(e), not_logged_since_last=held_back)
        if self._abort.is_set():
            return  # stop() gave up waiting: the journal stays, for the next start
        self._tail_journal()  # stop() closed the last segment: every line goes in and the journal is deleted
        try:
            self.checkpoint()
        except sqlite3.Error as e:
            self._log.warning("archive_checkpoint_failed", error=repr(e))

    def _write_pictures(self, stem: str, image: np.ndarray, verdict: Verdict) -> None:
        """The frame (PNG), the heatmap (float16 .npz) and the overlay (JPEG), each written to a
        temporary name and renamed, so a kill leaves whole files or none. A failure costs this
        verdict's pictures only (counted); its row's `pictures` is cleared."""
        base = self.folder / stem
        with self._maintenance_lock:
            try:
                base.parent.mkdir(parents=True, exist_ok=True)
                frame_format = self.config.frame_format
                frame, npz, jpeg = self._encoder.encode(image, verdict, frame_format, PICTURE_TIMEOUT_S)
                self._write_file(base, FRAME_SUFFIXES[frame_format], frame)
                if npz is not None:
                    self._write_file(base, HEATMAP_SUFFIX, npz)
                self._write_file(base, OVERLAY_SUFFIX, jpeg)
                self._counts["pictures"] += 1
            except Exception as e:  # noqa: BLE001 - disk full, a bad image
                self._picture_bytes -= _remove_pictures(self.folder, stem)
                self._drop_picture("write_failed", verdict, e)
                # (its row went in before the picture: see _run)
                self._db.execute("UPDATE verdicts SET pictures = NULL WHERE id = ? AND pictures = ?",
                                 (verdict.id, stem))

    def _write_file(self, base: Path, suffix: str, data: bytes) -> None:
        final = base.with_name(base.name + suffix)
        tmp = final.with_name(final.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self._picture_bytes += len(data)

    # ------------------------------------------------------------------ upkeep

    def checkpoint(self) -> tuple[int, int, int]:
        """WAL -> database file (PASSIVE: never waits for readers or the writer); updates the
        archive_bytes gauge. Returns SQLite's (busy, WAL frames, frames checkpointed)."""
        assert self._db is not None
        with self._maintenance_lock:
            self._rows_since_checkpoint = 0
            result = tuple(self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
            self._metrics.archive_bytes.set(self.size_on_disk())
        return result  # type: ignore[return-value]

    def size_on_disk(self) -> int:
        """Bytes the archive takes now: database file, WAL, journal and pictures."""
        return (sum(_file_bytes(self.folder / name) for name in (DATABASE, DATABASE + "-wal"))
                + self._journal_bytes + self._picture_bytes)

    def retained_bytes(self) -> int:
        """What retention keeps below `max_bytes - wal_limit_bytes - journal_limit_bytes`: the
        database (its pages as the file will hold them after the next checkpoint) and the pictures.
        The WAL and the journal are left out: each checkpoint brings the WAL back to
        `wal_limit_bytes`, the journal never holds more than `journal_limit_bytes`, and deleting
        rows would shrink neither."""
        return self._page_bytes("page_count") + self._picture_bytes

    def _page_bytes(self, pragma: str) -> int:
        assert self._db is not None
        with self._maintenance_lock:
            pages = self._db.execute(f"PRAGMA {pragma}").fetchone()[0]
            return pages * self._db.execute("PRAGMA page_size").fetchone()[0]

    def enforce_retention(self) -> dict[str, int]:
        """Delete what is older than `max_age_days`; then, above the size limit, the oldest
        pictures, then the oldest rows. Small transactions (RETENTION_BATCH rows), with the
        journal's new lines put in between. Returns what was removed."""
        assert self._db is not None
        removed = {"rows_by_age": 0, "day_folders": 0, "pictures_by_size": 0, "rows_by_size": 0}
        with self._maintenance_lock:
            cutoff = self._clock.time() - self.config.max_age_days * 86400.0
            removed["rows_by_age"] = self._delete_oldest_rows(until_ts=cutoff)
            removed["day_folders"] = self._remove_day_folders_before(cutoff)
            budget = self.config.max_bytes - self.wal_limit_bytes - self.journal_limit_bytes
            removed["pictures_by_size"] = self._remove_oldest_pictures(budget)
            while (over := self.retained_bytes() - budget) > 0:
                rows = self._db.execute("SELECT count(*) FROM verdicts").fetchone()[0]
                if not rows:
                    break
                used = self._page_bytes("page_count") - self._page_bytes("freelist_count")
                deleted = self._delete_oldest_rows(count=max(1, math.ceil(over * rows / used)))
                removed["rows_by_size"] += deleted
                self._give_back_free_pages()
                if not deleted:
                    break
            if removed["rows_by_age"]:
                self._give_back_free_pages()
            self._metrics.archive_bytes.set(self.size_on_disk())
        if any(removed.values()):
            self._log.info("archive_retention", **removed, bytes=self.size_on_disk(), max_bytes=self.config.max_bytes,
                           max_age_days=self.config.max_age_days)
        return removed

    def _delete_oldest_rows(self, until_ts: float | None = None, count: int | None = None) -> int:
        """Delete the oldest rows (older than `until_ts`, or `count` of them) with their pictures,
        RETENTION_BATCH per transaction. Returns how many."""
        assert self._db is not None
        deleted = 0
        while count is None or deleted < count:
            limit = RETENTION_BATCH if count is None else min(RETENTION_BATCH, count - deleted)
            where, args = ("WHERE verdict_ts < ?", (until_ts,)) if until_ts is not None else ("", ())
            batch = self._db.execute(f"SELECT rowid, pictures FROM verdicts {where} ORDER BY verdict_ts LIMIT ?",
                                     (*args, limit)).fetchall()
            if not batch:
                break
            marks = ", ".join("?" * len(batch))
            self._db.execute(f"DELETE FROM verdicts WHERE rowid IN ({marks})", [r[0] for r in batch])
            for _, stem in batch:
                if stem:
                    self._picture_bytes -= _remove_pictures(self.folder, stem)
            deleted += len(batch)
            if self._between_batches():
                break
        return deleted

    def _remove_oldest_pictures(self, budget: int) -> int:
        """Remove the oldest pictures until the archive fits `budget` (or none are left); their
        rows stay, with `pictures` cleared."""
        assert self._db is not None
        removed = 0
        while self.retained_bytes() > budget:
            batch = self._db.execute(
                "SELECT rowid, pictures FROM verdicts WHERE pictures IS NOT NULL ORDER BY verdict_ts LIMIT ?",
                (RETENTION_BATCH,)).fetchall()
            if not batch:
                break
            done = []
            for rowid, stem in batch:
                self._picture_bytes -= _remove_pictures(self.folder, stem)
                done.append(rowid)
                if self.retained_bytes() <= budget:
                    break
            self._db.execute(f"UPDATE verdicts SET pictures = NULL WHERE rowid IN ({', '.join('?' * len(done))})",
                             done)
            removed += len(done)
        return removed

    def _remove_day_folders_before(self, cutoff: float) -> int:
        """Day folders wholly older than `cutoff`: pictures whose rows are gone (a kill between
        queueing and the row, a failed insert) are removed with them."""
        cutoff_day = dt.datetime.fromtimestamp(cutoff, dt.timezone.utc).date()
        removed = 0
        images = self.folder / IMAGES
        for folder in sorted(images.iterdir()) if images.is_dir() else ():
            try:
                day = dt.date.fromisoformat(folder.name)
            except ValueError:
                continue  # not ours
            if folder.is_dir() and day < cutoff_day:
                self._picture_bytes -= _tree_bytes(folder)
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed

    def _give_back_free_pages(self) -> None:
        """Return the pages deleted rows left free to the file system (auto_vacuum=INCREMENTAL;
        the file shrinks at the next checkpoint), a bounded number per transaction."""
        assert self._db is not None
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        while free:
            # (executescript steps it to the end; execute would free one page)
            self._db.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES});")
            before, free = free, self._db.execute("PRAGMA freelist_count").fetchone()[0]
            if free >= before or self._between_batches():  # (free >= before: auto_vacuum is off)
                break

    def _between_batches(self) -> bool:
        """Between two retention transactions: the journal's new lines go in (a long retention
        pass must not hold rows back until the journal is full). True: stop now."""
        self._tail_journal()
        return self._abort.is_set()


def encode_pictures(image: np.ndarray, verdict: Verdict, frame_format: str = "png") -> tuple[bytes, bytes | None, bytes]:
    """A verdict's picture files: the frame as PNG or BMP (`frame_format`; lossless, BGR as
    files are), the heatmap as float16 .npz (None without one) and the overlay as JPEG. Runs in
    the picture encoder process (see PictureEncoder)."""
    suffix = FRAME_SUFFIXES[frame_format]
    ok, frame = cv2.imencode(suffix, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), PNG_PARAMS if suffix == ".png" else [])
    if not ok:
        raise ValueError(f"could not encode the frame as {frame_format.upper()}")
    npz = None
    if verdict.heatmap is not None:
        heat = np.nan_to_num(np.asarray(verdict.heatmap, np.float32), posinf=65504, neginf=-65504)
        npz = _npz_bytes(np.clip(heat, -65504, 65504).astype(np.float16))
    return frame.tobytes(), npz, overlay_jpeg(image, verdict, quality=90)


def _picture_process_init(daemon_pid: int) -> None:
    """The encoder process: deaf to Ctrl-C (the daemon stops it), gone with the daemon, and at
    the lowest CPU priority: SCHED_IDLE on Linux (it runs only when no other thread wants the
    CPU, and gives way at once when one wakes up), else nice 19."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(daemon_pid,), name="exit-with-daemon", daemon=True).start()
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 19)
        except (AttributeError, OSError):
            pass


def _exit_with(daemon_pid: int) -> None:
    """(A thread of the encoder process.) Exit once the daemon is gone. Its task queue's pipe
    is open at both ends in this process too, so a daemon killed with kill -9 (or crashed)
    never closes it: without this the process would wait for tasks for ever, and with it
    multiprocessing's resource tracker, each crash of a daemon run outside systemd leaving
    two processes behind."""
    while os.getppid() == daemon_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


class PictureEncoder:
    """Encodes pictures in a child process, started at the first picture.

    Encoding a picture is milliseconds of CPU, much of it holding the GIL (PNG and JPEG
    encoding, the overlay's array work), and on the picture thread it delayed the verdict
    path's threads. In a process of its own it takes no GIL of the daemon's, and at SCHED_IDLE
    it gives way to them for the CPU. `python benchmarks/runtime_bench.py --only sinks
    --verdicts 600`, case (c') archive (loopback, 200 frames/s, 30 % fails, random-noise
    224x224 frames: the worst case for PNG), added capture->verdict p99 over all sinks off,
    median of 3 rounds, one run each on a shared 2-core VM: encoding on the picture thread
    6.2 ms, in this process at SCHED_IDLE 2.6 ms. A process that dies is replaced at the next
    picture (that picture is lost, counted as `write_failed`)."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def encode(self, image: np.ndarray, verdict: Verdict, frame_format: str,
               timeout_s: float) -> tuple[bytes, bytes | None, bytes]:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_picture_process_init,
                initargs=(os.getpid(),))
        try:
            # the verdict without its image (sent once, as `image`)
            return self._pool.submit(encode_pictures, image, dataclasses.replace(verdict, image=None),
                                     frame_format).result(timeout_s)
        except concurrent.futures.process.BrokenProcessPool:
            self.close()
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _npz_bytes(heat: np.ndarray) -> bytes:
    """An .npz (np.load reads it) holding `heatmap`, deflated at level 1 (np.savez_compressed's
    level 6 took several times longer for little smaller files)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z, z.open("heatmap.npy", "w") as f:
        np.lib.format.write_array(f, heat)
    return buf.getvalue()


def _remove_pictures(folder: Path, stem: str) -> int:
    """Delete one verdict's picture files (those that exist); returns the bytes freed."""
    freed = 0
    for suffix in PICTURE_SUFFIXES:
        path = folder / (stem + suffix)
        try:
            size = path.stat().st_size
            path.unlink()
            freed += size
        except FileNotFoundError:
            pass
    return freed


def _file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _tree_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            total += _file_bytes(Path(root) / name)
    return total
