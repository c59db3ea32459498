"""The verdict archive (traceability): every verdict a row of an SQLite file, pictures beside it.

Layout of `runtime.archive.path`::

    verdicts.sqlite (+ -wal, -shm)          one row per verdict, schema version in PRAGMA user_version
    images/<YYYY-MM-DD>/<id>.png            the frame as judged, lossless (RGB, 8 bit)
                        <id>.heatmap.npz    the anomaly map, float16: np.load(f)["heatmap"]
                        <id>.overlay.jpg    heatmap + object boxes + banner, for a person

`<id>` is the verdict id ("<run_id>-<seq>"), the day is the UTC day the verdict was archived,
and a row's `pictures` column holds "images/<day>/<id>" when its pictures were queued (NULL
otherwise; cleared again when writing them failed or retention removed them). A picture
write queued but not done at a kill -9 leaves the column set and no file: readers check.

Durability. `record()` runs on the pipeline's output thread BEFORE the verdict goes to the
ZeroMQ publisher, and commits its row at once (WAL, synchronous=NORMAL): a committed WAL
write is in the kernel's page cache, so every verdict a subscriber has received is in the
archive after the daemon is killed (kill -9, OOM killer, crash). A power loss or kernel
crash can lose the commits since the last checkpoint's fsync (checkpoints run every
CHECKPOINT_INTERVAL_S). Pictures are written later, on this module's own thread.

SQLite and threads. Two connections: `_rows` only INSERTs (on whichever thread calls
record(), the output thread), `_maint` belongs to the background thread (checkpoints,
retention, clearing `pictures`). Writes on both are serialized by `_write_lock`, held for one
short statement: SQLite allows one writer at a time anyway, and a Python lock makes the
output thread wait exactly as long as the statement in progress (a retention batch of
RETENTION_BATCH rows), where SQLite's busy handler would sleep 1, 2, 5, 10 ms... between
retries. Checkpoints take no lock: a PASSIVE checkpoint runs beside a writer. Auto-checkpoint
is off on both connections, so a commit never does a checkpoint's I/O on the output thread.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import os
import queue
import shutil
import sqlite3
import threading
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
    pictures TEXT               -- "images/<day>/<id>" (+ .png, .heatmap.npz, .overlay.jpg) or NULL
);
CREATE INDEX verdicts_time ON verdicts (verdict_ts);
CREATE INDEX verdicts_camera_time ON verdicts (camera, verdict_ts);
CREATE INDEX verdicts_pictures_time ON verdicts (verdict_ts) WHERE pictures IS NOT NULL;
"""
INSERT = f"INSERT INTO verdicts ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
# the files of one verdict's pictures: the `pictures` stem + these
FRAME_SUFFIX, HEATMAP_SUFFIX, OVERLAY_SUFFIX = ".png", ".heatmap.npz", ".overlay.jpg"
PICTURE_SUFFIXES = (FRAME_SUFFIX, HEATMAP_SUFFIX, OVERLAY_SUFFIX)

CHECKPOINT_INTERVAL_S = 1.0  # WAL -> database file (and its fsync), on the background thread
RETENTION_INTERVAL_S = 60.0
RETENTION_BATCH = 100  # rows per delete statement (~0.4 ms): the longest the output thread may wait on the lock
VACUUM_PAGES = 64  # pages given back to the file system per transaction (~0.2 ms)
# between two of those transactions: the output thread gets the GIL and the write lock without a fight
# (`PYTHONPATH=. python benchmarks/archive_bench.py`, case "retention", on a shared 2-core VM: p99 of
# record() 0.65-2.4 ms over 3 runs without the pause, 0.72-0.85 ms over 5 runs with it)
RETENTION_PAUSE_S = 0.001
WAL_LIMIT_BYTES = 4 * 1024 * 1024  # the WAL file goes back to this size after a checkpoint (or max_bytes / 16)
ROW_BUSY_TIMEOUT_MS = 250  # another process holding the write lock: the output thread waits this long, then drops
MAINT_BUSY_TIMEOUT_MS = 5000
LOG_INTERVAL_S = 10.0  # at most one log line per failure reason per interval
_STOP = object()


class ArchiveError(RuntimeError):
    """The archive cannot be opened, or its folder holds something that is not one (names the path and why)."""


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
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=MAINT_BUSY_TIMEOUT_MS / 1000)
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


