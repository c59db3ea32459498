"""`linewatch archive query` / `export` on a small real archive: filters, limits, the CSV and
JSON read back with the csv and json modules, and the one-line errors."""

from __future__ import annotations

import csv
import datetime as dt
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from linewatch.cli import main
from linewatch.config import ArchiveConfig
from linewatch.runtime.sinks.archive import DATABASE, Archive
from linewatch.runtime.ops.metrics import Metrics
from linewatch.wire import Verdict
from tests.runtime.fakes import FakeClock

T0 = dt.datetime(2026, 5, 1, 8, 0, tzinfo=dt.timezone.utc).timestamp()
# (camera, verdict, seconds after T0); ids run1-0, run1-1, ... in this order
PLAN = [("cam0", "pass", 0), ("cam1", "fail", 10), ("cam0", "fail", 20), ("cam0", "error", 30),
        ("cam1", "pass", 40), ("cam0", "pass", 50), ("cam2", "timeout", 60), ("cam0", "fail", 3600)]


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "archive"
    clock = FakeClock(wall=T0)
    archive = Archive(ArchiveConfig(enabled=True, path=str(root)), metrics=Metrics(), clock=clock)
    archive.start()
    image = np.zeros((16, 16, 3), np.uint8)
    try:
        for seq, (camera, value, at) in enumerate(PLAN):
            clock.advance(T0 + at - clock.time())
            judged = value in ("pass", "fail")
            v = Verdict(camera=camera, frame_id=seq, verdict=value, capture_ts=T0 + at - 0.05, part_id=f"p{seq}",
                        score=1.5 if value == "fail" else 0.5 if judged else None, threshold=1.0 if judged else None,
                        objects=[{"bbox": [1, 2, 3, 4], "status": "missing"}] if value == "fail" else [],
                        reason=None if judged else "deadline" if value == "timeout" else "decode_failed",
                        backend="classic", bank_id="b1", run_id="run1", seq=seq,
                        heatmap=np.ones((16, 16), np.float32) if judged else None)
            v.image = image if judged else None
            archive.record(v)
        assert archive.wait_idle(30)
    finally:
        archive.stop()
    return root


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["archive", *args])
    out, err = capsys.readouterr()
    return code, out, err


def ids_of_json_lines(out: str) -> list[str]:
    return [json.loads(line)["id"] for line in out.splitlines()]


def test_query_filters_by_camera_verdict_and_time(archive_dir, capsys):
    code, out, _ = run(capsys, "query", "--archive", str(archive_dir), "--json")
    assert code == 0 and ids_of_json_lines(out) == [f"run1-{i}" for i in range(len(PLAN))]
    _, out, _ = run(capsys, "query", "--archive", str(archive_dir), "--json", "--camera", "cam0", "--camera", "cam2")
    assert ids_of_json_lines(out) == ["run1-0", "run1-2", "run1-3", "run1-5", "run1-6", "run1-7"]
    _, out, _ = run(capsys, "query", "--archive", str(archive_dir), "--json", "--verdict", "fail")
    assert ids_of_json_lines(out) == ["run1-1", "run1-2", "run1-7"]
    # ISO 8601 with a zone, and epoch seconds; --until is exclusive
    _, out, _ = run(capsys, "query", "--archive", str(archive_dir), "--json", "--camera", "cam0",
                    "--since", "2026-05-01T10:00:20+02:00", "--until", str(T0 + 3600))
    assert ids_of_json_lines(out) == ["run1-2", "run1-3", "run1-5"]
    # --limit: the newest, oldest first
    _, out, _ = run(capsys, "query", "--archive", str(archive_dir), "--json", "--limit", "2")
    assert ids_of_json_lines(out) == ["run1-6", "run1-7"]


