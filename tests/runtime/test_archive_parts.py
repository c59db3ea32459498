"""The archive's parts on their own (linewatch/runtime/sinks/archive/): the journal's segments without
SQLite, a verdict's row and its journal line, the store on a temporary database, retention over
a store and picture files, the picture files with a stand-in encoder, the folder lock, and how
losses are counted and logged. Exact small cases, no threads: tests/runtime/test_archive.py
tests the parts together, with the background thread."""

from __future__ import annotations

import datetime as dt
import errno
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from linewatch.runtime.sinks.archive import journal as journal_module
from linewatch.runtime.sinks.archive import retention as retention_module
from linewatch.runtime.sinks.archive.errors import ArchiveError, Losses, RowRefused, failure_reason
from linewatch.runtime.sinks.archive.journal import Journal
from linewatch.runtime.sinks.archive.lock import FolderLock
from linewatch.runtime.sinks.archive.pictures import PictureFiles
from linewatch.runtime.sinks.archive.retention import Retention
from linewatch.runtime.sinks.archive.rows import COLUMNS, journal_line, row_from_line
from linewatch.runtime.sinks.archive.store import DATABASE, SCHEMA_VERSION, Store, open_read_only
from linewatch.runtime.ops.metrics import Metrics
from linewatch.wire import Verdict
from tests.runtime.fakes import FakeClock

TS = 1_700_000_000.0


def segments(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("journal-*.jsonl"))}


class Inserted:
    """consume()'s `insert`: keeps each batch it was given; fails the calls listed in `fail_calls`."""

    def __init__(self, fail_calls: tuple[int, ...] = ()) -> None:
        self.batches: list[list[bytes]] = []
        self.calls = 0
        self.fail_calls = fail_calls

    def __call__(self, lines: list[bytes]) -> int:
        self.calls += 1
        if self.calls in self.fail_calls:
            raise sqlite3.OperationalError("database is locked")
        self.batches.append(list(lines))
        return len(lines)


# ---------------------------------------------------------------- the journal


def test_journal_lines_go_out_in_order_and_a_segment_past_rotate_bytes_is_replaced(tmp_path):
    journal = Journal(tmp_path, limit_bytes=1000, rotate_bytes=8)
    journal.begin()
    assert list(segments(tmp_path)) == ["journal-1.jsonl"]
    journal.append(b"one\n")
    inserted = Inserted()
    assert journal.consume(inserted) == 1  # 4 bytes read: below rotate_bytes, the segment stays
    assert list(segments(tmp_path)) == ["journal-1.jsonl"] and journal.bytes == 4
    journal.append(b"two\n")
    journal.append(b"three\n")
    assert journal.consume(inserted) == 2  # 14 bytes read: a new segment, the old one read to its end and deleted
    assert inserted.batches == [[b"one"], [b"two", b"three"]]
    assert segments(tmp_path) == {"journal-2.jsonl": b""} and journal.bytes == 0
    journal.append(b"four\n")
    assert segments(tmp_path) == {"journal-2.jsonl": b"four\n"} and journal.lines == 4


def test_journal_waits_for_the_end_of_a_line(tmp_path):
    journal = Journal(tmp_path)
    journal.begin()
    journal.append(b"whole\n")
    with open(tmp_path / "journal-1.jsonl", "ab") as f:
        f.write(b"half")  # (as if a write() were under way)
    inserted = Inserted()
    journal.consume(inserted)
    with open(tmp_path / "journal-1.jsonl", "ab") as f:
        f.write(b" done\n")
    journal.consume(inserted)
    assert inserted.batches == [[b"whole"], [b"half done"]]


def test_journal_mark_is_reached_once_its_lines_are_consumed(tmp_path):
    journal = Journal(tmp_path)
    assert journal.reached(journal.mark())  # nothing written yet
    journal.begin()
    journal.append(b"a\n")
    mark = journal.mark()
    journal.append(b"b\n")
    assert not journal.reached(mark)
    journal.consume(Inserted())
    assert journal.reached(mark) and journal.reached(journal.mark())