def _failure_reason(error: Exception) -> str:
    """A short, stable label for a failed SQLite write (a metrics label)."""
    if isinstance(error, sqlite3.ProgrammingError):
        return "closed"
    code = getattr(error, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    return {sqlite3.SQLITE_FULL: "disk_full", sqlite3.SQLITE_BUSY: "locked", sqlite3.SQLITE_LOCKED: "locked",
            sqlite3.SQLITE_IOERR: "io_error", sqlite3.SQLITE_READONLY: "read_only",
            sqlite3.SQLITE_CORRUPT: "corrupt"}.get(primary, "error")


class Archive:
    """The archive sink: `record(verdict)` on the output thread, pictures and upkeep on its own thread.

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
        self._images: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self._write_lock = threading.Lock()  # one writing statement at a time (see the module docstring)
        # the maintenance connection, one user at a time (the background thread; a test calling enforce_retention)
        self._maintenance_lock = threading.RLock()
        self._log_limiter = RateLimiter(LOG_INTERVAL_S)
        self._rows: sqlite3.Connection | None = None
        self._maint: sqlite3.Connection | None = None
        self._thread = threading.Thread(target=self._run, name="archive", daemon=True)
        self._abort = threading.Event()
        self._closed = False
        self._picture_bytes = 0  # sum of the files under images/ (scanned at start, then kept up to date)
        self._counts = {"rows": 0, "rows_dropped": 0, "pictures": 0, "pictures_dropped": 0}
        self._rows_since_checkpoint = 0
        self._pictures_pending = 0  # queued and not yet written (or dropped)
        self._idle = threading.Condition()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open (or create) the archive and start the picture thread. ArchiveError (a
        RuntimeError) naming the path and the reason when it cannot."""
        try:
            (self.folder / IMAGES).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArchiveError(f"runtime.archive.path: cannot create {self.folder}: {e.strerror or e}") from None
        try:
            self._maint = self._connect(MAINT_BUSY_TIMEOUT_MS)
            self._create_schema_if_new()
            read_schema_version(self._maint, self.path)
            if self._maint.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise ArchiveError(f"runtime.archive: {self.path}: cannot switch to WAL mode (a network file system?)")
            self._rows = self._connect(ROW_BUSY_TIMEOUT_MS)
            rows = self._maint.execute("SELECT count(*) FROM verdicts").fetchone()[0]
        except sqlite3.Error as e:
            self._close_connections()
            raise ArchiveError(f"runtime.archive: cannot open {self.path}: {e}") from None
        except ArchiveError:
            self._close_connections()
            raise
        self._picture_bytes = _tree_bytes(self.folder / IMAGES)
        self._thread.start()
        self._log.info("archive_opened", path=str(self.path), rows=rows, bytes=self.size_on_disk())

    def _connect(self, busy_timeout_ms: int) -> sqlite3.Connection:
        """A connection in autocommit mode (each statement its own transaction, committed when it
        returns), used by one thread at a time (see the module docstring)."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=busy_timeout_ms / 1000)
        try:
            conn.execute("PRAGMA schema_version").fetchone()  # reads the header: "not a database" shows here
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: commits reach the page cache, checkpoints fsync
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints happen on the background thread only
            conn.execute(f"PRAGMA journal_size_limit = {self.wal_limit_bytes}")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _create_schema_if_new(self) -> None:
        conn = self._maint
        assert conn is not None
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0 \
                and conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            # auto_vacuum only takes before the first table: it lets retention give pages back to the disk
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Write the pictures still queued (up to `timeout_s`), checkpoint, close. Idempotent."""
        if self._closed:
            return
        self._closed = True  # record() queues no more pictures
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
        with self._write_lock:
            self._close_connections()

    def _close_connections(self) -> None:
        for conn in (self._rows, self._maint):
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass

    def dead_threads(self) -> list[str]:
        """The picture thread, if it died while the archive is open."""
        if self._thread.ident is None or self._closed:
            return []
        return [] if self._thread.is_alive() else [self._thread.name]

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every picture queued so far is written (or dropped); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pictures_pending == 0, timeout_s)

    def stats(self) -> dict[str, int]:
        """Rows written and dropped, pictures written and dropped, pictures queued (this process)."""
        return {**self._counts, "pictures_queued": self._images.qsize()}

    # ------------------------------------------------------------------ the verdict path

    def record(self, verdict: Verdict) -> None:
        """Append one verdict (committed when this returns), then queue its pictures. Never
        raises: a row that cannot be written is counted in sink_dropped{sink="archive_row"}."""
        now = self._clock.time()
        stem = self._pictures_stem(verdict, now)
        try:
            row = (verdict.id, verdict.run_id, verdict.seq, verdict.camera, verdict.frame_id, verdict.part_id,
                   verdict.capture_ts, now, verdict.verdict, verdict.reason, verdict.score, verdict.threshold,
                   verdict.bank_id, verdict.backend, verdict.latency_s,
                   json.dumps(verdict.objects, default=_json_default),
                   json.dumps(verdict.branch_scores or {}, default=_json_default), stem)
            with self._write_lock:
                if self._rows is None:
                    raise sqlite3.ProgrammingError("the archive is not open")
                self._rows.execute(INSERT, row)
        except Exception as e:  # noqa: BLE001 - a failed row costs the archive its copy, never the verdict
            reason = _failure_reason(e)
            self._counts["rows_dropped"] += 1
            self._metrics.sink_dropped.labels(sink="archive_row", reason=reason).inc()
            held_back = self._log_limiter.allow(f"row:{reason}", self._clock.monotonic())
            if held_back is not None:
                self._log.error("archive_row_failed", reason=reason, error=repr(e), camera=verdict.camera,
                                frame_id=verdict.frame_id, not_logged_since_last=held_back)
            return
        self._counts["rows"] += 1
        self._rows_since_checkpoint += 1
        if stem is not None:
            # after the commit: the picture thread wakes once the row is written. The image itself
            # goes on the queue, since the daemon drops verdict.image once record() returns.
            with self._idle:
                try:
                    self._images.put_nowait((stem, verdict.image, verdict, now))
                    self._pictures_pending += 1
                except queue.Full:  # only when stop() raced us; the row's pictures never come
                    self._drop_picture("queue_full", verdict)

    def _pictures_stem(self, verdict: Verdict, now: float) -> str | None:
        """Where this verdict's pictures go ("images/<UTC day>/<id>"): failed parts and a
        sample of passes that come with their image, when the queue has room (a full queue
        is a counted drop). None: no pictures."""
        if verdict.image is None or verdict.id is None or self._closed:
            return None
        if verdict.verdict != "fail" and not (verdict.verdict == "pass"
                                              and picture_sampled(verdict.id, self.config.pass_image_sample)):
            return None
        if self._images.full():  # only record() adds to the queue: room now is room after the insert
            self._drop_picture("queue_full", verdict)
            return None
        return f"{IMAGES}/{dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime('%Y-%m-%d')}/{verdict.id}"

    def _drop_picture(self, reason: str, verdict: Verdict, error: Exception | None = None) -> None:
        self._counts["pictures_dropped"] += 1
        self._metrics.sink_dropped.labels(sink="archive_image", reason=reason).inc()
        held_back = self._log_limiter.allow(f"picture:{reason}", self._clock.monotonic())
        if held_back is not None:
            self._log.warning("archive_picture_dropped", reason=reason, camera=verdict.camera,
                              frame_id=verdict.frame_id, error=repr(error) if error else None,
                              not_logged_since_last=held_back)

    # ------------------------------------------------------------------ the background thread

    def _run(self) -> None:
        """Write queued pictures; checkpoint every CHECKPOINT_INTERVAL_S; retention every
        RETENTION_INTERVAL_S (and once at start: the archive may have been off for a while)."""
        next_checkpoint = next_retention = self._clock.monotonic()
        while not self._abort.is_set():
            try:
                item = self._images.get(timeout=CHECKPOINT_INTERVAL_S / 4)
            except queue.Empty:
                item = None
            if item is _STOP:
                break
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
        try:
            self.checkpoint()
        except sqlite3.Error as e:
            self._log.warning("archive_checkpoint_failed", error=repr(e))

    def _write_pictures(self, stem: str, image: np.ndarray, verdict: Verdict, verdict_ts: float) -> None:
        """The frame (PNG), the heatmap (float16 .npz) and the overlay (JPEG), each written to a
        temporary name and renamed, so a kill leaves whole files or none. A failure costs this
        verdict's pictures only (counted); its row's `pictures` is cleared."""
        base = self.folder / stem
        with self._maintenance_lock:
            try:
                base.parent.mkdir(parents=True, exist_ok=True)
                ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_PNG_COMPRESSION, 1])
                if not ok:
                    raise ValueError("could not encode the frame as PNG")
                self._write_file(base, FRAME_SUFFIX, png.tobytes())
                if verdict.heatmap is not None:
                    heat = np.nan_to_num(np.asarray(verdict.heatmap, np.float32), posinf=65504, neginf=-65504)
                    self._write_file(base, HEATMAP_SUFFIX, _npz_bytes(np.clip(heat, -65504, 65504).astype(np.float16)))
                self._write_file(base, OVERLAY_SUFFIX, overlay_jpeg(image, verdict, quality=90))
                self._counts["pictures"] += 1
            except Exception as e:  # noqa: BLE001 - disk full, a bad image
                self._picture_bytes -= _remove_pictures(self.folder, stem)
                self._drop_picture("write_failed", verdict, e)
                with self._write_lock:  # (verdict_ts, pictures): the time index finds the row
                    self._maint.execute("UPDATE verdicts SET pictures = NULL WHERE verdict_ts = ? AND pictures = ?",
                                        (verdict_ts, stem))

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
        assert self._maint is not None
        with self._maintenance_lock:
            self._rows_since_checkpoint = 0
            result = tuple(self._maint.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
            self._metrics.archive_bytes.set(self.size_on_disk())
        return result  # type: ignore[return-value]

    def size_on_disk(self) -> int:
        """Bytes the archive takes now: database file, WAL and pictures."""
        return sum(_file_bytes(self.folder / name) for name in (DATABASE, DATABASE + "-wal")) + self._picture_bytes

    def retained_bytes(self) -> int:
        """What retention keeps below `max_bytes - wal_limit_bytes`: the database (its pages as
        the file will hold them after the next checkpoint) and the pictures. The WAL is left out:
        each checkpoint brings it back to `wal_limit_bytes`, and deleting rows would not shrink it."""
        return self._page_bytes("page_count") + self._picture_bytes

    def _page_bytes(self, pragma: str) -> int:
        assert self._maint is not None
        with self._maintenance_lock:
            pages = self._maint.execute(f"PRAGMA {pragma}").fetchone()[0]
            return pages * self._maint.execute("PRAGMA page_size").fetchone()[0]

    def enforce_retention(self) -> dict[str, int]:
        """Delete what is older than `max_age_days`; then, above the size limit, the oldest
        pictures, then the oldest rows. Small transactions (RETENTION_BATCH rows), so the
        output thread never waits long. Returns what was removed."""
        assert self._maint is not None
        removed = {"rows_by_age": 0, "day_folders": 0, "pictures_by_size": 0, "rows_by_size": 0}
        with self._maintenance_lock:
            cutoff = self._clock.time() - self.config.max_age_days * 86400.0
            removed["rows_by_age"] = self._delete_oldest_rows(until_ts=cutoff)
            removed["day_folders"] = self._remove_day_folders_before(cutoff)
            budget = self.config.max_bytes - self.wal_limit_bytes
            removed["pictures_by_size"] = self._remove_oldest_pictures(budget)
            while (over := self.retained_bytes() - budget) > 0:
                rows = self._maint.execute("SELECT count(*) FROM verdicts").fetchone()[0]
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
        assert self._maint is not None
        deleted = 0
        while count is None or deleted < count:
            limit = RETENTION_BATCH if count is None else min(RETENTION_BATCH, count - deleted)
            where, args = ("WHERE verdict_ts < ?", (until_ts,)) if until_ts is not None else ("", ())
            batch = self._maint.execute(f"SELECT rowid, pictures FROM verdicts {where} ORDER BY verdict_ts LIMIT ?",
                                        (*args, limit)).fetchall()
            if not batch:
                break
            marks = ", ".join("?" * len(batch))
            with self._write_lock:
                self._maint.execute(f"DELETE FROM verdicts WHERE rowid IN ({marks})", [r[0] for r in batch])
            for _, stem in batch:
                if stem:
                    self._picture_bytes -= _remove_pictures(self.folder, stem)
            deleted += len(batch)
            if self._abort.wait(RETENTION_PAUSE_S):
                break
        return deleted

    def _remove_oldest_pictures(self, budget: int) -> int:
        """Remove the oldest pictures until the archive fits `budget` (or none are left); their
        rows stay, with `pictures` cleared."""
        assert self._maint is not None
        removed = 0
        while self.retained_bytes() > budget:
            batch = self._maint.execute(
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
            with self._write_lock:
                self._maint.execute(f"UPDATE verdicts SET pictures = NULL WHERE rowid IN ({', '.join('?' * len(done))})",
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
        assert self._maint is not None
        free = self._maint.execute("PRAGMA freelist_count").fetchone()[0]
        while free:
            with self._write_lock:
                # (executescript steps it to the end; execute would free one page)
                self._maint.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES});")
            before, free = free, self._maint.execute("PRAGMA freelist_count").fetchone()[0]
            if free >= before or self._abort.wait(RETENTION_PAUSE_S):  # (free >= before: auto_vacuum is off)
                break


def _npz_bytes(heat: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, heatmap=heat)
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
