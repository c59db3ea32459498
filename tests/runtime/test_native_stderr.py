"""NativeStderr: what native libraries write to descriptor 2 becomes rate-limited log events.

The descriptor-level tests run tests/runtime/native_stderr_child.py in a process of its own and
read its stderr: a corrupt PNG decoded by OpenCV gives JSON events and no raw libpng line,
identical lines inside one window give one event and a count, the reader's failure falls back
to raw stderr without blocking. The unit tests feed lines without touching any descriptor.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch.config import LoggingConfig, RuntimeConfig
from linewatch.runtime.daemon import Daemon
from linewatch.runtime.ops.logs import RateLimiter
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.ops.native_stderr import EVENT, HELD_BACK_EVENT, LineSplitter, NativeStderr, guess_library
from tests.runtime.fakes import FakeProcessor, quiet_log
from tests.runtime.line import runtime_config
from tests.runtime.native_stderr_child import REPEATS, corrupt_png
from tests.waiting import wait_until

CHILD = Path(__file__).with_name("native_stderr_child.py")


def run_child(scenario: str) -> tuple[dict, list[str]]:
    """The child's report (its stdout) and its stderr lines."""
    out = subprocess.run([sys.executable, str(CHILD), scenario], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.splitlines()[-1]), out.stderr.splitlines()


def events(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines if line.startswith("{")]


# ---------------------------------------------------------------------------- a real process


@pytest.mark.system
def test_a_corrupt_png_gives_log_events_not_raw_lines_and_identical_ones_are_rate_limited():
    report, lines = run_child("corrupt_png")
    assert report["started"] and not report["capturing"] and report["stderr_is_original"]
    assert report["counts"]["libpng"] == REPEATS + 2  # the counter has every line
    assert not [line for line in lines if "libpng error" in line and not line.startswith("{")], lines
    native = [e for e in events(lines) if e["event"] == EVENT]
    # REPEATS at clock 0: one event; the next after the 10 s window says how many were held back
    assert [(e["library"], e["message"], e["not_logged_since_last"]) for e in native] == [
        ("libpng", "libpng error: IHDR: CRC error", 0), ("libpng", "libpng error: IHDR: CRC error", REPEATS - 1)]
    assert all(e["logger"] == "linewatch.native" and e["level"] == "warning" for e in native)
    # the one held back after that is counted at stop
    held = [e for e in events(lines) if e["event"] == HELD_BACK_EVENT]
    assert [(e["library"], e["not_logged_since_last"]) for e in held] == [("libpng", 1)]
    # Python's own log and sys.stderr go out as they are, not through the capture
    assert [e["n"] for e in events(lines) if e["event"] == "python_log_line"] == [1]
    assert "python sys.stderr works" in lines and report["counts"]["unknown"] == 0
    assert lines[-1] == "raw after stop"  # descriptor 2 restored


@pytest.mark.system
def test_long_lines_are_cut_binary_bytes_replaced_and_the_last_line_flushed_at_stop():
    report, lines = run_child("lines")
    native = {e["library"]: e for e in events(lines) if e["event"] == EVENT and not e["message"].startswith("last")}
    assert native["unknown"]["message"] == "x" * 2048 + " [cut]"
    assert native["libjpeg"]["message"] == "Corrupt JPEG data: \ufffd\ufffd bad \ufffd bytes"
    assert native["opencv"]["message"].startswith("[ WARN:0@0.1] global loadsave.cpp")
    assert [e["message"] for e in events(lines) if e["event"] == EVENT and e["message"].startswith("last")] == [
        "last words, no newline"]
    assert report["counts"] == {"libpng": 0, "libjpeg": 1, "opencv": 1, "unknown": 2}
    assert not [line for line in lines if "x" * 100 in line and not line.startswith("{")]


@pytest.mark.system
def test_when_the_reader_dies_native_writes_reach_stderr_raw_and_never_block():
    report, lines = run_child("reader_dies")
    assert report["failure"] == "RuntimeError('reader broke')" and report["capturing_after_failure"] is False
    failed = [e for e in events(lines) if e["event"] == "native_stderr_capture_failed"]
    assert len(failed) == 1 and failed[0]["level"] == "error"
    # 200 kB written after the failure (more than a pipe holds) came out raw, and the log lives on
    assert any(line.startswith("raw after failure ") and len(line) > 200_000 for line in lines)
    assert [e["event"] for e in events(lines)][-1] == "still_logging"
    assert lines[-1] == "raw after stop"


