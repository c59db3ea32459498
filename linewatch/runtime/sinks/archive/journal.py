"""The journal: verdict rows appended as lines to segment files, consumed into the database.

Why a journal. `record()` runs on the pipeline's output thread BEFORE the verdict goes to
the ZeroMQ publisher, inside a budget of 0.2 ms per verdict, which an SQLite commit per verdict
did not keep (p99 0.27-0.34 ms at 500 verdicts/s, 1.0 ms during retention; the journal line:
0.16-0.17 ms, 0.04-0.07 ms: `benchmarks/archive_bench.py`, shared 2-core VM, two runs each).
So it does not touch SQLite: it encodes the row as one JSON line (rows.journal_line) and
appends it to the journal with one os.write() (Journal.append) on a file opened O_APPEND.
A complete write() to a regular file is in the kernel's page cache when it returns, so every
verdict a subscriber has received is in the journal when the daemon is killed (kill -9, OOM
killer, crash), as a WAL commit was. The background thread tails the journal (every
JOURNAL_INTERVAL_S, and before each picture it writes) and INSERTs the new lines in one
transaction: a row is queryable a fraction of a second after its verdict was published.
`start()` first replays what a killed daemon left in the journal; `stop()` inserts the rest.
Verdict ids are UNIQUE, so a line inserted again (a kill after its insert, before its
segment was deleted) stays one row. A power loss or kernel crash can lose what the kernel had
not written to the disk: the journal is never fsynced, the database at each checkpoint.

The journal's segments. append() writes to the newest segment. Once the consumer has put
`rotate_bytes` of it in the database, it creates the next segment and swaps append()'s file
descriptor under the journal's lock (the one lock append() takes, for its os.write), then
reads what was appended to the old segment before the swap, inserts it and deletes the file.
Nothing is written to a segment after the swap, so no line can be lost between the last read
and the delete, and append() never waits for a truncate. The bytes of the journal are bounded
(`limit_bytes`): a database that cannot be written for long (locked by another process, disk
full) holds rows back until then; beyond, append() refuses them (RowRefused("journal_full")).

Threads. append() (the output thread) may run beside everything else; the consumer side
(find_segments(), begin(), consume(), close_reader()) is one caller at a time, which the Archive ensures with
its maintenance lock. The read position changes under `progress` (a Condition), which
consume() notifies when lines went in: reached() tells a waiter whether a mark() is consumed.
Lines are opaque bytes here: what they hold is rows.py's, what inserts them the caller's.
"""

from __future__ import annotations

import collections
import errno
import os
import threading
from pathlib import Path
from typing import Callable

from linewatch.runtime.sinks.archive.errors import RowRefused

JOURNAL_PREFIX, JOURNAL_SUFFIX = "journal-", ".jsonl"  # segments journal-<n>.jsonl, n counting up
JOURNAL_INTERVAL_S = 0.05  # how often the background thread looks for new lines: the lag before a row is queryable
JOURNAL_LIMIT_BYTES = 16 * 1024 * 1024  # the journal's size limit (or max_bytes / 8): lines of ~0.5 KB, ~1 min at 500/s
JOURNAL_ROTATE_BYTES = 1024 * 1024  # a new segment once this much of the current one is in the database
# Lines per INSERT statement and transaction (a backlog goes in as several): ~250 KB of JSON
# for SQLite to parse with the GIL released. Python work holds the GIL, and the output thread
# waits for it after its os.write(); a statement per row would also cost the background thread
# up to the switch interval (5 ms) per row to get the GIL back from a thread busy in Python.
JOURNAL_BATCH_LINES = 500


