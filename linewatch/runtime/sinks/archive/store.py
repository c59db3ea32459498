"""The SQLite file: its schema, journal lines into rows, checkpoints, and the deletes retention asks for.

`verdicts.sqlite` (+ -wal, -shm) holds one row per verdict (rows.COLUMNS), the schema version
in PRAGMA user_version. The Store has one connection, in autocommit mode, used by one thread
at a time (the Archive's maintenance lock): the background thread (journal, pictures,
checkpoints, retention) or a test calling enforce_retention(). Auto-checkpoint is off:
checkpoints run on the background thread every CHECKPOINT_INTERVAL_S. Readers beside a daemon
(the CLI) use open_read_only().
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable

from linewatch.runtime.sinks.archive.errors import ArchiveError
from linewatch.runtime.sinks.archive.rows import COLUMNS, row_from_line

DATABASE = "verdicts.sqlite"
SCHEMA_VERSION = 1
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
VACUUM_PAGES = 64  # pages given back to the file system per transaction
WAL_LIMIT_BYTES = 4 * 1024 * 1024  # the WAL file goes back to this size after a checkpoint (or max_bytes / 16)
BUSY_TIMEOUT_MS = 5000  # another process holding the database's write lock: wait this long, then try again later


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


def file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class Store:
    """The database at `path`, written by one thread at a time (the caller serialises).

    open() creates or checks it; insert_lines() takes journal lines; checkpoint() moves the WAL
    into the file; oldest_rows(), oldest_pictures(), delete_rows(), clear_pictures() and
    give_back_free_pages() are retention's transactions. SQLite errors are raised as they are.
    """

    def __init__(self, path: Path, wal_limit_bytes: int = WAL_LIMIT_BYTES,
                 busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self.wal_limit_bytes = wal_limit_bytes
        self.busy_timeout_ms = busy_timeout_ms
        self.rows_since_checkpoint = 0
        self._conn: sqlite3.Connection | None = None

    @property
    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "the store is not open"
        return self._conn

    # ------------------------------------------------------------------ opening and closing

    def open(self) -> int:
        """Open (or create) the database: WAL mode, schema checked, unique ids. Returns its rows.
        ArchiveError naming the path and the reason when it cannot (nothing left open)."""
        try:
            self._conn = self._connect()
            self._create_schema_if_new()
            read_schema_version(self._db, self.path)
            if self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise ArchiveError(f"runtime.archive: {self.path}: cannot switch to WAL mode (a network file system?)")
            self._db.execute(UNIQUE_ID_INDEX)
            return self.row_count()
        except sqlite3.IntegrityError as e:
            self.close()
            raise ArchiveError(f"runtime.archive: {self.path}: two rows have the same verdict id ({e})") from None
        except sqlite3.Error as e:
            self.close()
            raise ArchiveError(f"runtime.archive: cannot open {self.path}: {e}") from None
        except ArchiveError:
            self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        """The connection, in autocommit mode (BEGIN / COMMIT where a transaction spans statements)."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=self.busy_timeout_ms / 1000)
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
        if self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0 \
                and self._db.execute("PRAGMA user_version").fetchone()[0] == 0:
            # auto_vacuum only takes before the first table: it lets retention give pages back to the disk
            self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self._db.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass

    # ------------------------------------------------------------------ rows in

    def insert_lines(self, lines: list[bytes]) -> tuple[int, list[Exception]]:
        """Journal lines in one transaction: (rows inserted, the errors of the lines that are not
        rows: skipped). The lines as one JSON array parsed by SQLite, or, if it does not take
        them all, one by one. A line already in (its id) is skipped, not counted."""
        conn = self._db
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
        self.rows_since_checkpoint += inserted
        return inserted, invalid

    def _insert_one_by_one(self, lines: list[bytes]) -> tuple[int, list[Exception]]:
        """Each line parsed in Python (it reads NaN) and inserted on its own; a line that is not a
        row, or that SQLite refuses (an empty NOT NULL column, an integer too large), is skipped:
        (rows inserted, their errors)."""
        inserted, invalid = 0, []
        for line in lines:
            try:
                inserted += self._db.execute(INSERT_ROW, row_from_line(line)).rowcount
            except (ValueError, OverflowError, sqlite3.IntegrityError) as e:
                invalid.append(e)
        return inserted, invalid

    # ------------------------------------------------------------------ upkeep

    def checkpoint(self) -> tuple[int, int, int]:
        """WAL -> database file (PASSIVE: never waits for readers or the writer). Returns
        SQLite's (busy, WAL frames, frames checkpointed)."""
        self.rows_since_checkpoint = 0
        return tuple(self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())  # type: ignore[return-value]

    def file_bytes(self) -> int:
        """The database file and its WAL, as they are on disk now."""
        return file_bytes(self.path) + file_bytes(self.path.with_name(self.path.name + "-wal"))

    def page_bytes(self, pragma: str = "page_count") -> int:
        """`pragma` (page_count, freelist_count) in bytes: page_count is the file as it will be
        after the next checkpoint."""
        pages = self._db.execute(f"PRAGMA {pragma}").fetchone()[0]
        return pages * self._db.execute("PRAGMA page_size").fetchone()[0]

    def row_count(self) -> int:
        return self._db.execute("SELECT count(*) FROM verdicts").fetchone()[0]

    def oldest_rows(self, limit: int, until_ts: float | None = None) -> list[tuple[int, str | None]]:
        """Up to `limit` (rowid, pictures) of the oldest rows (older than `until_ts` if given)."""
        where, args = ("WHERE verdict_ts < ?", (until_ts,)) if until_ts is not None else ("", ())
        return self._db.execute(f"SELECT rowid, pictures FROM verdicts {where} ORDER BY verdict_ts LIMIT ?",
                                (*args, limit)).fetchall()

    def oldest_pictures(self, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` (rowid, pictures) of the oldest rows that have pictures."""
        return self._db.execute("SELECT rowid, pictures FROM verdicts WHERE pictures IS NOT NULL "
                                "ORDER BY verdict_ts LIMIT ?", (limit,)).fetchall()

    def delete_rows(self, rowids: list[int]) -> None:
        self._db.execute(f"DELETE FROM verdicts WHERE rowid IN ({', '.join('?' * len(rowids))})", rowids)

    def clear_pictures(self, rowids: list[int]) -> None:
        """These rows' pictures are gone: their `pictures` is set to NULL."""
        self._db.execute(f"UPDATE verdicts SET pictures = NULL WHERE rowid IN ({', '.join('?' * len(rowids))})",
                         rowids)

    def clear_picture(self, verdict_id: str, stem: str) -> None:
        """The verdict's pictures at `stem` were not written: its row says so (if it still points there)."""
        self._db.execute("UPDATE verdicts SET pictures = NULL WHERE id = ? AND pictures = ?", (verdict_id, stem))

    def give_back_free_pages(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Return the pages deleted rows left free to the file system (auto_vacuum=INCREMENTAL;
        the file shrinks at the next checkpoint), VACUUM_PAGES per transaction, until none is
        left or `stop()` (asked between transactions) says so."""
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        while free:
            # (executescript steps it to the end; execute would free one page)
            self._db.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES});")
            before, free = free, self._db.execute("PRAGMA freelist_count").fetchone()[0]
            if free >= before or stop():  # (free >= before: auto_vacuum is off)
                break
