"""`linewatch camera` -> `linewatch serve` -> verdicts, on loopback: every file dropped into the
hot folder ends in exactly one verdict, with its part id from the file name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from tests.serving import Served, of, sim_images
from tests.waiting import wait_until

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[1]


def test_hot_folder_through_the_daemon_gives_one_verdict_per_file(tmp_path: Path, small_bank: Path) -> None:
    hot = tmp_path / "hot"
    hot.mkdir()
    served = Served(tmp_path, small_bank)
    camera = None
    camera_log = (tmp_path / "camera.log").open("wb")
    try:
        served.wait_ready()
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        config = tmp_path / "camera.yaml"
        config.write_text("folder:\n  part_id_regex: 'part-(\\d+)'\n  poll_interval_s: 0.05\n")
        camera = subprocess.Popen(
            [sys.executable, "-m", "linewatch.cli", "camera", "-c", str(config), "--source", f"folder://{hot}",
             "--camera", "press-1", "--endpoint", served.ingest_url, "--metrics-port", "0", "--encoding", "png"],
            stdout=camera_log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        images = sim_images(4, seed=21)
        for i, rgb in enumerate(images):  # written under a dot-name, then renamed: never read half-written
            cv2.imwrite(str(hot / f".part-{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            os.rename(hot / f".part-{i}.png", hot / f"part-{i}.png")
        verdicts = served.recv(lambda vs: len(of(vs, "press-1")) >= 4, 120.0)
        mine = of(verdicts, "press-1")
        assert sorted(v.frame_id for v in mine) == [0, 1, 2, 3], [(v.frame_id, v.verdict, v.reason) for v in mine]
        assert {v.verdict for v in mine} <= {"pass", "fail"}, [(v.verdict, v.reason) for v in mine]
        assert sorted(v.part_id for v in mine) == ["0", "1", "2", "3"]  # from the file names
        assert wait_until(lambda: len(list((hot / "done").glob("*.png"))) == 4, 30.0)
        camera.send_signal(signal.SIGTERM)
        assert camera.wait(30) == 0, (tmp_path / "camera.log").read_text()[-3000:]
    finally:
        camera_log.close()
        if camera is not None and camera.poll() is None:
            camera.kill()
            camera.wait(10)
        assert served.stop() == 0, served.log()