class Journal:
    """The segments journal-<n>.jsonl in `folder`: append() lines, consume() them in order.

    `insert(lines) -> rows inserted` (consume()'s argument) puts one batch of whole lines in the
    database; raising leaves the batch, and every line after it, in the journal for a later call.
    """

    def __init__(self, folder: Path, limit_bytes: int = JOURNAL_LIMIT_BYTES,
                 rotate_bytes: int = JOURNAL_ROTATE_BYTES, progress: threading.Condition | None = None) -> None:
        self.folder = folder
        self.limit_bytes = limit_bytes
        self.rotate_bytes = rotate_bytes
        self.progress = progress if progress is not None else threading.Condition()
        # append()'s lock: its os.write against the segment swap and close_writer(); guards the fields up to `lines`
        self._lock = threading.Lock()
        self.fd: int | None = None  # the segment append() writes to (None: closed)
        self._writing: int | None = None  # that segment's number
        self._write_end = 0  # bytes in it
        self.bytes = 0  # bytes in every segment on disk (the limit_bytes check)
        self.lines = 0  # lines appended by this process
        self._closed = False
        # the consumer's position (changed under `progress` where a waiter looks at it)
        self._segments: collections.deque[int] = collections.deque()  # on disk, oldest first
        self._read_offset = 0  # in the oldest: bytes that are in the database
        self._reader: int | None = None  # fd of the oldest, open for reading

    def segment_path(self, number: int) -> Path:
        return self.folder / f"{JOURNAL_PREFIX}{number}{JOURNAL_SUFFIX}"

    # ------------------------------------------------------------------ opening and closing

    def find_segments(self) -> int:
        """Take the segments a killed daemon left (oldest first) as the ones to consume; returns
        how many. OSError when the folder cannot be read."""
        found = []
        for path in self.folder.glob(f"{JOURNAL_PREFIX}*{JOURNAL_SUFFIX}"):
            number = path.name[len(JOURNAL_PREFIX):-len(JOURNAL_SUFFIX)]
            if number.isdigit():
                found.append(int(number))
                try:
                    self.bytes += path.stat().st_size
                except FileNotFoundError:
                    pass
        self._segments.extend(sorted(found))
        return len(found)

    def begin(self) -> None:
        """Start the segment append() writes to, after any found. OSError when it cannot be created."""
        self._start_segment((self._segments[-1] if self._segments else 0) + 1)

    def close_writer(self) -> None:
        """append() writes no more (it raises RowRefused("closed")); consume() then takes every
        line and deletes every segment."""
        with self._lock:
            self._closed = True
            fd, self.fd, self._writing = self.fd, None, None
        if fd is not None:
            os.close(fd)

    def close_reader(self) -> None:
        if self._reader is not None:
            os.close(self._reader)
            self._reader = None

    # ------------------------------------------------------------------ the writer (any thread)

    def append(self, line: bytes) -> None:
        """One os.write of a whole line to the current segment. OSError or RowRefused when the
        line is not in the journal."""
        with self._lock:
            fd = self.fd
            if fd is None:
                raise RowRefused("closed")
            if self.bytes + len(line) > self.limit_bytes:
                raise RowRefused("journal_full")
            written = os.write(fd, line)
            if written < len(line):
                self._take_back(fd, written)
                raise OSError(errno.ENOSPC, "the journal took part of a line")
            self.bytes += written
            self._write_end += written
            self.lines += 1

    def _take_back(self, fd: int, written: int) -> None:
        """A short write (the disk filled up) left the start of a line: cut it off, so the next
        line starts a line of its own. If that fails too, the piece stays: the consumer counts it
        and the line written after it as one invalid line."""
        try:
            os.ftruncate(fd, os.fstat(fd).st_size - written)
        except OSError:
            self.bytes += written
            self._write_end += written

    def mark(self) -> tuple[int | None, int]:
        """Where append() has written to now: reached(mark) once all of it is consumed."""
        with self._lock:
            return self._writing, self._write_end

    def reached(self, mark: tuple[int | None, int]) -> bool:
        """Whether every line up to `mark` is consumed (call holding `progress` to wait on it)."""
        segment, end = mark
        if segment is None or not self._segments or self._segments[0] > segment:
            return True
        return self._segments[0] == segment and self._read_offset >= end

    # ------------------------------------------------------------------ the consumer (one caller at a time)

    def _start_segment(self, number: int) -> None:
        """Create segment `number` and make it the one append() writes to: the one before is finished."""
        fd = os.open(self.segment_path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
        with self._lock:
            if self._closed:  # close_writer() came first: nothing more is written
                os.close(fd)
                self.segment_path(number).unlink(missing_ok=True)
                return
            old, self.fd, self._writing, self._write_end = self.fd, fd, number, 0
        self._segments.append(number)
        if old is not None:
            os.close(old)

    def consume(self, insert: Callable[[list[bytes]], int],
                on_torn: Callable[[str, int], None] = lambda segment, nbytes: None) -> int:
        """Insert the journal's complete lines not inserted yet (JOURNAL_BATCH_LINES per call of
        `insert`, the read position moving past each batch that went in); delete the segments
        done with; start a new segment when the current one is long enough. A finished segment
        ending in part of a line (a kill in the middle of a write()) calls `on_torn(segment
        name, bytes)`. Returns the rows inserted. An exception from `insert` or the file system
        (raised) leaves the lines for the next call."""
        inserted = 0
        while self._segments:
            number = self._segments[0]
            with self._lock:  # finished before reading: what the read sees is all it will ever hold
                finished = number != self._writing
            path = self.segment_path(number)
            data = self._read_new(path)
            complete = data.rfind(b"\n") + 1
            inserted += self._insert_lines(data[:complete], insert)
            if not finished:
                if self._read_offset < self.rotate_bytes:
                    break
                self._start_segment(number + 1)
                continue
            if complete < len(data):  # a kill in the middle of a write(): that verdict was never published
                on_torn(path.name, len(data) - complete)
            self.close_reader()
            path.unlink(missing_ok=True)
            with self._lock:
                self.bytes -= self._read_offset + len(data) - complete
            with self.progress:
                self._read_offset = 0
                self._segments.popleft()
        with self.progress:
            self.progress.notify_all()
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

    def _insert_lines(self, data: bytes, insert: Callable[[list[bytes]], int]) -> int:
        """Whole lines through `insert`, JOURNAL_BATCH_LINES at a time, moving the read offset
        past each batch. Returns the rows inserted."""
        lines = data.split(b"\n")[:-1]
        inserted = 0
        for start in range(0, len(lines), JOURNAL_BATCH_LINES):
            batch = lines[start:start + JOURNAL_BATCH_LINES]
            inserted += insert(batch)
            with self.progress:
                self._read_offset += sum(len(line) + 1 for line in batch)
        return inserted