def test_journal_refuses_a_line_beyond_its_limit_and_after_close(tmp_path):
    journal = Journal(tmp_path, limit_bytes=10)
    journal.begin()
    journal.append(b"12345\n")
    with pytest.raises(RowRefused) as full:
        journal.append(b"abcde\n")  # 12 bytes would be over 10
    assert full.value.reason == "journal_full" and journal.bytes == 6 and journal.lines == 1
    inserted = Inserted()
    journal.close_writer()
    with pytest.raises(RowRefused) as closed:
        journal.append(b"x\n")
    assert closed.value.reason == "closed" and journal.fd is None
    assert journal.consume(inserted) == 1  # closed: every line goes in and every segment is deleted
    assert inserted.batches == [[b"12345"]] and segments(tmp_path) == {} and journal.bytes == 0
    journal.begin()  # (a closed journal starts no segment)
    assert segments(tmp_path) == {} and journal.fd is None


def test_journal_replays_left_segments_in_number_order_and_reports_a_torn_end(tmp_path):
    (tmp_path / "journal-10.jsonl").write_bytes(b"c\nd\n")
    (tmp_path / "journal-3.jsonl").write_bytes(b"a\nb\nhal")  # a kill in the middle of a write()
    (tmp_path / "journal-x.jsonl").write_bytes(b"not ours\n")
    journal = Journal(tmp_path)
    assert journal.find_segments() == 2 and journal.bytes == 11
    journal.begin()  # after the last one found
    journal.append(b"e\n")
    torn: list[tuple[str, int]] = []
    inserted = Inserted()
    assert journal.consume(inserted, on_torn=lambda name, nbytes: torn.append((name, nbytes))) == 5
    assert inserted.batches == [[b"a", b"b"], [b"c", b"d"], [b"e"]]
    assert torn == [("journal-3.jsonl", 3)] and journal.bytes == 2
    assert segments(tmp_path) == {"journal-11.jsonl": b"e\n", "journal-x.jsonl": b"not ours\n"}


def test_journal_begins_at_one_when_nothing_is_left(tmp_path):
    (tmp_path / "journal-4.jsonl").write_bytes(b"a\n")
    journal = Journal(tmp_path)
    journal.find_segments()
    journal.consume(Inserted())  # (a replay that went in)
    journal.begin()
    assert segments(tmp_path) == {"journal-1.jsonl": b""}


def test_journal_a_failed_insert_leaves_its_batch_and_the_rest_for_the_next_call(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "JOURNAL_BATCH_LINES", 2)
    (tmp_path / "journal-1.jsonl").write_bytes(b"".join(b"%d\n" % i for i in range(5)))
    journal = Journal(tmp_path)
    journal.find_segments()
    inserted = Inserted(fail_calls=(2,))
    with pytest.raises(sqlite3.OperationalError):
        journal.consume(inserted)
    assert inserted.batches == [[b"0", b"1"]] and list(segments(tmp_path)) == ["journal-1.jsonl"]
    assert journal.consume(inserted) == 3
    assert inserted.batches == [[b"0", b"1"], [b"2", b"3"], [b"4"]]  # each line once
    assert segments(tmp_path) == {} and journal.bytes == 0


# ---------------------------------------------------------------- rows


def verdict(seq: int, value: str = "fail", with_image: bool = False) -> Verdict:
    v = Verdict(camera="cam0", frame_id=100 + seq, verdict=value, capture_ts=TS + seq, part_id=f"part-{seq}",
                score=np.float32(1.5), threshold=1.0, backend="classic", bank_id="bank-1", latency_s=0.02,
                objects=[{"bbox": np.array([1.0, 2.0]), "score": np.float64(0.25)}], run_id="run1", seq=seq)
    v.branch_scores = {"patch": np.float32(0.5)}
    if with_image:
        v.image = np.zeros((4, 4, 3), np.uint8)
    return v


def test_a_journal_line_is_the_row_in_column_order_with_numpy_values_as_plain_json():
    line = journal_line(verdict(7), TS + 60, "images/2023-11-14/run1-7")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    row = dict(zip(COLUMNS, row_from_line(line)))
    assert row["id"] == "run1-7" and row["verdict_ts"] == TS + 60 and row["pictures"] == "images/2023-11-14/run1-7"
    assert row["score"] == 1.5 and row["frame_id"] == 107
    assert json.loads(row["objects"]) == [{"bbox": [1.0, 2.0], "score": 0.25}]
    assert row["branch_scores"] == '{"patch": 0.5}'  # as json.dumps writes it


