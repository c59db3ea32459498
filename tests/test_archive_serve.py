"""The archive in a real `linewatch serve`: kill -9 mid-stream loses no published verdict from
it, and a restarted daemon opens the same archive and appends to it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.serving import DETECTOR, Served, of, sim_images
from tests.waiting import wait_until

pytestmark = pytest.mark.system  # every test here starts a program


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (not zombies)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            running.append(pid)
    return running


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return f"{pid} (gone)"


def archived(folder: Path) -> list[dict]:
    """Every verdict in the archive, through `linewatch archive export` (read-only, beside a running daemon)."""
    res = subprocess.run([sys.executable, "-m", "linewatch.cli", "archive", "export", "--archive", str(folder),
                          "--format", "json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_kill_9_mid_stream_keeps_every_published_verdict_and_a_restart_appends(small_bank, tmp_path):
    folder = tmp_path / "archive"
    runtime = {"archive": {"enabled": True, "path": str(folder)}}
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    images = sim_images(4, seed=7)  # every other one has a part missing: failed parts with pictures

    served = Served(tmp_path / "first", small_bank, deadline_ms=10_000.0, runtime=runtime)
    try:
        served.wait_ready()
        served.warm_up("warm", lambda: served.cam.send_multipart([b"warm", b"not json", b""]))
        sent = 0
        end = time.monotonic() + 120
        # frames keep coming until the kill, faster than the detector judges them: some are in flight then
        while len(of(served.verdicts, "cam0")) < 10 and time.monotonic() < end:
            for _ in range(4):
                served.send_frame("cam0", sent, images[sent % 4], encoding="raw")
                sent += 1
            served.recv(lambda vs: False, 0.02)
        assert len(of(served.verdicts, "cam0")) >= 10, served.log()
        children = children_of(served.proc.pid)
        assert children, "the daemon has no picture encoder process (or resource tracker)"
        for _ in range(8):  # a burst right before the kill: the detector cannot have judged it all
            served.send_frame("cam0", sent, images[sent % 4], encoding="raw")
            sent += 1
        served.proc.send_signal(signal.SIGKILL)
        assert served.proc.wait(30) == -signal.SIGKILL
        received = served.drain_after_exit()  # and whatever was already on its way to us
    finally:
        served.stop()
    # the daemon's helper processes (picture encoder, multiprocessing's resource tracker) do not
    # outlive it: left behind, every crash of a daemon run outside systemd would add two
    assert wait_until(lambda: not alive(children), 60), \
        f"still running after the daemon was killed: {[cmdline(p) for p in alive(children)]}"
    assert len(of(received, "cam0")) < sent  # killed mid-stream: frames were still unanswered
    first_run = {v.run_id for v in received}
    assert len(first_run) == 1

    again = Served(tmp_path / "second", small_bank, runtime=runtime)
    try:
        again.wait_ready()  # it opened the archive the killed daemon left
        rows = archived(folder)  # read while the new daemon writes
        ids = {r["id"] for r in rows}
        missing = [v.id for v in received if v.id not in ids]
        assert not missing, f"published before the kill but not in the archive: {missing}"
        by_id = {r["id"]: r for r in rows}
        for v in of(received, "cam0"):
            r = by_id[v.id]
            assert (r["camera"], r["frame_id"], r["verdict"], r["part_id"]) == (v.camera, v.frame_id, v.verdict,
                                                                                v.part_id)

        again.warm_up("warm2", lambda: again.cam.send_multipart([b"warm2", b"not json", b""]))
        for i in range(4):
            again.send_frame("cam1", i, images[i], encoding="raw")
        assert again.recv(lambda vs: len(of(vs, "cam1")) >= 4, 120) and len(of(again.verdicts, "cam1")) == 4
        # the picture encoder runs at SCHED_IDLE: on a busy machine it may still be writing them
        failed = [v.id for v in of(again.verdicts, "cam1") if v.verdict == "fail"]
        assert wait_until(lambda: all(any(folder.rglob(f"{id_}.png")) for id_ in failed), 120), failed
    finally:
        rc = again.stop()
    assert rc == 0, again.log()
    rows = archived(folder)
    new = [r for r in rows if r["camera"] == "cam1"]
    assert [r["id"] for r in new] == [v.id for v in of(again.verdicts, "cam1")]
    assert {r["run_id"] for r in new}.isdisjoint(first_run)  # a new run, appended
    assert {r["id"] for r in rows} >= {v.id for v in received}  # the first run's rows are still there
    fails = [r for r in new if r["verdict"] == "fail"]
    assert fails and all(r["pictures"] and (folder / (r["pictures"] + ".png")).is_file() for r in fails)


def test_an_archive_folder_that_cannot_be_made_stops_the_start_with_one_line(small_bank, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "detector": DETECTOR, "bank": {"path": str(small_bank)},
        "runtime": {"ingest": {"endpoints": [{"url": "tcp://127.0.0.1:0"}]}, "publish": {"url": "tcp://127.0.0.1:0"},
                    "metrics": {"port": 0},
                    "archive": {"enabled": True, "path": str(tmp_path / "a-file" / "archive")}},
    }))
    res = subprocess.run([sys.executable, "-m", "linewatch.cli", "serve", "-c", str(config)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.splitlines() == [f"linewatch: error: runtime.archive.path: cannot create "
                                       f"{tmp_path / 'a-file' / 'archive'}: Not a directory"], res.stderr
