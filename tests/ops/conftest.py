"""Fixtures of the ops tests.

`live_daemon`: a real `linewatch serve` subprocess (weights-free classic backend, a small
bank built from synthetic good images, loopback ports it binds itself: port 0, read back from
its log, as tests/serving.py does; its verdicts go to a SUB socket bound here) that has already
answered a few frames -- good ones and one undecodable one -- so every series the dashboards
and alerts query (verdict counters, the latency histogram, error counters) has samples.
One daemon serves the whole session; it gets SIGTERM at the end and must exit 0.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.serving import DETECTOR, PRODUCT, SIZE, bound_ports
from tests.waiting import wait_until

START_TIMEOUT_S = 120.0


@dataclass
class LiveDaemon:
    url: str  # http://127.0.0.1:PORT
    host: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _wait_started(proc: subprocess.Popen, log_path: Path) -> tuple[list[str], int]:
    """The ingest endpoints and the /metrics port the daemon bound, from its `started` log line."""
    def started() -> tuple[list[str], int] | None:
        if proc.poll() is not None:
            pytest.fail(f"linewatch serve exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
        return bound_ports(log_path.read_text(errors="replace"))

    ports = wait_until(started, START_TIMEOUT_S, poll_s=0.1)
    if not ports:
        pytest.fail(f"linewatch serve logged no `started` within {START_TIMEOUT_S} s:\n"
                    f"{log_path.read_text(errors='replace')[-4000:]}")
    return ports


def _wait_ready(daemon: LiveDaemon) -> None:
    def ready() -> bool:
        if daemon.proc.poll() is not None:
            pytest.fail(f"linewatch serve exited with {daemon.proc.returncode}:\n{daemon.log()}")
        try:
            return daemon.get("/readyz", timeout=1)[0] == 200
        except OSError:
            return False

    if not wait_until(ready, START_TIMEOUT_S, poll_s=0.2):
        pytest.fail(f"linewatch serve not ready within {START_TIMEOUT_S} s:\n{daemon.log()}")


def _feed_frames(ctx, sub, ingest_url: str, daemon: LiveDaemon) -> None:
    """Send one undecodable frame (until its `error` verdict proves the sockets are joined),
    then three rendered frames, and wait for their verdicts (on `sub`, where the daemon's
    publisher connects)."""
    import numpy as np
    import zmq

    from linewatch import wire
    from linewatch.sim import render

    cam = ctx.socket(zmq.PUB)
    cam.setsockopt(zmq.LINGER, 0)
    cam.connect(ingest_url)
    seen: list = []

    def wait_for(pred, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if pred():
                return True
            if sub.poll(100):
                seen.append(wire.decode_verdict(sub.recv_multipart()))
        return pred()

    try:
        end = time.monotonic() + 30
        while not any(v.verdict == "error" for v in seen):
            if time.monotonic() > end:
                pytest.fail(f"no verdict for a warm-up frame within 30 s:\n{daemon.log()}")
            cam.send_multipart([b"cam0", b"not json", b""])
            wait_for(lambda: any(v.verdict == "error" for v in seen), 0.3)
        rng = np.random.default_rng(0)
        for i in range(3):
            image = render(PRODUCT, rng, None if i < 2 else "missing", size=SIZE)[0]
            cam.send_multipart(wire.encode_frame("cam0", i, image, encoding="jpeg"))
        if not wait_for(lambda: sum(v.frame_id >= 0 for v in seen) >= 3, 60):
            pytest.fail(f"no verdicts for the rendered frames within 60 s:\n{daemon.log()}")
    finally:
        cam.close()


@pytest.fixture(scope="session")
def live_daemon(tmp_path_factory, small_bank):
    import zmq

    root = tmp_path_factory.mktemp("live-daemon")
    bank = small_bank  # the serve tests' bank (tests/conftest.py): built once per session
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.bind("tcp://127.0.0.1:0")
    config = root / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "detector": DETECTOR,
        "bank": {"path": str(bank)},
        "runtime": {
            "ingest": {"endpoints": [{"url": "tcp://127.0.0.1:0", "mode": "bind"}]},
            "pipeline": {"deadline_ms": 30000},
            "publish": {"url": sub.getsockopt_string(zmq.LAST_ENDPOINT), "mode": "connect"},
            "metrics": {"host": "127.0.0.1", "port": 0},
            "logging": {"level": "INFO", "format": "console"},
        },
    }))
    log_path = root / "serve.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "linewatch.cli", "serve", "-c", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoints, metrics_port = _wait_started(proc, log_path)
        daemon = LiveDaemon(f"http://127.0.0.1:{metrics_port}", "127.0.0.1", metrics_port, proc, log_path)
        _wait_ready(daemon)
        _feed_frames(ctx, sub, endpoints[0], daemon)
        yield daemon
    finally:
        sub.close()
        ctx.term()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
    assert proc.returncode == 0, f"linewatch serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
