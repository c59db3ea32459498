"""The GenICam source (`aravis:`): its pure parts by hand, then against Aravis's fake GigE Vision
camera on loopback (`arv-fake-gv-camera-0.8`, Debian's aravis-tools; tests/ops/install-tools.sh
installs it with the bindings), including the camera killed and started again mid-stream.

The fake camera answers on the fixed GigE Vision control port (3956): tests/gige.py's
FakeGigECamera holds a machine-wide lock while one runs, so the tests that start one (here and in
tests/test_line_gige.py) take turns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from linewatch import wire
from linewatch.runtime.transport.camera.aravis import (
    aravis_bindings_problem, next_frame_id, to_image,
)
from linewatch.runtime.transport.camera.base import SourceError, SourceLost
from tests.gige import FAKE, FAKE_ID, FakeGigECamera
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 60.0


# ---------------------------------------------------------------- by hand


def test_frame_id_steps_count_the_lost_frames_and_wrap_like_gige_vision() -> None:
    assert next_frame_id(7, 8) == 1
    assert next_frame_id(7, 10) == 3  # 8 and 9 lost
    assert next_frame_id(65535, 1) == 1  # 16-bit ids skip 0 when they wrap
    assert next_frame_id(65534, 2) == 3  # 65535 and 1 lost
    assert next_frame_id(70000, 5) == 1  # a 64-bit id going back: the camera restarted
    assert next_frame_id(40, 3) == 1  # far from the top: a restart, not 65497 frames lost


def test_pixels_of_each_format() -> None:
    mono = np.arange(12, dtype=np.uint8).reshape(3, 4)
    image, fmt = to_image(mono.tobytes(), 4, 3, 0x01080001)
    assert fmt == "gray" and np.array_equal(image, mono)
    deep = (np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4)
    image, fmt = to_image(deep.astype("<u2").tobytes(), 4, 3, 0x01100007)
    assert fmt == "gray" and image.dtype == np.uint16 and np.array_equal(image, deep)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    assert [(np.array_equal(i, rgb), f) for i, f in [to_image(rgb.tobytes(), 4, 3, 0x02180014)]] == [(True, "rgb")]
    assert to_image(rgb.tobytes(), 4, 3, 0x02180015)[1] == "bgr"


@pytest.mark.parametrize("code, pattern", [(0x01080009, "RGGB"), (0x0108000A, "GBRG"), (0x01080008, "GRBG"),
                                           (0x0108000B, "BGGR")])
def test_bayer_patterns_come_out_in_their_colour(code: int, pattern: str) -> None:
    """A flat orange scene (R 200, G 100, B 20) seen through each PFNC Bayer pattern (the first
    two rows' colours, left to right) demosaics to that orange."""
    value = {"R": 200, "G": 100, "B": 20}
    tile = np.array([[value[pattern[0]], value[pattern[1]]], [value[pattern[2]], value[pattern[3]]]], np.uint8)
    mosaic = np.tile(tile, (8, 8))
    image, fmt = to_image(mosaic.tobytes(), 16, 16, code)
    assert fmt == "bgr"
    assert tuple(int(c) for c in image[8, 8]) == (20, 100, 200)  # B, G, R inside the image


def test_an_unknown_format_and_a_short_buffer() -> None:
    with pytest.raises(SourceError, match="0x0110000c is not one linewatch converts"):
        to_image(b"\0" * 32, 4, 4, 0x0110000C)
    with pytest.raises(SourceLost, match="needs 16"):
        to_image(b"\0" * 15, 4, 4, 0x01080001)


# ---------------------------------------------------------------- the fake GigE Vision camera

needs_bindings = pytest.mark.skipif(aravis_bindings_problem() is not None, reason=f"Aravis 0.8's bindings: "
                                    f"{aravis_bindings_problem()} (tests/ops/install-tools.sh)")
needs_fake = pytest.mark.skipif(FAKE is None, reason="no arv-fake-gv-camera-0.8 (Debian's aravis-tools; "
                                "tests/ops/install-tools.sh)")


@pytest.fixture
def fake_camera():
    with FakeGigECamera() as camera:  # holds the camera port's lock (tests/gige.py)
        yield camera


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "linewatch.cli", *args], env=env, cwd=REPO, **kwargs)


