"""The verdict archive (traceability): every verdict a row of an SQLite file, pictures beside it.

Layout of `runtime.archive.path`::

    journal-<n>.jsonl                       verdicts recorded: a JSON array of the COLUMNS a line
    verdicts.sqlite (+ -wal, -shm)          one row per verdict, schema version in PRAGMA user_version
    images/<YYYY-MM-DD>/<id>.png            the frame as judged, lossless (RGB, 8 bit; .bmp with frame_format bmp)
                        <id>.heatmap.npz    the anomaly map, float16: np.load(f)["heatmap"]
                        <id>.overlay.jpg    heatmap + object boxes + banner, for a person

`<id>` is the verdict id ("<run_id>-<seq>"), the day is the UTC day the verdict was archived,
and a row's `pictures` column holds "images/<day>/<id>" when its pictures were queued (NULL
otherwise; cleared again when writing them failed or retention removed them). A picture
write queued but not done at a kill -9 leaves the column set and no file: readers check.

The parts, each a module: rows.py (a verdict's row and its journal line), journal.py (the
segments record() appends to: why there is a journal, and the figures), store.py (the SQLite
file), encoder.py and pictures.py (the pictures' bytes, in a child process; their files),
retention.py (what is kept), lock.py (one daemon per folder), errors.py. `Archive` composes
them: record() on the output thread appends a journal line and queues the pictures; one
background thread puts the journal's lines in the store, writes the pictures, checkpoints and
runs retention, each under `_maintenance_lock` (the store's connection, the journal's read
position and the pictures' byte count have one user at a time).
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from linewatch.config import ArchiveConfig
from linewatch.runtime.sinks.archive.encoder import FRAME_SUFFIXES, PNG_PARAMS, PictureEncoder, encode_pictures
from linewatch.runtime.sinks.archive.errors import LOG_INTERVAL_S, ArchiveError, Losses, failure_reason
from linewatch.runtime.sinks.archive.journal import (
    JOURNAL_BATCH_LINES, JOURNAL_INTERVAL_S, JOURNAL_LIMIT_BYTES, JOURNAL_PREFIX, JOURNAL_ROTATE_BYTES, JOURNAL_SUFFIX,
    Journal,
)
from linewatch.runtime.sinks.archive.lock import FolderLock
from linewatch.runtime.sinks.archive.pictures import (
    HEATMAP_SUFFIX, IMAGES, OVERLAY_SUFFIX, PICTURE_SUFFIXES, PICTURE_TIMEOUT_S, PictureFiles, picture_sampled,
)
from linewatch.runtime.sinks.archive.retention import RETENTION_BATCH, Retention
from linewatch.runtime.sinks.archive.rows import COLUMNS, JSON_COLUMNS, journal_line
from linewatch.runtime.sinks.archive.store import (
    BUSY_TIMEOUT_MS, DATABASE, SCHEMA, SCHEMA_VERSION, UNIQUE_ID_INDEX, VACUUM_PAGES, WAL_LIMIT_BYTES, Store,
    open_read_only, read_schema_version,
)
from linewatch.runtime.pipeline.clock import SYSTEM_CLOCK, Clock
from linewatch.runtime.ops.metrics import Metrics
from linewatch.wire import Verdict

if TYPE_CHECKING:
    from linewatch.runtime.sinks.outcome import Outcome

# The names other modules and tests import from here (archive.py's, before it became this
# package). Setting one of them here (a test's monkeypatch) changes what the Archive reads:
# BUSY_TIMEOUT_MS and JOURNAL_INTERVAL_S, and the constants defined below; the others are read
# in their own module, to be set there.
__all__ = [
    "Archive", "ArchiveError", "BACKGROUND_NICE", "BUSY_TIMEOUT_MS", "CHECKPOINT_INTERVAL_S", "COLUMNS", "DATABASE",
    "FRAME_SUFFIXES", "HEATMAP_SUFFIX", "IMAGES", "JOURNAL_BATCH_LINES", "JOURNAL_INTERVAL_S", "JOURNAL_LIMIT_BYTES",
    "JOURNAL_PREFIX", "JOURNAL_ROTATE_BYTES", "JOURNAL_SUFFIX", "JSON_COLUMNS", "LOG_INTERVAL_S", "OVERLAY_SUFFIX",
    "PICTURE_SUFFIXES", "PICTURE_TIMEOUT_S", "PNG_PARAMS", "PictureEncoder", "RETENTION_BATCH",
    "RETENTION_INTERVAL_S", "SCHEMA", "SCHEMA_VERSION", "UNIQUE_ID_INDEX", "VACUUM_PAGES", "WAL_LIMIT_BYTES",
    "encode_pictures", "journal_line", "lower_thread_priority", "open_read_only", "picture_sampled",
    "read_schema_version",
]

CHECKPOINT_INTERVAL_S = 1.0  # WAL -> database file (and its fsync), on the background thread
RETENTION_INTERVAL_S = 60.0
# The background thread's CPU priority, below the verdict path's threads: retention and pictures
# run in C with the GIL released, a whole core's worth, and on a loaded machine they took CPU
# time from the output thread (the case retention of `benchmarks/archive_bench.py` alone, 4 runs
# each, alternating, on a shared 2-core VM: p99 of record() 0.10-1.3 ms with retention at the
# same priority, 0.03-0.08 ms with it niced by 10).
BACKGROUND_NICE = 10
_STOP = object()


def lower_thread_priority(increment: int = BACKGROUND_NICE) -> None:
    """Make the calling thread nicer by `increment` (Linux: each thread has its own nice value),
    so the scheduler runs the verdict path's threads first when the CPUs are busy."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except (AttributeError, OSError):  # not Linux: the thread keeps the process's priority
        pass