def test_a_line_that_is_not_a_row_is_a_value_error_naming_why():
    with pytest.raises(ValueError, match="not a row of 18 columns"):
        row_from_line(b'["a", 1]')
    row = json.loads(journal_line(verdict(1), TS, None))
    row[COLUMNS.index("objects")] = [1, 2]  # a JSON column must hold JSON text
    with pytest.raises(ValueError, match="objects: not what the journal writes"):
        row_from_line(json.dumps(row).encode())
    with pytest.raises(ValueError):
        row_from_line(b"{not json")


# ---------------------------------------------------------------- the store


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / DATABASE, wal_limit_bytes=1024 * 1024, busy_timeout_ms=50)
    assert store.open() == 0
    yield store
    store.close()


def lines(*seqs: int, pictures: bool = False, ts: float | None = None) -> list[bytes]:
    """Journal lines (without their newline) of fail verdicts `seqs`, verdict_ts TS + seq (or `ts`)."""
    return [journal_line(verdict(s), TS + s if ts is None else ts, f"images/day/run1-{s}" if pictures else None
                         ).rstrip(b"\n") for s in seqs]


def test_a_new_store_has_the_schema_its_version_and_incremental_vacuum(store, tmp_path):
    conn = open_read_only(tmp_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [r[1] for r in conn.execute("PRAGMA table_info(verdicts)")] == list(COLUMNS)
    finally:
        conn.close()


def test_the_store_inserts_lines_once_and_skips_what_is_not_a_row(store, tmp_path):
    assert store.insert_lines(lines(0, 1, 2)) == (3, [])
    assert store.insert_lines(lines(1, 2, 3)) == (1, [])  # ids already in: skipped, not counted
    inserted, invalid = store.insert_lines([b"{not json", *lines(4)])  # one by one: the good one goes in
    assert inserted == 1 and len(invalid) == 1 and isinstance(invalid[0], ValueError)
    assert store.row_count() == 5 and store.rows_since_checkpoint == 5
    busy, frames, done = store.checkpoint()
    assert busy == 0 and frames == done and store.rows_since_checkpoint == 0
    store.close()
    again = Store(tmp_path / DATABASE)
    try:
        assert again.open() == 5
    finally:
        again.close()


def test_the_store_gives_the_oldest_rows_and_deletes_and_clears_them(store):
    store.insert_lines(lines(3, 1, 2, pictures=True) + lines(4))
    oldest = store.oldest_rows(2)
    assert [stem for _, stem in oldest] == ["images/day/run1-1", "images/day/run1-2"]  # by verdict_ts, not rowid
    assert [stem for _, stem in store.oldest_rows(10, until_ts=TS + 3)] == ["images/day/run1-1", "images/day/run1-2"]
    store.delete_rows([oldest[0][0]])
    store.clear_picture("run1-2", "images/day/elsewhere")  # points elsewhere: left as it is
    assert [stem for _, stem in store.oldest_pictures(10)] == ["images/day/run1-2", "images/day/run1-3"]
    store.clear_picture("run1-2", "images/day/run1-2")
    [(rowid, stem)] = store.oldest_pictures(10)
    store.clear_pictures([rowid])
    assert store.oldest_pictures(10) == [] and store.row_count() == 3


def test_a_store_of_another_schema_version_is_refused_and_left_closed(tmp_path):
    with sqlite3.connect(tmp_path / DATABASE) as conn:
        conn.execute("CREATE TABLE verdicts (id)")
        conn.execute("PRAGMA user_version = 7")
    conn.close()
    store = Store(tmp_path / DATABASE)
    with pytest.raises(ArchiveError, match=r"schema version 7, this linewatch knows version 1"):
        store.open()
    with pytest.raises(sqlite3.ProgrammingError):  # (closed)
        store.row_count()


# ---------------------------------------------------------------- retention


class NoEncoder:
    def close(self) -> None:
        pass


def picture(root: Path, stem: str, nbytes: int = 100) -> None:
    path = root / (stem + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * nbytes)


def test_retention_by_age_deletes_old_rows_their_pictures_and_old_day_folders(store, tmp_path):
    pictures = PictureFiles(tmp_path, encoder=NoEncoder())  # type: ignore[arg-type]
    store.insert_lines(lines(1, 2, 3, 4, pictures=True))
    for s in (1, 2, 3, 4):
        picture(tmp_path, f"images/day/run1-{s}")
    picture(tmp_path, "images/2000-01-01/orphan")  # a picture whose row never went in, a day long past
    pictures.scan()
    assert pictures.bytes == 500
    removed = Retention(store, pictures).enforce(cutoff=TS + 2.5, budget=10**9)
    assert removed == {"rows_by_age": 2, "day_folders": 1, "pictures_by_size": 0, "rows_by_size": 0}
    assert [stem for _, stem in store.oldest_rows(10)] == ["images/day/run1-3", "images/day/run1-4"]
    assert sorted(p.name for p in (tmp_path / "images").rglob("*.png")) == ["run1-3.png", "run1-4.png"]
    assert pictures.bytes == 200 and not (tmp_path / "images" / "2000-01-01").exists()


def test_retention_by_size_removes_the_oldest_pictures_before_any_row(store, tmp_path):
    pictures = PictureFiles(tmp_path, encoder=NoEncoder())  # type: ignore[arg-type]
    store.insert_lines(lines(1, 2, 3, pictures=True))
    for s in (1, 2, 3):
        picture(tmp_path, f"images/day/run1-{s}")
    pictures.scan()
    retention = Retention(store, pictures)
    budget = store.page_bytes() + 150  # the rows and one picture and a half
    assert retention.retained_bytes() == budget + 150
    removed = retention.enforce(cutoff=0.0, budget=budget)
    assert removed == {"rows_by_age": 0, "day_folders": 0, "pictures_by_size": 2, "rows_by_size": 0}
    assert [stem for _, stem in store.oldest_rows(10)] == [None, None, "images/day/run1-3"]
    assert pictures.bytes == 100 and retention.retained_bytes() <= budget


def test_retention_by_size_then_removes_the_oldest_rows(store, tmp_path):
    pictures = PictureFiles(tmp_path, encoder=NoEncoder())  # type: ignore[arg-type]
    store.insert_lines(lines(*range(400)))
    budget = store.page_bytes() // 2
    removed = Retention(store, pictures).enforce(cutoff=0.0, budget=budget)
    gone = removed["rows_by_size"]
    assert 0 < gone < 400 and store.row_count() == 400 - gone
    assert store.oldest_rows(1, until_ts=TS + gone) == []  # the oldest went
    assert len(store.oldest_rows(1000, until_ts=TS + gone + 1)) == 1  # and none after them
    assert store.page_bytes() <= budget and store.page_bytes("freelist_count") == 0  # pages given back


def test_retention_asks_between_batches_and_stops_when_told(store, tmp_path, monkeypatch):
    monkeypatch.setattr(retention_module, "RETENTION_BATCH", 2)
    pictures = PictureFiles(tmp_path, encoder=NoEncoder())  # type: ignore[arg-type]
    store.insert_lines(lines(1, 2, 3, 4, 5))
    asked = []

    def between() -> bool:
        asked.append(store.row_count())
        return True  # stop now

    removed = Retention(store, pictures, between).enforce(cutoff=TS + 10, budget=10**9)
    assert removed["rows_by_age"] == 2 and asked[0] == 3  # one transaction of two rows, then asked
    assert store.row_count() == 3


# ---------------------------------------------------------------- picture files


class StandIn:
    """An encoder in this process: fixed bytes, or an error."""

    def __init__(self, fail: bool = False, heatmap: bool = True) -> None:
        self.fail, self.heatmap, self.calls = fail, heatmap, []

    def encode(self, image, v, frame_format, timeout_s):
        self.calls.append((v.id, frame_format))
        if self.fail:
            raise ValueError("could not encode the frame as PNG")
        return b"F" * 10, b"H" * 20 if self.heatmap else None, b"O" * 30

    def close(self) -> None:
        pass


def test_which_verdicts_keep_pictures_and_where_they_go():
    files = PictureFiles(Path("/nowhere"), pass_image_sample=1.0, encoder=NoEncoder())  # type: ignore[arg-type]
    assert files.wanted(verdict(1, "fail", with_image=True)) and files.wanted(verdict(2, "pass", with_image=True))
    assert not files.wanted(verdict(3, "fail"))  # no image
    assert not files.wanted(verdict(4, "error", with_image=True))
    unsampled = PictureFiles(Path("/nowhere"), encoder=NoEncoder())  # type: ignore[arg-type]
    assert not unsampled.wanted(verdict(5, "pass", with_image=True))
    midnight = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc).timestamp()
    assert files.stem("run1-1", midnight - 0.001) == "images/2026-02-28/run1-1"  # the UTC day
    assert files.stem("run1-2", midnight) == "images/2026-03-01/run1-2"