# ---------------------------------------------------------------------------- the daemon


def test_the_daemon_captures_while_it_runs_and_restores_stderr_when_it_stops():
    before = os.fstat(2)
    stderr_before = sys.stderr
    buf = io.StringIO()
    daemon = Daemon(runtime_config(), FakeProcessor([("pre", 0.0)]), log=quiet_log(buf))
    daemon.start()
    try:
        assert daemon.native_stderr.capturing
        assert cv2.imdecode(np.frombuffer(corrupt_png(), np.uint8), cv2.IMREAD_COLOR) is None
        seen = wait_until(lambda: daemon.metrics.registry.get_sample_value(
            "linewatch_native_messages_total", {"library": "libpng"}), 30.0, poll_s=0.01)
        assert seen == 1
    finally:
        daemon.stop()
    assert not daemon.native_stderr.capturing and sys.stderr is stderr_before
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    logged = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [(e["library"], e["message"]) for e in logged if e["event"] == EVENT] == [
        ("libpng", "libpng error: IHDR: CRC error")]


def test_the_daemon_leaves_stderr_alone_when_the_config_says_so():
    config = runtime_config().model_copy(update={"logging": LoggingConfig(capture_native_stderr=False)})
    daemon = Daemon(config, FakeProcessor([("pre", 0.0)]), log=quiet_log())
    daemon.start()
    try:
        assert not daemon.native_stderr.capturing
    finally:
        daemon.stop()
    assert RuntimeConfig().logging.capture_native_stderr is True


# ---------------------------------------------------------------------------- lines, no descriptors


@pytest.mark.parametrize("line, library", [
    ("libpng error: IHDR: CRC error", "libpng"),
    ("libpng warning: iCCP: known incorrect sRGB profile", "libpng"),
    ("Corrupt JPEG data: bad Huffman code", "libjpeg"),
    ("Premature end of JPEG file", "libjpeg"),
    ("Not a JPEG file: starts with 0x89 0x50", "libjpeg"),
    ("Huffman table 0x01 was not defined", "libjpeg"),
    ("[ WARN:0@12.345] global loadsave.cpp:1068 imdecode_ ... frame.jpg", "opencv"),
    ("OpenCV(4.10.0) /io/opencv/modules/imgcodecs/src/loadsave.cpp:798: error: (-215:Assertion failed)", "opencv"),
    ("terminate called after throwing an instance of 'c10::Error'", "unknown"),
])
def test_the_library_is_guessed_from_the_line(line, library):
    assert guess_library(line) == library


def test_lines_split_cut_and_decoded():
    s = LineSplitter(max_bytes=8)
    assert s.feed(b"ab") == []
    assert s.feed(b"c\r\n\n  \nlonger than eight\nok\xff") == ["abc", "longer t [cut]"]
    assert s.flush() == ["ok\ufffd"] and s.flush() == []


def test_one_event_per_library_per_window_with_the_count_held_back():
    now = [0.0]
    buf = io.StringIO()
    metrics = Metrics()
    capture = NativeStderr(quiet_log(buf), metrics, clock=lambda: now[0])  # never started: no descriptor touched
    for _ in range(4):
        capture.handle_line("libpng error: IHDR: CRC error")
    capture.handle_line("Corrupt JPEG data: bad Huffman code")  # another library: its own window
    now[0] = 9.9
    capture.handle_line("libpng error: IHDR: CRC error")
    now[0] = 10.0
    capture.handle_line("libpng error: IDAT: CRC error")
    logged = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [(e["library"], e["message"], e["not_logged_since_last"]) for e in logged] == [
        ("libpng", "libpng error: IHDR: CRC error", 0), ("libjpeg", "Corrupt JPEG data: bad Huffman code", 0),
        ("libpng", "libpng error: IDAT: CRC error", 4)]
    assert metrics.registry.get_sample_value("linewatch_native_messages_total", {"library": "libpng"}) == 6
    capture.stop()  # never started: nothing to do, nothing logged
    assert len(buf.getvalue().splitlines()) == 3


def test_rate_limiter_hands_over_what_it_held_back():
    limiter = RateLimiter(10.0)
    assert limiter.allow("a", 0.0) == 0
    assert limiter.allow("a", 1.0) is None and limiter.allow("a", 2.0) is None
    assert limiter.take_held_back() == {"a": 2}
    assert limiter.take_held_back() == {} and limiter.allow("a", 10.0) == 0


def test_disabled_capture_does_not_start():
    assert NativeStderr(quiet_log(), enabled=False).start() is False