def _delegate(part: str, name: str, doc: str) -> property:
    """An attribute of the Archive that is one of a part's (read and set there)."""
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value), doc=doc)


class Archive:
    """The archive sink: `record(verdict)` on the output thread, the database, pictures and
    upkeep on its own thread.

    `clock.time()` stamps rows (verdict_ts) and sets the age cutoff; `clock.monotonic()` paces
    checkpoints and retention. Tests pass a fake clock and call `enforce_retention()` themselves.
    """

    journal_limit_bytes = _delegate("_journal", "limit_bytes", "the journal's size limit: rows beyond are dropped")
    journal_rotate_bytes = _delegate("_journal", "rotate_bytes", "a new segment once this much is in the database")
    _journal_fd = _delegate("_journal", "fd", "the segment record() appends to (None: closed)")

    def __init__(self, config: ArchiveConfig, metrics: Metrics, log: Any = None, clock: Clock = SYSTEM_CLOCK,
                 encoder: PictureEncoder | None = None) -> None:
        self.config = config
        self.folder = Path(config.path)
        self.path = self.folder / DATABASE
        self._metrics = metrics
        self._log = log if log is not None else structlog.get_logger("linewatch.archive")
        self._clock = clock
        self.wal_limit_bytes = min(WAL_LIMIT_BYTES, config.max_bytes // 16)
        journal_limit = min(JOURNAL_LIMIT_BYTES, config.max_bytes // 8)
        self._idle = threading.Condition()  # notified when rows went in or a picture is done
        self._journal = Journal(self.folder, journal_limit, min(JOURNAL_ROTATE_BYTES, journal_limit // 4), self._idle)
        self._store = Store(self.path, self.wal_limit_bytes, BUSY_TIMEOUT_MS)
        self._pictures = PictureFiles(self.folder, config.frame_format, config.pass_image_sample, encoder)
        self._retention = Retention(self._store, self._pictures, self._between_batches)
        self._folder_lock = FolderLock(self.folder)
        # the store, the journal's read position, the pictures: one user at a time (the
        # background thread; a test calling enforce_retention)
        self._maintenance_lock = threading.RLock()
        self._images: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self._pictures_pending = 0  # queued and not yet written (or dropped), under _idle
        self._losses = Losses(metrics, self._log, clock)
        self._thread = threading.Thread(target=self._run, name="archive", daemon=True)
        self._abort = threading.Event()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open (or create) the archive, replay the journal a killed daemon left, start the
        background thread. ArchiveError (a RuntimeError) naming the path and the reason when it cannot."""
        try:
            (self.folder / IMAGES).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArchiveError(f"runtime.archive.path: cannot create {self.folder}: {e.strerror or e}") from None
        try:
            self._folder_lock.acquire()  # (two daemons would each consume and delete the other's segments)
            rows = self._store.open()
        except ArchiveError:
            self._release()
            raise
        self._pictures.scan()
        try:
            replayed = self._replay_journal()
            self._journal.begin()
        except OSError as e:
            self._release()
            raise ArchiveError(f"runtime.archive: cannot write the journal in {self.folder}: "
                               f"{e.strerror or e}") from None
        self._thread.start()
        self._log.info("archive_opened", path=str(self.path), rows=rows + replayed, replayed=replayed,
                       bytes=self.size_on_disk())

    def _replay_journal(self) -> int:
        """Put the segments a killed daemon left in the database (each line once: ids are unique)
        and delete them. Returns the rows that were not in it. An SQLite error leaves them for the
        background thread (logged)."""
        if not self._journal.find_segments():
            return 0
        try:
            with self._maintenance_lock:
                return self._journal.consume(self._insert, self._torn)
        except (sqlite3.Error, OSError) as e:
            self._log.error("archive_replay_failed", reason=failure_reason(e), error=repr(e),
                            journal_bytes=self._journal.bytes)
            return 0

    def stop(self, timeout_s: float = 5.0) -> None:
        """Write the pictures still queued (up to `timeout_s`), insert the journal's last lines and
        delete it, checkpoint, close. Idempotent."""
        if self._closed:
            return
        self._closed = True  # record() queues no more pictures
        self._journal.close_writer()  # and writes no more rows
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
            self._log.error("archive_thread_stuck_at_stop", journal_bytes=self._journal.bytes)
            return
        self._pictures.close()
        self._release()

    def _release(self) -> None:
        """Close the connection and the journal reader, and let go of the folder."""
        self._journal.close_reader()
        self._store.close()
        self._folder_lock.release()

    def dead_threads(self) -> list[str]:
        """The background thread, if it died while the archive is open."""
        if self._thread.ident is None or self._closed:
            return []
        return [] if self._thread.is_alive() else [self._thread.name]

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every verdict recorded so far is in the database and every picture queued
        so far is written (or dropped); False on timeout."""
        mark = self._journal.mark()
        with self._idle:
            return self._idle.wait_for(lambda: not self._pictures_pending and self._journal.reached(mark), timeout_s)

    def stats(self) -> dict[str, int]:
        """Rows journaled and dropped, pictures written and dropped, pictures queued, the
        journal's bytes (this process)."""
        return {"rows": self._journal.lines, "rows_dropped": self._losses.rows, "pictures": self._pictures.written,
                "pictures_dropped": self._losses.pictures, "pictures_queued": self._images.qsize(),
                "journal_bytes": self._journal.bytes}

    # ------------------------------------------------------------------ the verdict path

    def record(self, verdict: Verdict, outcome: Outcome | None = None) -> None:
        """Append one verdict to the journal (in the kernel's page cache when this returns: see
        journal.py for why not SQLite), then queue its pictures. Never raises: a row that cannot
        be written is counted in sink_dropped{sink="archive_row"}. `outcome`: the verdict's as
        the sinks share it (its overlay is rendered once for all: PictureFiles.encode)."""
        now = self._clock.time()
        stem = self._pictures_stem(verdict, now)
        try:
            self._journal.append(journal_line(verdict, now, stem))
        except Exception as e:  # noqa: BLE001 - a failed row costs the archive its copy, never the verdict
            self._losses.row(failure_reason(e), e, camera=verdict.camera, frame_id=verdict.frame_id)
            return
        if stem is not None:
            # after the row: a failed row queues no pictures. The verdict is the archive
            # sink's own copy (runtime/sinks/archive/sink.py), so its image stays with it.
            with self._idle:
                try:
                    self._images.put_nowait((stem, verdict.image, verdict, outcome))
                    self._pictures_pending += 1
                except queue.Full:  # only when stop() raced us; the row's pictures never come
                    self._losses.picture("queue_full", verdict)

    def _pictures_stem(self, verdict: Verdict, now: float) -> str | None:
        """Where this verdict's pictures go, when it keeps them (PictureFiles.wanted) and the
        queue has room (a full queue is a counted drop). None: no pictures."""
        if self._closed or not self._pictures.wanted(verdict):
            return None
        if self._images.full():  # only record() adds to the queue: room now is room after the row
            self._losses.picture("queue_full", verdict)
            return None
        return self._pictures.stem(verdict.id, now)  # type: ignore[arg-type]

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
                if now >= next_checkpoint and self._store.rows_since_checkpoint:
                    next_checkpoint = now + CHECKPOINT_INTERVAL_S
                    self.checkpoint()
            except Exception as e:  # noqa: BLE001 - a full disk now must not end the upkeep for good
                self._losses.log("maintenance", "error", "archive_maintenance_failed", error=repr(e))
        if self._abort.is_set():
            return  # stop() gave up waiting: the journal stays, for the next start
        self._tail_journal()  # stop() closed the last segment: every line goes in and the journal is deleted
        try:
            self.checkpoint()
        except sqlite3.Error as e:
            self._log.warning("archive_checkpoint_failed", error=repr(e))

    def _tail_journal(self) -> None:
        """The journal's new lines into the database: one that cannot be written now (locked,
        full) keeps them in the journal until a later call (logged, at most once per interval)."""
        try:
            with self._maintenance_lock:
                self._journal.consume(self._insert, self._torn)
        except (sqlite3.Error, OSError) as e:
            reason = failure_reason(e)
            self._losses.log(f"journal:{reason}", "error", "archive_rows_held_back", reason=reason, error=repr(e),
                             journal_bytes=self._journal.bytes, journal_limit_bytes=self.journal_limit_bytes)

    def _insert(self, lines: list[bytes]) -> int:
        """One batch of journal lines into the store; lines that are not rows are counted `invalid`."""
        inserted, invalid = self._store.insert_lines(lines)
        for error in invalid:
            self._losses.row("invalid", error)
        return inserted

    def _torn(self, segment: str, nbytes: int) -> None:
        self._losses.row("torn", segment=segment, bytes=nbytes)

    def _write_pictures(self, stem: str, image: np.ndarray, verdict: Verdict, outcome: Outcome | None) -> None:
        """A failure costs this verdict's pictures only (counted); its row's `pictures` is cleared."""
        with self._maintenance_lock:
            try:
                self._pictures.write(stem, image, verdict, outcome)
            except Exception as e:  # noqa: BLE001 - disk full, a bad image
                self._losses.picture("write_failed", verdict, e)
                self._store.clear_picture(verdict.id, stem)  # (its row went in before the picture: see _run)

    def _between_batches(self) -> bool:
        """Between two retention transactions: the journal's new lines go in (a long retention
        pass must not hold rows back until the journal is full). True: stop now."""
        self._tail_journal()
        return self._abort.is_set()

    # ------------------------------------------------------------------ upkeep

    def checkpoint(self) -> tuple[int, int, int]:
        """WAL -> database file (PASSIVE: never waits for readers or the writer); updates the
        archive_bytes gauge. Returns SQLite's (busy, WAL frames, frames checkpointed)."""
        with self._maintenance_lock:
            result = self._store.checkpoint()
            self._metrics.archive_bytes.set(self.size_on_disk())
        return result

    def size_on_disk(self) -> int:
        """Bytes the archive takes now: database file, WAL, journal and pictures."""
        return self._store.file_bytes() + self._journal.bytes + self._pictures.bytes

    def retained_bytes(self) -> int:
        """What retention keeps below `max_bytes - wal_limit_bytes - journal_limit_bytes`: the
        database (its pages as the file will hold them after the next checkpoint) and the pictures.
        The WAL and the journal are left out: each checkpoint brings the WAL back to
        `wal_limit_bytes`, the journal never holds more than `journal_limit_bytes`, and deleting
        rows would shrink neither."""
        with self._maintenance_lock:
            return self._retention.retained_bytes()

    def enforce_retention(self) -> dict[str, int]:
        """Delete what is older than `max_age_days`; then, above the size limit, the oldest
        pictures, then the oldest rows (retention.py). Returns what was removed."""
        with self._maintenance_lock:
            removed = self._retention.enforce(
                cutoff=self._clock.time() - self.config.max_age_days * 86400.0,
                budget=self.config.max_bytes - self.wal_limit_bytes - self.journal_limit_bytes)
            self._metrics.archive_bytes.set(self.size_on_disk())
        if any(removed.values()):
            self._log.info("archive_retention", **removed, bytes=self.size_on_disk(), max_bytes=self.config.max_bytes,
                           max_age_days=self.config.max_age_days)
        return removed