def test_a_date_time_without_a_zone_is_local_time(archive_dir, capsys, monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30, whatever the machine's zone is
    time.tzset()
    try:
        _, out, _ = run(capsys, "query", "--archive", str(archive_dir), "--json", "--since", "2026-05-01T13:30:45")
    finally:
        monkeypatch.undo()
        time.tzset()
    assert ids_of_json_lines(out) == ["run1-5", "run1-6", "run1-7"]  # 08:00:45 UTC


def test_query_prints_a_table_with_a_line_per_verdict(archive_dir, capsys):
    code, out, _ = run(capsys, "query", "--archive", str(archive_dir), "--verdict", "fail")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4 and lines[0].split()[:3] == ["time", "(local)", "camera"]
    assert "run1-1" in lines[1] and "cam1" in lines[1] and "fail" in lines[1] and "images/2026-05-01/run1-1" in lines[1]
    assert lines[0].split()[7] == "bank_id" and lines[1].split()[6] == "b1"  # which bank judged it (changeover)


def test_export_csv_and_json_read_back(archive_dir, tmp_path, capsys):
    out_csv = tmp_path / "v.csv"
    assert run(capsys, "export", "--archive", str(archive_dir), "--format", "csv", "--out", str(out_csv))[0] == 0
    with out_csv.open(newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["id"] for r in records] == [f"run1-{i}" for i in range(len(PLAN))]
    fail = records[1]
    assert fail["camera"] == "cam1" and fail["verdict"] == "fail" and float(fail["score"]) == 1.5
    assert float(fail["verdict_ts"]) == T0 + 10 and fail["time"] == "2026-05-01T08:00:10.000+00:00"
    assert json.loads(fail["objects"]) == [{"bbox": [1, 2, 3, 4], "status": "missing"}]
    assert fail["pictures"] == "images/2026-05-01/run1-1"
    assert (archive_dir / (fail["pictures"] + ".png")).is_file()
    assert records[3]["reason"] == "decode_failed" and records[3]["score"] == "" and records[3]["pictures"] == ""

    code, out, _ = run(capsys, "export", "--archive", str(archive_dir), "--format", "json", "--camera", "cam1")
    data = json.loads(out)
    assert code == 0 and [r["id"] for r in data] == ["run1-1", "run1-4"]
    assert data[0]["objects"] == [{"bbox": [1, 2, 3, 4], "status": "missing"}] and data[0]["threshold"] == 1.0
    assert data[1]["pictures"] is None  # a pass: no pictures (pass_image_sample 0)

    _, out, _ = run(capsys, "export", "--archive", str(archive_dir), "--format", "json", "--verdict", "shed")
    assert json.loads(out) == []


def test_pictures_that_are_gone_are_not_reported(archive_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(archive_dir, copy)
    (copy / "images" / "2026-05-01" / "run1-2.png").unlink()  # retention, or a kill before it was written
    # a frame kept as BMP (runtime.archive.frame_format: bmp) counts as the frame too
    (copy / "images" / "2026-05-01" / "run1-7.png").rename(copy / "images" / "2026-05-01" / "run1-7.bmp")
    _, out, _ = run(capsys, "export", "--archive", str(copy), "--format", "json", "--verdict", "fail")
    assert [r["pictures"] for r in json.loads(out)] == ["images/2026-05-01/run1-1", None, "images/2026-05-01/run1-7"]


def test_the_archive_can_come_from_the_config(archive_dir, tmp_path, capsys):
    config = tmp_path / "lw.yaml"
    config.write_text(yaml.safe_dump({"runtime": {"archive": {"enabled": True, "path": str(archive_dir)}}}))
    code, out, _ = run(capsys, "query", "-c", str(config), "--json", "--verdict", "timeout")
    assert code == 0 and ids_of_json_lines(out) == ["run1-6"]


@pytest.mark.parametrize("args, message", [
    (["--since", "2026-13-45"], "--since '2026-13-45': not an ISO 8601 date-time"),
    (["--until", "yesterday"], "--until 'yesterday': not an ISO 8601 date-time"),
])
def test_a_bad_date_is_one_line_of_error(archive_dir, capsys, args, message):
    code, out, err = run(capsys, "query", "--archive", str(archive_dir), *args)
    assert code == 2 and out == "", out
    assert err.startswith(f"linewatch: error: {message}") and len(err.splitlines()) == 1, err


def test_a_missing_or_foreign_archive_is_one_line_of_error(tmp_path, capsys):
    code, _, err = run(capsys, "export", "--archive", str(tmp_path / "nothing"))
    assert code == 2 and err == f"linewatch: error: {tmp_path / 'nothing'}: no verdict archive here " \
                                f"({DATABASE} not found)\n"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / DATABASE).write_bytes(b"not sqlite at all" * 64)
    code, _, err = run(capsys, "query", "--archive", str(tmp_path / "junk"))
    assert code == 2 and err.startswith("linewatch: error: ") and "not a linewatch archive" in err
    assert len(err.splitlines()) == 1
    (tmp_path / "newer").mkdir()
    with sqlite3.connect(tmp_path / "newer" / DATABASE) as conn:
        conn.executescript("CREATE TABLE verdicts (id TEXT); PRAGMA user_version = 7;")
    code, _, err = run(capsys, "query", "--archive", str(tmp_path / "newer"))
    assert code == 2 and "archive schema version 7" in err and len(err.splitlines()) == 1


@pytest.mark.system
def test_the_command_runs_as_a_process_and_reads_without_writing(archive_dir):
    database = archive_dir / "verdicts.sqlite"
    before = sorted(p.name for p in archive_dir.iterdir())
    content, mtime = database.read_bytes(), database.stat().st_mtime_ns
    res = subprocess.run([sys.executable, "-m", "linewatch.cli", "archive", "query", "--archive", str(archive_dir),
                          "--camera", "cam2"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "run1-6" in res.stdout and "timeout" in res.stdout and "deadline" in res.stdout
    assert database.read_bytes() == content and database.stat().st_mtime_ns == mtime
    # SQLite's reader of a WAL database makes the -wal and -shm files when no writer left them; the
    # -wal stays empty: nothing was written
    new = sorted(set(p.name for p in archive_dir.iterdir()) - set(before))
    assert set(new) <= {"verdicts.sqlite-wal", "verdicts.sqlite-shm"}, new
    wal = archive_dir / "verdicts.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0
