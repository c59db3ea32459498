"""The verdict archive with real SQLite files and real picture files: rows, pictures, sampling,
drops (queue full, a locked database, a closed archive), retention by age and size, schema
versions. Time comes from a fake clock; the picture thread is blocked with an event."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog

from linewatch.config import ArchiveConfig
from linewatch.runtime import archive as archive_module
from linewatch.runtime.archive import (
    DATABASE, FRAME_SUFFIX, HEATMAP_SUFFIX, OVERLAY_SUFFIX, Archive, ArchiveError, open_read_only, picture_sampled,
)
from linewatch.runtime.metrics import Metrics
from linewatch.wire import Verdict
from tests.runtime.fakes import FakeClock

DAY = 86400.0


def make_archive(tmp_path: Path, clock: FakeClock | None = None, **config) -> tuple[Archive, Metrics]:
    metrics = Metrics()
    archive = Archive(ArchiveConfig(enabled=True, path=str(tmp_path / "archive"), **config), metrics=metrics,
                      log=structlog.get_logger("test"), clock=clock or FakeClock())
    archive.start()
    return archive, metrics


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


def test_every_verdict_is_a_committed_row_with_every_field(tmp_path):
    clock = FakeClock(wall=1_790_000_000.0)
    archive, metrics = make_archive(tmp_path, clock)
    try:
        archive.record(verdict(0, "pass"))
        clock.advance(2.5)
        archive.record(Verdict(camera="cam1", frame_id=7, verdict="error", capture_ts=1_700_000_100.0,
                               reason="decode_failed", run_id="run1", seq=1))
        archive.record(verdict(2, "fail"))
        # committed when record returns: another connection (read-only, as the CLI opens it) sees them
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


# ---------------------------------------------------------------- pictures


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # overlay.py colours the NaN pixel
def test_a_failed_part_gets_its_frame_heatmap_and_overlay(tmp_path):
    clock = FakeClock(wall=dt.datetime(2026, 3, 4, 23, 59, 59, tzinfo=dt.timezone.utc).timestamp())
    archive, metrics = make_archive(tmp_path, clock)
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
    frame = cv2.cvtColor(cv2.imread(str(stem) + FRAME_SUFFIX, cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
    assert np.array_equal(frame, image)  # lossless
    back = np.load(str(stem) + HEATMAP_SUFFIX)["heatmap"].astype(np.float32)
    assert back.shape == image.shape[:2] and back[0, 0] == 0.0
    # float16: within 2**-11 relative (plus the float16 spacing near zero)
    np.testing.assert_allclose(back.ravel()[1:], heat.ravel()[1:], rtol=2.0**-11, atol=1e-4)
    overlay = cv2.imread(str(stem) + OVERLAY_SUFFIX)
    assert overlay is not None and overlay.shape == image.shape
    assert picture_files(tmp_path / "archive") == {f"{row['pictures']}{s}" for s in (FRAME_SUFFIX, HEATMAP_SUFFIX,
                                                                                      OVERLAY_SUFFIX)}
    assert archive.stats()["pictures"] == 1 and dropped(metrics, "archive_image", "queue_full") == 0
    assert metrics.archive_bytes._value.get() > 0


def test_passes_get_pictures_by_a_deterministic_sample_of_their_ids(tmp_path):
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
                                                              for s in (FRAME_SUFFIX, HEATMAP_SUFFIX, OVERLAY_SUFFIX)}
    assert kept["none"] == set() and len(kept["all"]) == 300
    assert 60 <= len(kept["some"]) <= 120, len(kept["some"])  # 30 % of 300, give or take
    assert kept["some"] == kept["some_again"]  # the same verdicts every time
    assert kept["some"] == {f"run1-{s}" for s in range(300) if picture_sampled(f"run1-{s}", 0.3)}


def test_a_full_picture_queue_drops_the_picture_and_counts_it_never_the_row(tmp_path, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real_overlay = archive_module.overlay_jpeg

    def blocked_overlay(image, v, quality=90):
        entered.set()
        assert release.wait(60), "the test never released the picture thread"
        return real_overlay(image, v, quality=quality)

    monkeypatch.setattr(archive_module, "overlay_jpeg", blocked_overlay)
    archive, metrics = make_archive(tmp_path, queue_size=2)
    try:
        record(archive, verdict(0, "fail", image=noise(0)))
        assert entered.wait(30)  # the picture thread holds #0: the queue is empty again
        record(archive, verdict(1, "fail", image=noise(1)))
        record(archive, verdict(2, "fail", image=noise(2)))  # the queue is full now
        record(archive, verdict(3, "fail", image=noise(3)))
        assert dropped(metrics, "archive_image", "queue_full") == 1
        got = rows(tmp_path / "archive")  # every row is there while the pictures wait
        assert [r["id"] for r in got] == ["run1-0", "run1-1", "run1-2", "run1-3"]
        assert [r["pictures"] is not None for r in got] == [True, True, True, False]
        release.set()
        assert archive.wait_idle(30)
    finally:
        release.set()
        archive.stop()
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


def test_a_locked_database_costs_the_row_counted_and_record_never_raises(tmp_path):
    archive, metrics = make_archive(tmp_path)
    other = sqlite3.connect(tmp_path / "archive" / DATABASE, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the busy timeout
        archive.record(verdict(0))
        other.execute("ROLLBACK")
        archive.record(verdict(1))
        got = rows(tmp_path / "archive")
    finally:
        other.close()
        archive.stop()
    assert [r["id"] for r in got] == ["run1-1"]
    assert dropped(metrics, "archive_row", "locked") == 1
    assert archive.stats()["rows_dropped"] == 1


def test_record_after_stop_is_counted_not_raised(tmp_path):
    archive, metrics = make_archive(tmp_path)
    archive.stop()
    archive.record(verdict(0, "fail", image=noise(0)))
    assert dropped(metrics, "archive_row", "closed") == 1


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
        archive.enforce_retention()
        left = [r["id"] for r in rows(root)]
        files = picture_files(root)
        assert archive.retained_bytes() <= budget
        archive.checkpoint()
        archive.record(_bulky(5000, bulky))  # the first write after a checkpoint brings the WAL back to its limit
        on_disk = archive.size_on_disk()
    finally:
        archive.stop()
    assert files == set()  # every picture went before any row
    assert left[-1] == "run1-2099" and left == sorted(left, key=lambda i: int(i.split("-")[1]))
    assert "run1-100" not in left and len(left) > 100  # the oldest rows went, not all of them
    assert on_disk <= mib, on_disk


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