def test_pictures_are_written_whole_and_counted(tmp_path):
    encoder = StandIn()
    files = PictureFiles(tmp_path, frame_format="bmp", encoder=encoder)  # type: ignore[arg-type]
    files.write("images/2026-03-01/run1-1", np.zeros((4, 4, 3), np.uint8), verdict(1))
    assert sorted(p.name for p in (tmp_path / "images" / "2026-03-01").iterdir()) == \
        ["run1-1.bmp", "run1-1.heatmap.npz", "run1-1.overlay.jpg"]  # and no .tmp
    assert files.bytes == 60 and files.written == 1 and encoder.calls == [("run1-1", "bmp")]
    assert files.remove("images/2026-03-01/run1-1") == 60 and files.bytes == 0
    assert list((tmp_path / "images" / "2026-03-01").iterdir()) == []


def test_a_picture_that_cannot_be_encoded_leaves_no_file_and_is_raised(tmp_path):
    files = PictureFiles(tmp_path, encoder=StandIn(fail=True))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="could not encode"):
        files.write("images/2026-03-01/run1-1", np.zeros((4, 4, 3), np.uint8), verdict(1))
    assert files.bytes == 0 and files.written == 0 and list((tmp_path / "images" / "2026-03-01").iterdir()) == []


# ---------------------------------------------------------------- the folder lock, losses


