"""The verdict archive with real SQLite files, real journal files and real picture files: rows
(journaled by record(), in the database after wait_idle), the journal (replay after a real
kill -9, torn and invalid lines, failed writes, segments rotating under a writer), pictures,
sampling, drops and delays (queue full, a locked database, a full journal, a closed archive),
retention by age and size, schema versions, one daemon per folder. Time comes from a fake
clock; the background thread is blocked with an event where a test needs it still."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import structlog

from linewatch.config import ArchiveConfig, ConfigError, config_from_dict
from linewatch.runtime.sinks import archive as archive_module
from linewatch.runtime.sinks.archive import (
    DATABASE, FRAME_SUFFIXES, HEATMAP_SUFFIX, OVERLAY_SUFFIX, SCHEMA, Archive, ArchiveError, journal_line,
    open_read_only, picture_sampled,
)
from linewatch.runtime.ops.metrics import Metrics
from linewatch.wire import Verdict
from tests.runtime.fakes import FakeClock

DAY = 86400.0
WAIT_S = 30.0  # for the background thread: generous, never reached when it works
REPO = Path(__file__).resolve().parents[2]


def make_archive(tmp_path: Path, clock: FakeClock | None = None, log: Any = None,
                 **config) -> tuple[Archive, Metrics]:
    """An archive whose picture process runs at the tests' own priority: at SCHED_IDLE (the
    daemon's, tested below) it would wait for a core no other test process wants."""
    metrics = Metrics()
    archive = Archive(ArchiveConfig(enabled=True, path=str(tmp_path / "archive"), **config), metrics=metrics,
                      log=log or structlog.get_logger("test"), clock=clock or FakeClock(),
                      encoder=archive_module.PictureEncoder(idle=False))
    archive.start()
    return archive, metrics


class RecordingLog:
    """A logger that keeps (event, fields) and lets the test wait for an event."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []
        self.cond = threading.Condition()

    def _add(self, event: str, **fields: Any) -> None:
        with self.cond:
            self.lines.append((event, fields))
            self.cond.notify_all()

    info = warning = error = _add

    def wait_for(self, event: str, timeout_s: float = WAIT_S) -> dict | None:
        with self.cond:
            self.cond.wait_for(lambda: any(e == event for e, _ in self.lines), timeout_s)
            return next((f for e, f in self.lines if e == event), None)

    def all(self, event: str) -> list[dict]:
        with self.cond:
            return [f for e, f in self.lines if e == event]


def journal_files(archive_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(archive_dir.glob("journal-*.jsonl"))}


def verdict(seq: int, value: str = "pass", camera: str = "cam0", image: np.ndarray | None = None,
            run_id: str = "run1", **fields) -> Verdict:
    v = Verdict(camera=camera, frame_id=100 + seq, verdict=value, capture_ts=1_700_000_000.0 + seq,
                part_id=f"part-{seq}", score=0.8 if value == "pass" else 1.7, threshold=1.0,
                objects=[{"bbox": [1.0, 2.0, 3.0, 4.0], "status": "missing" if value == "fail" else "matched",
                          "score": np.float32(0.5)}],
                backend="classic", bank_id="bank-1", latency_s=0.02, run_id=run_id, seq=seq, **fields)
    if value in ("pass", "fail"):
        v.branch_scores = {"objects": 1.25, "patch": -0.5}
    if image is not None:
        v.image = image
        v.heatmap = np.linspace(0.0, 3.0, image.shape[0] * image.shape[1], dtype=np.float32).reshape(image.shape[:2])
    return v


def record(archive: Archive, v: Verdict) -> None:
    """As the daemon does: record, then drop the verdict's image (it goes on to the publisher without it)."""
    archive.record(v)
    v.image = None


def rows(archive_dir: Path, where: str = "", args: tuple = ()) -> list[dict]:
    conn = open_read_only(archive_dir)
    try:
        cur = conn.execute(f"SELECT * FROM verdicts {where} ORDER BY rowid", args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur]
    finally:
        conn.close()


def dropped(metrics: Metrics, sink: str, reason: str) -> float:
    return metrics.sink_dropped.labels(sink=sink, reason=reason)._value.get()


def picture_files(archive_dir: Path) -> set[str]:
    return {p.relative_to(archive_dir).as_posix() for p in (archive_dir / "images").rglob("*") if p.is_file()}


def noise(seed: int, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size + 16, 3), dtype=np.uint8)


