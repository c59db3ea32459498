"""The process tests/runtime/test_native_stderr.py starts: captures its own descriptor 2 with
NativeStderr, makes native code write there, and prints what it saw as one JSON object on
stdout. Its stderr is what the test reads. Run as a script file (never from stdin).

    python tests/runtime/native_stderr_child.py corrupt_png|lines|reader_dies
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from linewatch.config import LoggingConfig  # noqa: E402
from linewatch.runtime.ops.logs import configure_logging  # noqa: E402
from linewatch.runtime.ops.metrics import Metrics  # noqa: E402
from linewatch.runtime.ops.native_stderr import NativeStderr  # noqa: E402

WAIT_S = 30.0
REPEATS = 5  # identical messages inside one rate-limit window


def corrupt_png() -> bytes:
    """A small PNG whose IHDR chunk fails its CRC (libpng: `libpng error: IHDR: CRC error`)."""
    ok, png = cv2.imencode(".png", np.full((16, 16, 3), 128, np.uint8))
    assert ok
    data = bytearray(png.tobytes())
    data[8 + 8 + 13] ^= 0xFF  # signature, IHDR length + type, 13 data bytes: the CRC's first byte
    return bytes(data)


def wait_for(condition, what: str) -> None:
    """Poll `condition` until it holds; exit 3 (with `what`) if it does not within WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            print(json.dumps({"timed_out": what}), flush=True)
            sys.exit(3)
        time.sleep(0.01)


def main(scenario: str) -> None:
    log = configure_logging(LoggingConfig(format="json", level="INFO"))
    metrics = Metrics()
    now = [0.0]
    capture = NativeStderr(log, metrics, clock=lambda: now[0])
    native = lambda lib: metrics.registry.get_sample_value("linewatch_native_messages_total",  # noqa: E731
                                                           {"library": lib}) or 0
    report: dict = {"started": capture.start()}
    if scenario == "corrupt_png":
        data = np.frombuffer(corrupt_png(), np.uint8)
        for _ in range(REPEATS):  # all at clock 0: one event, the rest held back
            assert cv2.imdecode(data, cv2.IMREAD_COLOR) is None
        wait_for(lambda: native("libpng") == REPEATS, "first libpng lines")
        now[0] = 10.0  # the window is over: the next one is logged with the count held back
        assert cv2.imdecode(data, cv2.IMREAD_COLOR) is None
        wait_for(lambda: native("libpng") == REPEATS + 1, "libpng line after the window")
        assert cv2.imdecode(data, cv2.IMREAD_COLOR) is None  # held back again: reported at stop
        wait_for(lambda: native("libpng") == REPEATS + 2, "libpng line held back at stop")
        log.info("python_log_line", n=1)
        print("python sys.stderr works", file=sys.stderr)
    elif scenario == "lines":
        os.write(2, b"x" * 10000 + b"\n")
        os.write(2, b"Corrupt JPEG data: \xff\xfe bad \x80 bytes\r\n")
        os.write(2, b"[ WARN:0@0.1] global loadsave.cpp (1) imdecode_ something\n")
        wait_for(lambda: capture.lines == 3, "three lines")
        now[0] = 100.0  # a new window for "unknown": the line without a newline is logged too
        os.write(2, b"last words, no newline")
    elif scenario == "reader_dies":
        def broken_feed(data: bytes) -> list[str]:
            raise RuntimeError("reader broke")
        capture._splitter.feed = broken_feed  # the reader's loop itself fails, outside the per-line guard
        os.write(2, b"first native line\n")
        wait_for(lambda: not capture.thread.is_alive(), "the reader thread to end")
        report["capturing_after_failure"] = capture.capturing
        # more than a pipe holds: would block for ever on the pipe nobody reads
        os.write(2, b"raw after failure " + b"y" * 200_000 + b"\n")
        log.info("still_logging")
    capture.stop()
    os.write(2, b"raw after stop\n")  # descriptor 2 is the original stderr again
    report.update(capturing=capture.capturing, failure=capture.failure, stderr_is_original=sys.stderr is sys.__stderr__,
                  counts={lib: native(lib) for lib in ("libpng", "libjpeg", "opencv", "unknown")})
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