def test_the_folder_lock_is_one_holder_at_a_time(tmp_path):
    first, second = FolderLock(tmp_path), FolderLock(tmp_path)
    first.acquire()
    with pytest.raises(ArchiveError, match="is in use by another linewatch"):
        second.acquire()
    assert not second.held
    first.release()
    first.release()  # (idempotent)
    second.acquire()
    second.release()


def test_failure_reasons_are_short_stable_labels():
    assert failure_reason(RowRefused("journal_full")) == "journal_full"
    assert failure_reason(OSError(errno.ENOSPC, "full")) == "disk_full"
    assert failure_reason(OSError(errno.EROFS, "ro")) == "read_only"
    assert failure_reason(sqlite3.ProgrammingError("closed")) == "closed"
    assert failure_reason(ValueError("?")) == "error"


class Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def error(self, event, **fields):
        self.lines.append(("error", event, fields))

    def warning(self, event, **fields):
        self.lines.append(("warning", event, fields))


def test_losses_are_counted_each_and_logged_once_per_reason_per_interval():
    metrics, log, clock = Metrics(), Lines(), FakeClock()
    losses = Losses(metrics, log, clock, interval_s=10.0)
    losses.row("torn", segment="journal-3.jsonl", bytes=3)
    losses.row("torn", segment="journal-4.jsonl", bytes=5)  # within the interval: counted, not logged
    losses.picture("queue_full", verdict(1))
    clock.advance(10.0)
    losses.row("torn", OSError(errno.EIO, "io"))
    assert losses.rows == 3 and losses.pictures == 1
    assert metrics.sink_dropped.labels(sink="archive_row", reason="torn")._value.get() == 3
    assert metrics.sink_dropped.labels(sink="archive_image", reason="queue_full")._value.get() == 1
    assert log.lines == [
        ("error", "archive_row_failed", {"reason": "torn", "error": None, "segment": "journal-3.jsonl", "bytes": 3,
                                         "not_logged_since_last": 0}),
        ("warning", "archive_picture_dropped", {"reason": "queue_full", "camera": "cam0", "frame_id": 101,
                                                "error": None, "not_logged_since_last": 0}),
        ("error", "archive_row_failed", {"reason": "torn", "error": "OSError(5, 'io')", "not_logged_since_last": 1}),
    ]