# ---------------------------------------------------------------- rows


def test_every_verdict_is_a_journal_line_then_a_row_with_every_field(tmp_path):
    clock = FakeClock(wall=1_790_000_000.0)
    archive, metrics = make_archive(tmp_path, clock)
    try:
        archive.record(verdict(0, "pass"))
        clock.advance(2.5)
        archive.record(Verdict(camera="cam1", frame_id=7, verdict="error", capture_ts=1_700_000_100.0,
                               reason="decode_failed", run_id="run1", seq=1))
        archive.record(verdict(2, "fail"))
        # in the journal file when record returns (what survives a kill -9), one whole line each
        [journal] = journal_files(tmp_path / "archive").values()
        assert journal.count(b"\n") == 3 and journal.endswith(b"\n")
        # then in the database: another connection (read-only, as the CLI opens it) sees them
        assert archive.wait_idle(WAIT_S)
        got = rows(tmp_path / "archive")
    finally:
        archive.stop()
    assert [r["id"] for r in got] == ["run1-0", "run1-1", "run1-2"]
    first, error, fail = got
    assert first == {
        "id": "run1-0", "run_id": "run1", "seq": 0, "camera": "cam0", "frame_id": 100, "part_id": "part-0",
        "capture_ts": 1_700_000_000.0, "verdict_ts": 1_790_000_000.0, "verdict": "pass", "reason": None,
        "score": 0.8, "threshold": 1.0, "bank_id": "bank-1", "backend": "classic", "latency_s": 0.02,
        "objects": '[{"bbox": [1.0, 2.0, 3.0, 4.0], "status": "matched", "score": 0.5}]',
        "branch_scores": '{"objects": 1.25, "patch": -0.5}', "pictures": None,
    }
    assert error["verdict"] == "error" and error["reason"] == "decode_failed" and error["score"] is None
    assert error["verdict_ts"] == 1_790_000_002.5 and error["objects"] == "[]" and error["branch_scores"] == "{}"
    assert fail["verdict"] == "fail" and fail["pictures"] is None  # no image attached: no pictures
    assert archive.stats()["rows"] == 3 and dropped(metrics, "archive_row", "closed") == 0


def test_reopening_appends_to_the_same_archive(tmp_path):
    archive, _ = make_archive(tmp_path)
    archive.record(verdict(0))
    archive.stop()
    archive, _ = make_archive(tmp_path)
    archive.record(verdict(0, run_id="run2"))
    archive.stop()
    assert [r["id"] for r in rows(tmp_path / "archive")] == ["run1-0", "run2-0"]
    assert journal_files(tmp_path / "archive") == {}  # stop() put every line in the database


# ---------------------------------------------------------------- pictures


def test_an_unknown_frame_format_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"runtime": {"archive": {"frame_format": "jpeg"}}})
    assert "runtime.archive.frame_format" in str(e.value) and "'png'" in str(e.value), str(e.value)