def _grab(*args: str, timeout_s: float = 120) -> tuple[int, str]:
    """`linewatch camera grab ARGS`: its exit code and its output (stdout and stderr)."""
    proc = _cli("camera", "grab", *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=timeout_s)
    return proc.returncode, out


def _opened(out: str) -> list[dict]:
    """The `camera_genicam_opened` log records in a command's output."""
    return [json.loads(line) for line in out.splitlines() if '"camera_genicam_opened"' in line]


@pytest.mark.system
@needs_bindings
@needs_fake
@pytest.mark.usefixtures("fake_camera")
def test_grab_from_the_fake_gige_camera(tmp_path: Path) -> None:
    started = time.time()
    rc, out = _grab("--source", f"aravis:{FAKE_ID}", "--frames", "5", "--out", str(tmp_path / "out"))
    assert rc == 0, out
    record = json.loads((tmp_path / "out" / "grab.json").read_text())
    frames = record["frames"] if isinstance(record, dict) else record
    assert len(frames) == 5, record
    ids = [f["frame_id"] for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == 5, ids
    assert all(started - 5 < f["capture_ts"] < time.time() + 5 for f in frames), frames  # the camera's clock, mapped
    image = cv2.imread(str(tmp_path / "out" / frames[0]["file"]), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.shape[:2] == (512, 512), None if image is None else image.shape
    assert all(f["part_id"] is None for f in frames)  # no part id unless aravis.part_id says where from

    # a device id no camera has: one line naming what Aravis does see, exit 2
    rc, out = _grab("--source", "aravis:Nope-123", "--frames", "1", "--out", str(tmp_path / "nope"))
    assert rc == 2, out
    assert out.strip() == (f"linewatch: error: cannot open aravis:Nope-123: no GenICam camera 'Nope-123' found; "
                           f"cameras seen: ['{FAKE_ID}']"), out


@pytest.mark.system
@needs_bindings
@needs_fake
@pytest.mark.usefixtures("fake_camera")
def test_the_region_packet_size_and_part_id_from_the_config(tmp_path: Path) -> None:
    config = tmp_path / "camera.yaml"
    config.write_text("aravis:\n  width: 320\n  height: 200\n  packet_size: 4000\n  part_id: frame_counter\n")
    rc, out = _grab("-c", str(config), "--source", f"aravis:{FAKE_ID}", "--frames", "3", "--out", str(tmp_path / "out"))
    assert rc == 0, out
    frames = json.loads((tmp_path / "out" / "grab.json").read_text())["frames"]
    assert [(f["width"], f["height"]) for f in frames] == [(320, 200)] * 3, frames
    image = cv2.imread(str(tmp_path / "out" / frames[1]["file"]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (200, 320), image.shape
    opened = _opened(out)
    assert opened and opened[0]["packet_size"] == 4000 and opened[0]["region"] == [0, 0, 320, 200], out
    # the camera's own counter: it moves as the frame ids sent move (by the frames lost between)
    counters = [int(f["part_id"]) for f in frames]
    assert [next_frame_id(a, b) for a, b in zip(counters, counters[1:])] == \
        [b["frame_id"] - a["frame_id"] for a, b in zip(frames, frames[1:])], frames


@pytest.mark.system
@needs_bindings
@needs_fake
@pytest.mark.usefixtures("fake_camera")
def test_software_trigger_one_frame_per_trigger_and_a_line_trigger_waits_for_its_edge(tmp_path: Path) -> None:
    # in trigger mode the fake camera sends nothing of its own: every frame here answers a trigger
    config = tmp_path / "camera.yaml"
    config.write_text("aravis:\n  trigger: software\n  frame_rate: 20\n  part_id: frame_counter\n")
    rc, out = _grab("-c", str(config), "--source", f"aravis:{FAKE_ID}", "--frames", "4", "--out", str(tmp_path / "out"))
    assert rc == 0, out
    opened = _opened(out)
    assert opened and opened[0]["trigger_source"] == "Software", out  # read back from the camera
    frames = json.loads((tmp_path / "out" / "grab.json").read_text())["frames"]
    assert len(frames) == 4, frames
    ids = [f["frame_id"] for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == 4, ids

    bad = tmp_path / "bad.yaml"
    bad.write_text("aravis:\n  trigger: software\n")
    rc, out = _grab("-c", str(bad), "--source", f"aravis:{FAKE_ID}", "--frames", "1", "--out", str(tmp_path / "bad"),
                    timeout_s=60)
    assert rc == 2 and "trigger: software needs frame_rate" in out, out

    # trigger: line on the fake camera's one input: set, read back, and no frame without an edge
    line_config = tmp_path / "line.yaml"
    line_config.write_text("aravis:\n  trigger: line\n  trigger_line: Line0\n")
    rc, out = _grab("-c", str(line_config), "--source", f"aravis:{FAKE_ID}", "--frames", "1", "--timeout", "1",
                    "--out", str(tmp_path / "line"), timeout_s=60)
    opened = _opened(out)
    assert opened and opened[0]["trigger_source"] == "Line0", out
    assert rc == 1 and "got 0 of 1 frames within 1 s" in out, out


def _read(sub: zmq.Socket) -> wire.Frame:
    return wire.read_frame(sub.recv_multipart(), wire.ImageLimits(), time.time(), time.monotonic(), frozenset())


def _frames(sub: zmq.Socket, n: int, timeout_s: float) -> list[wire.Frame]:
    got, end = [], time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < end:
        if sub.poll(100):
            got.append(_read(sub))
    return got


@pytest.mark.system
@needs_bindings
@needs_fake
def test_a_camera_killed_mid_stream_and_started_again_resumes_without_a_restart(tmp_path: Path, fake_camera) -> None:
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.bind("tcp://127.0.0.1:0")
    log = tmp_path / "camera.log"
    config = tmp_path / "camera.yaml"
    config.write_text("reconnect:\n  initial_s: 0.2\n  max_s: 1.0\naravis:\n  lost_after_s: 1.0\n")
    with log.open("wb") as out:
        bridge = _cli("camera", "-c", str(config), "--source", f"aravis:{FAKE_ID}", "--camera", "gige-1",
                      "--endpoint", sub.getsockopt_string(zmq.LAST_ENDPOINT), "--metrics-port", "0", "--mono-to-rgb",
                      stdout=out, stderr=subprocess.STDOUT)
    try:
        before = _frames(sub, 10, WAIT_S)
        assert len(before) == 10, log.read_text()[-3000:]
        fake_camera.kill()  # pulled out: no goodbye to the host
        assert wait_until(lambda: "camera_source_lost" in log.read_text(), WAIT_S), log.read_text()[-3000:]
        while sub.poll(200):  # what was in flight
            before.append(_read(sub))
        fake_camera.start()
        after = _frames(sub, 10, WAIT_S)
        assert len(after) == 10, log.read_text()[-3000:]
        assert "camera_source_reopened" in log.read_text()
        assert "no frame for 1 s" in log.read_text()  # aravis.lost_after_s
        ids = [f.frame_id for f in before + after]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), ids  # the wire ids go on, never back
        assert all(f.camera == "gige-1" and f.decoded().shape == (512, 512, 3) for f in before[:2] + after[:2])
        bridge.send_signal(signal.SIGTERM)
        assert bridge.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if bridge.poll() is None:
            bridge.kill()
            bridge.wait(10)
        sub.close(0)
        context.term()