@pytest.mark.parametrize("frame_format", ["png", "bmp"])
def test_a_failed_part_gets_its_frame_heatmap_and_overlay(tmp_path, frame_format):
    clock = FakeClock(wall=dt.datetime(2026, 3, 4, 23, 59, 59, tzinfo=dt.timezone.utc).timestamp())
    archive, metrics = make_archive(tmp_path, clock, frame_format=frame_format)
    frame_suffix = FRAME_SUFFIXES[frame_format]
    image = noise(1)
    v = verdict(5, "fail", image=image)
    heat = v.heatmap.copy()
    heat[0, 0] = np.nan  # a broken map still gives a picture
    v.heatmap = heat
    try:
        record(archive, v)
        assert archive.wait_idle(30)
        [row] = rows(tmp_path / "archive")
    finally:
        archive.stop()
    stem = tmp_path / "archive" / row["pictures"]
    assert row["pictures"] == "images/2026-03-04/run1-5"  # the UTC day it was archived
    frame = cv2.cvtColor(cv2.imread(str(stem) + frame_suffix, cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
    assert np.array_equal(frame, image)  # lossless
    back = np.load(str(stem) + HEATMAP_SUFFIX)["heatmap"].astype(np.float32)
    assert back.shape == image.shape[:2] and back[0, 0] == 0.0
    # float16: within 2**-11 relative (plus the float16 spacing near zero)
    np.testing.assert_allclose(back.ravel()[1:], heat.ravel()[1:], rtol=2.0**-11, atol=1e-4)
    overlay = cv2.imread(str(stem) + OVERLAY_SUFFIX)
    assert overlay is not None and overlay.shape == image.shape
    assert picture_files(tmp_path / "archive") == {f"{row['pictures']}{s}" for s in (frame_suffix, HEATMAP_SUFFIX,
                                                                                      OVERLAY_SUFFIX)}
    assert archive.stats()["pictures"] == 1 and dropped(metrics, "archive_image", "queue_full") == 0
    assert metrics.archive_bytes._value.get() > 0


@pytest.mark.parametrize("first", ["live page", "archive"])
def test_a_failed_parts_overlay_is_rendered_once_for_the_archive_and_the_live_page(tmp_path, monkeypatch,
                                                                                   overlay_renderings, first):
    """The archive sink shares the verdict's Outcome: whoever needs the overlay first renders it
    (the live page in the daemon, the archive in its encoder process, with the frame's file), the
    other one gets the same bytes. On disk the file is what the archive always wrote: the overlay
    as JPEG at OVERLAY_JPEG_QUALITY (90)."""
    from linewatch.overlay import overlay_jpeg
    from linewatch.runtime.sinks.archive.sink import ArchiveSink
    from linewatch.runtime.sinks.outcome import Outcome

    drew: list[bool] = []  # per call of the encoder: whether it drew the overlay

    def in_process(encoder, image, v, frame_format, timeout_s, overlay=True):
        drew.append(overlay)
        return archive_module.encode_pictures(image, v, frame_format, overlay)

    monkeypatch.setattr(archive_module.PictureEncoder, "encode", in_process)
    image = noise(5)
    outcome = Outcome.of(verdict(5, "fail", image=image))
    archive, _ = make_archive(tmp_path)
    try:
        page = outcome.overlay_jpeg() if first == "live page" else None
        ArchiveSink(archive).publish(outcome)
        assert archive.wait_idle(30)
        [row] = rows(tmp_path / "archive")
    finally:
        archive.stop()
    on_disk = (tmp_path / "archive" / (row["pictures"] + OVERLAY_SUFFIX)).read_bytes()
    assert on_disk == overlay_jpeg(image, outcome.verdict, quality=90)
    assert outcome.overlay_jpeg() == on_disk  # the live page, after the archive: the same bytes
    if first == "live page":
        assert page == on_disk and overlay_renderings == [105] and drew == [False]
    else:
        assert overlay_renderings == [] and drew == [True]


def test_passes_get_pictures_by_a_deterministic_sample_of_their_ids(tmp_path, monkeypatch):
    # which verdicts get pictures is the subject here, not the picture process: encoded in this
    # process (four archives would start four)
    monkeypatch.setattr(archive_module.PictureEncoder, "encode",
                        lambda encoder, image, v, frame_format, timeout_s, overlay=True:
                        archive_module.encode_pictures(image, v, frame_format, overlay))
    image = noise(2, 8)
    kept: dict[str, set[str]] = {}
    for name, fraction in (("none", 0.0), ("some", 0.3), ("some_again", 0.3), ("all", 1.0)):
        archive, _ = make_archive(tmp_path / name, pass_image_sample=fraction, queue_size=500)
        try:
            for seq in range(300):
                archive.record(verdict(seq, "pass", image=image))
            archive.record(verdict(300, "fail", image=image))
            assert archive.wait_idle(60)
            got = rows(tmp_path / name / "archive", "WHERE pictures IS NOT NULL")
        finally:
            archive.stop()
        kept[name] = {r["id"] for r in got if r["verdict"] == "pass"}
        assert "run1-300" in {r["id"] for r in got}  # a failed part always
        assert picture_files(tmp_path / name / "archive") == {r["pictures"] + s for r in got
                                                              for s in (".png", HEATMAP_SUFFIX, OVERLAY_SUFFIX)}
    assert kept["none"] == set() and len(kept["all"]) == 300
    assert 60 <= len(kept["some"]) <= 120, len(kept["some"])  # 30 % of 300, give or take
    assert kept["some"] == kept["some_again"]  # the same verdicts every time
    assert kept["some"] == {f"run1-{s}" for s in range(300) if picture_sampled(f"run1-{s}", 0.3)}


def test_a_full_picture_queue_drops_the_picture_and_counts_it_never_the_row(tmp_path, monkeypatch):
    entered, release = threading.Event(), threading.Event()

    def blocked_encode(encoder, image, v, frame_format, timeout_s):
        """The picture thread waits here for the test (then encodes in this process)."""
        entered.set()
        assert release.wait(60), "the test never released the picture thread"
        return archive_module.encode_pictures(image, v, frame_format)

    monkeypatch.setattr(archive_module.PictureEncoder, "encode", blocked_encode)
    archive, metrics = make_archive(tmp_path, queue_size=2)
    try:
        record(archive, verdict(0, "fail", image=noise(0)))
        assert entered.wait(30)  # the picture thread holds #0: the queue is empty again
        record(archive, verdict(1, "fail", image=noise(1)))
        record(archive, verdict(2, "fail", image=noise(2)))  # the queue is full now
        record(archive, verdict(3, "fail", image=noise(3)))
        assert dropped(metrics, "archive_image", "queue_full") == 1
        # every row is in the journal while the pictures wait (the thread that inserts them is held)
        [journal] = journal_files(tmp_path / "archive").values()
        assert [line.split(b",", 1)[0] for line in journal.splitlines()] == \
            [b'["run1-0"', b'["run1-1"', b'["run1-2"', b'["run1-3"']
        release.set()
        assert archive.wait_idle(30)
        got = rows(tmp_path / "archive")
    finally:
        release.set()
        archive.stop()
    assert [r["id"] for r in got] == ["run1-0", "run1-1", "run1-2", "run1-3"]
    assert [r["pictures"] is not None for r in got] == [True, True, True, False]
    assert {p.rsplit("/", 1)[1].split(".")[0] for p in picture_files(tmp_path / "archive")} == \
        {"run1-0", "run1-1", "run1-2"}
    assert archive.stats()["pictures_dropped"] == 1


def test_a_picture_that_cannot_be_written_is_counted_and_its_row_says_so(tmp_path):
    archive, metrics = make_archive(tmp_path)
    try:
        v = verdict(0, "fail", image=np.zeros((8, 8), np.uint16))  # not an RGB frame: encoding fails
        archive.record(v)
        archive.record(verdict(1, "fail", image=noise(1)))
        assert archive.wait_idle(30)
        got = rows(tmp_path / "archive")
    finally:
        archive.stop()
    assert [r["pictures"] is not None for r in got] == [False, True]
    assert dropped(metrics, "archive_image", "write_failed") == 1
    assert not any("run1-0" in p for p in picture_files(tmp_path / "archive"))


# ---------------------------------------------------------------- rows that cannot be written


def test_a_locked_database_holds_rows_back_in_the_journal_and_loses_none(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_module, "BUSY_TIMEOUT_MS", 50)
    log = RecordingLog()
    archive, metrics = make_archive(tmp_path, log=log)
    other = sqlite3.connect(tmp_path / "archive" / DATABASE, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock past the busy timeout
        archive.record(verdict(0))
        archive.record(verdict(1))
        held = log.wait_for("archive_rows_held_back")  # the background thread tried, and keeps the lines
        assert held is not None and held["reason"] == "locked", log.lines
        assert rows(tmp_path / "archive") == []
        other.execute("ROLLBACK")
        assert archive.wait_idle(WAIT_S)
        got = rows(tmp_path / "archive")
    finally:
        other.close()
        archive.stop()
    assert [r["id"] for r in got] == ["run1-0", "run1-1"]
    assert archive.stats()["rows_dropped"] == 0 and dropped(metrics, "archive_row", "locked") == 0


def test_a_full_journal_drops_rows_counted_until_the_database_takes_them_again(tmp_path):
    archive, metrics = make_archive(tmp_path)
    line_bytes = len(journal_line(verdict(0), FakeClock().time(), None))  # (every line here is this long)
    archive.journal_limit_bytes = 5 * line_bytes + 10  # room for five lines
    archive.journal_rotate_bytes = line_bytes  # a line in the database frees its bytes at once
    other = sqlite3.connect(tmp_path / "archive" / DATABASE, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # nothing leaves the journal
        for seq in range(7):
            archive.record(verdict(seq))
        assert dropped(metrics, "archive_row", "journal_full") == 2
        other.execute("ROLLBACK")
        assert archive.wait_idle(WAIT_S)
        archive.record(verdict(7))  # room again once the lines are in the database
        assert archive.wait_idle(WAIT_S)
        got = rows(tmp_path / "archive")
    finally:
        other.close()
        archive.stop()
    assert [r["id"] for r in got] == [f"run1-{s}" for s in (0, 1, 2, 3, 4, 7)]
    assert archive.stats()["rows_dropped"] == 2


def test_a_journal_write_that_fails_is_counted_never_raised_and_queues_no_pictures(tmp_path):
    archive, metrics = make_archive(tmp_path)
    fd = archive._journal_fd
    saved, full = os.dup(fd), os.open("/dev/full", os.O_WRONLY)  # /dev/full: every write is ENOSPC
    try:
        os.dup2(full, fd)  # the journal's descriptor now writes to /dev/full: a real failed write()
        archive.record(verdict(0, "fail", image=noise(0)))
        os.dup2(saved, fd)
        archive.record(verdict(1, "fail", image=noise(1)))
        assert archive.wait_idle(WAIT_S)
        got = rows(tmp_path / "archive")
    finally:
        os.close(saved)
        os.close(full)
        archive.stop()
    assert [r["id"] for r in got] == ["run1-1"]
    assert dropped(metrics, "archive_row", "disk_full") == 1 and archive.stats()["rows_dropped"] == 1
    assert archive.stats()["pictures"] == 1  # the failed row's pictures were never queued
    assert {p.rsplit("/", 1)[1].split(".")[0] for p in picture_files(tmp_path / "archive")} == {"run1-1"}


def test_a_short_journal_write_is_cut_off_so_the_next_line_stands_alone(tmp_path):
    archive, metrics = make_archive(tmp_path, log=RecordingLog())  # (a log in memory: no file grows meanwhile)
    root = tmp_path / "archive"
    archive.record(verdict(0))
    [name] = journal_files(root)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: short, or EFBIG
    try:
        # the background thread writes no database file meanwhile (RLIMIT_FSIZE is per process)
        with archive._maintenance_lock:
            resource.setrlimit(resource.RLIMIT_FSIZE, ((root / name).stat().st_size + 100, limits[1]))
            try:
                archive.record(verdict(1))  # 100 bytes of it fit: the kernel writes them and says so
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        archive.record(verdict(2))
        assert archive.wait_idle(WAIT_S)
        got = rows(root)
    finally:
        signal.signal(signal.SIGXFSZ, previous)
        archive.stop()
    assert [r["id"] for r in got] == ["run1-0", "run1-2"]
    assert dropped(metrics, "archive_row", "disk_full") == 1
    assert dropped(metrics, "archive_row", "invalid") == 0  # no piece of run1-1 was left before run1-2


def test_record_after_stop_is_counted_not_raised(tmp_path):
    archive, metrics = make_archive(tmp_path)
    archive.stop()
    archive.record(verdict(0, "fail", image=noise(0)))
    assert dropped(metrics, "archive_row", "closed") == 1


# ---------------------------------------------------------------- the journal

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from linewatch.config import ArchiveConfig
    from linewatch.runtime.sinks.archive import Archive
    from linewatch.runtime.ops.metrics import Metrics
    from linewatch.wire import Verdict

    archive = Archive(ArchiveConfig(enabled=True, path=sys.argv[1]), Metrics())
    archive.start()

    def record(seq):
        archive.record(Verdict(camera="cam0", frame_id=seq, verdict="pass", capture_ts=1.0, run_id="killed", seq=seq))

    for seq in range(50):
        record(seq)
    assert archive.wait_idle(60)  # these 50 are in the database (and still in the journal)
    archive._maintenance_lock.acquire()  # the background thread inserts nothing more
    for seq in range(50, 100):
        record(seq)  # these 50 are in the journal only
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.system
def test_a_killed_daemons_journal_is_replayed_at_start_each_verdict_once(tmp_path):
    root = tmp_path / "archive"
    child = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(root)], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert [r["id"] for r in rows(root)] == [f"killed-{s}" for s in range(50)]
    [journal] = journal_files(root).values()
    assert journal.count(b"\n") == 100  # nothing was deleted: the first 50 lines are replayed again

    log = RecordingLog()
    archive, metrics = make_archive(tmp_path, log=log)
    try:
        got = rows(root)  # in the database as soon as start() returns
        assert log.all("archive_opened")[0]["replayed"] == 50
        assert list(journal_files(root).values()) == [b""]  # the replayed lines are gone, a new segment begun
        archive.record(verdict(0, run_id="after"))
    finally:
        archive.stop()
    assert [r["id"] for r in got] == [f"killed-{s}" for s in range(100)]  # each once
    assert [r["id"] for r in rows(root)][100:] == ["after-0"]
    assert archive.stats()["rows_dropped"] == 0 and dropped(metrics, "archive_row", "torn") == 0


def test_a_torn_last_line_and_an_invalid_line_are_skipped_and_counted_the_rest_replayed(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    whole = [journal_line(verdict(seq), 1_700_000_000.0, None) for seq in range(4)]
    # a line that is no row, two good ones, and the start of a line cut by a kill in its write()
    (root / "journal-7.jsonl").write_bytes(whole[0] + b"{not json\n" + whole[1] + whole[2] + whole[3][:40])
    log = RecordingLog()
    archive, metrics = make_archive(tmp_path, log=log)
    try:
        got = rows(root)
        files = list(journal_files(root).values())
    finally:
        archive.stop()
    assert [r["id"] for r in got] == ["run1-0", "run1-1", "run1-2"]
    assert dropped(metrics, "archive_row", "invalid") == 1 and dropped(metrics, "archive_row", "torn") == 1
    assert archive.stats()["rows_dropped"] == 2
    torn = [f for f in log.all("archive_row_failed") if f["reason"] == "torn"]
    assert torn == [{"reason": "torn", "error": None, "segment": "journal-7.jsonl", "bytes": 40,
                     "not_logged_since_last": 0}]
    assert files == [b""]  # the replayed segment is gone, a new one begun


def test_lines_sqlite_cannot_read_go_in_one_by_one_as_before_the_journal(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    nan = verdict(1, "fail")
    nan.score = float("nan")  # json writes NaN, which SQLite's JSON refuses: this batch goes in line by line
    nan.objects = [{"bbox": [1.0, 2.0, 3.0, 4.0], "status": "missing", "score": float("nan")}]
    no_camera = verdict(2)
    no_camera.camera = None  # a row SQLite refuses (camera NOT NULL)
    (root / "journal-1.jsonl").write_bytes(b"".join(journal_line(v, 1_700_000_000.0, None)
                                                    for v in (verdict(0), nan, no_camera, verdict(3))))
    archive, metrics = make_archive(tmp_path)  # (replayed at start: one batch)
    archive.stop()
    got = rows(root)
    assert [r["id"] for r in got] == ["run1-0", "run1-1", "run1-3"]
    assert got[1]["score"] is None  # as the archive stored NaN before the journal
    assert got[1]["objects"] == '[{"bbox": [1.0, 2.0, 3.0, 4.0], "status": "missing", "score": NaN}]'
    assert dropped(metrics, "archive_row", "invalid") == 1


def test_segments_rotating_under_a_writer_lose_and_repeat_no_line(tmp_path, monkeypatch):
    monkeypatch.setattr(archive_module, "JOURNAL_INTERVAL_S", 0.001)  # the tailer runs all the time
    archive, metrics = make_archive(tmp_path)
    archive.journal_rotate_bytes = 4096  # a new segment every ten lines or so
    root = tmp_path / "archive"
    segments_seen: set[str] = set()
    written = 0
    try:
        # 30 rounds of 40 lines (over 4096 bytes: every round's lines fill a segment), the tailer
        # reading and rotating while they are written; it yields the GIL after each line, as the
        # output thread does while it waits for its next verdict. After each round everything is
        # in the database, so the next round writes into a segment begun in this one: at least
        # 30 segments, however the two threads interleave on a loaded machine.
        for _ in range(30):
            for _ in range(40):
                archive.record(verdict(written))
                written += 1
                os.sched_yield()
                segments_seen.update(p.name for p in root.glob("journal-*.jsonl"))
            assert archive.wait_idle(WAIT_S)
        got = [r["id"] for r in rows(root)]
    finally:
        archive.stop()
    assert len(segments_seen) >= 30, (len(segments_seen), written)
    assert got == [f"run1-{s}" for s in range(written)]  # every line once, in the order written
    assert archive.stats()["rows_dropped"] == 0 and journal_files(root) == {}


def test_one_daemon_per_archive_folder(tmp_path):
    first, _ = make_archive(tmp_path)
    try:
        with pytest.raises(ArchiveError, match=r"is in use by another linewatch") as err:
            make_archive(tmp_path)
        assert str(tmp_path / "archive") in str(err.value)
    finally:
        first.stop()
    second, _ = make_archive(tmp_path)  # free again once the first one stopped
    second.stop()


def test_an_archive_written_before_the_journal_gets_unique_ids_and_opens(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    with sqlite3.connect(root / DATABASE) as conn:  # as the archive's first version made it: no unique index
        conn.executescript(f"{SCHEMA} PRAGMA user_version = 1;")
        conn.execute("INSERT INTO verdicts (id, camera, frame_id, verdict_ts, verdict, objects, branch_scores) "
                     "VALUES ('old-1', 'cam0', 1, 1.0, 'pass', '[]', '{}')")
    conn.close()
    archive, _ = make_archive(tmp_path)
    archive.record(verdict(0))
    archive.stop()
    assert [r["id"] for r in rows(root)] == ["old-1", "run1-0"]
    conn = open_read_only(root)
    try:
        assert conn.execute("SELECT \"unique\" FROM pragma_index_list('verdicts') WHERE name = 'verdicts_id'"
                            ).fetchone() == (1,)
    finally:
        conn.close()

    with sqlite3.connect(root / DATABASE) as conn:  # two rows with one id cannot get the index: refused by name
        conn.execute("DROP INDEX verdicts_id")
        conn.execute("INSERT INTO verdicts (id, camera, frame_id, verdict_ts, verdict, objects, branch_scores) "
                     "VALUES ('old-1', 'cam0', 2, 2.0, 'pass', '[]', '{}')")
    conn.close()
    with pytest.raises(ArchiveError, match=r"two rows have the same verdict id") as err:
        make_archive(tmp_path)
    assert str(root / DATABASE) in str(err.value)


@pytest.mark.skipif(sys.platform != "linux", reason="a nice value per thread is Linux's")
def test_the_background_thread_runs_below_the_verdict_paths_priority(tmp_path):
    archive, _ = make_archive(tmp_path)
    try:
        archive.record(verdict(0))
        assert archive.wait_idle(WAIT_S)  # the thread has run (it lowers its priority first)
        background = os.getpriority(os.PRIO_PROCESS, archive._thread.native_id)
    finally:
        archive.stop()
    assert background == min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
                             + archive_module.BACKGROUND_NICE)


# ---------------------------------------------------------------- retention


def test_retention_by_age_deletes_old_rows_and_their_pictures(tmp_path):
    clock = FakeClock(wall=dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc).timestamp())
    archive, metrics = make_archive(tmp_path, clock, max_age_days=30)
    root = tmp_path / "archive"
    try:
        for seq in range(3):
            archive.record(verdict(seq, "fail", image=noise(seq)))
        clock.advance(20 * DAY)
        for seq in range(3, 6):
            archive.record(verdict(seq, "fail", image=noise(seq)))
        assert archive.wait_idle(30)
        # a picture left without its row in an old day folder (a kill between the two)
        (root / "images" / "2026-01-01" / "orphan.png").write_bytes(b"x" * 100)
        assert archive.enforce_retention()["rows_by_age"] == 0  # nothing is 30 days old yet
        clock.advance(15 * DAY)  # the first three are 35 days old, the others 15
        removed = archive.enforce_retention()
        got = rows(root)
        files = picture_files(root)
        assert metrics.archive_bytes._value.get() == archive.size_on_disk()
    finally:
        archive.stop()
    assert removed["rows_by_age"] == 3 and removed["day_folders"] == 1
    assert [r["id"] for r in got] == ["run1-3", "run1-4", "run1-5"]
    assert not (root / "images" / "2026-01-01").exists()
    assert {f.rsplit("/", 1)[1].split(".")[0] for f in files} == {"run1-3", "run1-4", "run1-5"}


def test_retention_by_size_removes_the_oldest_pictures_first_then_the_oldest_rows(tmp_path):
    # (the picture thread may run a retention pass of its own as the fake clock moves: the
    # assertions are on what is left, whichever pass removed it)
    clock = FakeClock()
    mib = 1024 * 1024
    archive, _ = make_archive(tmp_path, clock, max_bytes=mib, queue_size=100)
    root = tmp_path / "archive"
    budget = mib - archive.wal_limit_bytes
    try:
        for seq in range(8):  # noise does not compress: ~250 KB of pictures each
            clock.advance(1.0)
            archive.record(verdict(seq, "fail", image=noise(seq, 256)))
        assert archive.wait_idle(60)
        assert archive.retained_bytes() > mib
        archive.enforce_retention()
        with_pictures = [r["id"] for r in rows(root, "WHERE pictures IS NOT NULL")]
        assert 0 < len(with_pictures) <= 4
        assert len(rows(root)) == 8  # every row stays
        assert with_pictures == [f"run1-{s}" for s in range(8 - len(with_pictures), 8)]  # the newest
        assert {f.rsplit("/", 1)[1].split(".")[0] for f in picture_files(root)} == set(with_pictures)
        assert archive.retained_bytes() <= budget

        bulky = [{"bbox": [float(i), 2.0, 3.0, 4.0], "status": "matched", "score": 0.1} for i in range(20)]
        for seq in range(100, 2100):  # ~2 MB of rows
            clock.advance(1.0)
            archive.record(_bulky(seq, bulky))
            if seq % 50 == 0:  # (faster than any line: the journal's limit is 128 KiB here)
                assert archive.wait_idle(WAIT_S)
        assert archive.wait_idle(WAIT_S)
        archive.enforce_retention()
        left = [r["id"] for r in rows(root)]
        files = picture_files(root)
        assert archive.retained_bytes() <= budget
        archive.checkpoint()
        archive.record(_bulky(5000, bulky))  # the first write after a checkpoint brings the WAL back to its limit
        assert archive.wait_idle(WAIT_S)
        on_disk = archive.size_on_disk()
    finally:
        archive.stop()
    assert files == set()  # every picture went before any row
    assert left[-1] == "run1-2099" and left == sorted(left, key=lambda i: int(i.split("-")[1]))
    assert "run1-100" not in left and len(left) > 100  # the oldest rows went, not all of them
    assert on_disk <= mib, on_disk
    assert archive.stats()["rows_dropped"] == 0


def _bulky(seq: int, objects: list) -> Verdict:
    v = verdict(seq, "pass")
    v.objects = objects
    return v


# ---------------------------------------------------------------- opening


def test_an_archive_of_an_unknown_schema_version_is_refused_by_name(tmp_path):
    archive, _ = make_archive(tmp_path)
    archive.stop()
    path = tmp_path / "archive" / DATABASE
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(ArchiveError, match=r"archive schema version 99.*knows version 1") as err:
        make_archive(tmp_path)
    assert str(path) in str(err.value)


def test_a_file_that_is_not_an_archive_is_refused_by_name(tmp_path):
    (tmp_path / "archive").mkdir()
    path = tmp_path / "archive" / DATABASE
    path.write_bytes(b"these are not the bytes of an SQLite file" * 100)
    with pytest.raises(ArchiveError, match="not a database") as err:
        make_archive(tmp_path)
    assert str(path) in str(err.value)
    other = tmp_path / "other"
    other.mkdir()
    with sqlite3.connect(other / DATABASE) as conn:
        conn.execute("CREATE TABLE notes (x)")
    with pytest.raises(ArchiveError, match="not a linewatch archive"):
        Archive(ArchiveConfig(enabled=True, path=str(other)), metrics=Metrics()).start()


def test_a_folder_that_cannot_be_created_is_an_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    archive = Archive(ArchiveConfig(enabled=True, path=str(tmp_path / "file" / "archive")), metrics=Metrics())
    with pytest.raises(ArchiveError, match=r"cannot create .*file/archive"):
        archive.start()
    archive.stop()  # a start that failed still stops cleanly
    assert archive.dead_threads() == []


def test_pictures_are_encoded_in_a_low_priority_child_process_replaced_when_it_dies():
    """The encoding (milliseconds of CPU, much of it under the GIL) runs in a process of its own:
    same bytes as encoding here, the lowest CPU priority (SCHED_IDLE), and a killed process
    costs one picture only."""
    encoder = archive_module.PictureEncoder()
    v = verdict(0, "fail", image=noise(0))
    v.heatmap = np.linspace(0, 2, 48 * 64, dtype=np.float32).reshape(48, 64)
    image = v.image
    try:
        assert encoder.encode(image, v, "png", 60) == archive_module.encode_pictures(image, v)
        pid = encoder._pool.submit(os.getpid).result(60)
        assert pid != os.getpid() and os.sched_getscheduler(pid) == os.SCHED_IDLE
        other = archive_module.PictureEncoder(idle=False)  # the tests' own (make_archive)
        try:
            other.encode(image, v, "png", 60)
            assert os.sched_getscheduler(other._pool.submit(os.getpid).result(60)) == os.SCHED_OTHER
        finally:
            other.close()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            encoder.encode(image, v, "png", 60)
        assert encoder.encode(image, v, "png", 60) == archive_module.encode_pictures(image, v)  # a new process
        assert encoder._pool.submit(os.getpid).result(60) != pid
    finally:
        encoder.close()
