"""The whole daemon over real sockets: frames in over ZMQ, verdicts out, HTTP, systemd, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")
wire = pytest.importorskip("linewatch.wire")
pytest.importorskip("linewatch.runtime.ingest")
pytest.importorskip("linewatch.runtime.publish")

from linewatch.config import (  # noqa: E402
    BatchConfig, EndpointConfig, IngestConfig, MetricsConfig, PipelineConfig, PublishConfig, RuntimeConfig,
)
from linewatch.runtime.daemon import Daemon  # noqa: E402
from tests.runtime.fakes import FakeProcessor, expected_verdict, quiet_log  # noqa: E402


def runtime_config(deadline_ms: float = 2000.0) -> RuntimeConfig:
    return RuntimeConfig(
        ingest=IngestConfig(endpoints=[EndpointConfig(url="tcp://127.0.0.1:*", mode="bind")], decode_workers=2),
        batch=BatchConfig(max_batch=4, max_delay_ms=5.0),
        pipeline=PipelineConfig(deadline_ms=deadline_ms),
        publish=PublishConfig(url="tcp://127.0.0.1:*", mode="bind"),
        metrics=MetricsConfig(host="127.0.0.1", port=0),
    )


def http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Line:
    """A camera (PUB into the daemon's ingest) and an actuator (SUB on its verdicts)."""

    def __init__(self, daemon: Daemon) -> None:
        self.ctx = zmq.Context()
        self.cam = self.ctx.socket(zmq.PUB)
        self.cam.connect(daemon.ingest.bound_urls[0])
        self.act = self.ctx.socket(zmq.SUB)
        self.act.setsockopt(zmq.SUBSCRIBE, b"")
        self.act.connect(daemon.publisher.bound_url)
        self.image = np.zeros((8, 8, 3), np.uint8)

    def send(self, camera: str, frame_id: int, value: int) -> None:
        self.image[...] = value
        self.cam.send_multipart(wire.encode_frame(camera, frame_id, self.image))

    def recv(self, timeout_s: float = 2.0):
        if not self.act.poll(int(timeout_s * 1000)):
            return None
        return wire.decode_verdict(self.act.recv_multipart())

    def warm_up(self) -> None:
        """PUB/SUB drop messages until connected: send probes until one comes back."""
        end = time.monotonic() + 5.0
        i = 0
        while time.monotonic() < end:
            self.send("warm", i, 50)
            i += 1
            v = self.recv(0.05)
            if v is not None:
                while self.recv(0.2) is not None:  # the other probes in flight
                    pass
                return
        raise AssertionError("daemon never answered a probe frame")

    def close(self) -> None:
        self.cam.close(linger=0)
        self.act.close(linger=0)
        self.ctx.term()


@pytest.fixture
def notify(monkeypatch):
    d = tempfile.mkdtemp(prefix="lwd", dir="/tmp")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    def messages() -> list[str]:
        got = []
        while True:
            try:
                got.append(sock.recv(4096).decode())
            except (socket.timeout, BlockingIOError):
                return got

    yield messages
    sock.close()
    os.unlink(path)
    os.rmdir(d)


def test_frames_in_verdicts_out_with_metrics_health_and_systemd(notify) -> None:
    daemon = Daemon(runtime_config(), FakeProcessor([("pre", 0.0), ("net", 0.002)]), log=quiet_log())
    daemon.start()
    line = Line(daemon)
    try:
        port = daemon.health.port
        assert http(port, "/readyz")[0] == 200
        assert http(port, "/healthz") == (200, "ok\n")
        line.warm_up()
        n = 40
        for i in range(n):
            line.send("cam0", i, 200 if i % 2 else 50)
        line.cam.send_multipart([b"cam0", b"{not json", b""])  # undecodable: still answered
        got = []
        for _ in range(n + 1):
            v = line.recv(3.0)
            assert v is not None, f"only {len(got)} verdicts"
            got.append(v)
        assert line.recv(0.2) is None  # exactly one verdict per frame
        frames = [v for v in got if v.verdict != "error"]
        assert [v.frame_id for v in frames] == list(range(n))
        assert [v.verdict for v in frames] == [expected_verdict(i) for i in range(n)]
        errors = [v for v in got if v.verdict == "error"]
        assert len(errors) == 1 and errors[0].camera == "cam0" and errors[0].reason == "bad_header"
        status, body = http(port, "/metrics")
        assert status == 200
        assert 'linewatch_frames_received_total{camera="cam0"} 41.0' in body
        assert "linewatch_ready 1.0" in body
        assert 'linewatch_bank_info{backend="fake",bank_id="bank-test",images="3"} 1.0' in body
        time.sleep(0.15)
        sent = notify()
        assert sent[0].startswith("READY=1")
        assert "WATCHDOG=1" in sent
    finally:
        line.close()
        daemon.stop()
    assert notify()[-1] == "STOPPING=1"
    assert daemon.readiness()[0] is False


def wait_for(cond, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_watchdog_is_withheld_while_a_stage_is_stuck(notify) -> None:
    proc = FakeProcessor([("net", 0.0)])
    inner = proc.stages[0][1]

    def net(images):
        if any(im[0, 0, 0] == 13 for im in images):
            time.sleep(1.0)  # a hung CUDA call, say
        return inner(images)

    proc.stages = [("net", net)]
    daemon = Daemon(runtime_config(deadline_ms=100.0), proc, log=quiet_log())
    daemon.pipeline.stall_s = 0.15
    daemon.start()
    line = Line(daemon)
    try:
        line.warm_up()
        assert "WATCHDOG=1" in notify()
        line.send("cam0", 0, 13)
        assert wait_for(lambda: not daemon.pipeline.healthy()[0], 1.0)
        notify()
        time.sleep(0.3)
        assert "WATCHDOG=1" not in notify()  # systemd would restart us
        assert line.recv(1.0).verdict == "timeout"  # the frame itself was still answered
        assert wait_for(lambda: daemon.pipeline.healthy()[0], 2.0)
        time.sleep(0.15)
        assert "WATCHDOG=1" in notify()  # pings resume once it recovers
    finally:
        line.close()
        daemon.stop()


def test_sigterm_drains_every_in_flight_frame_and_returns_0() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals need the main thread")
    daemon = Daemon(runtime_config(deadline_ms=5000.0), FakeProcessor([("net", 0.05)]), log=quiet_log())
    daemon.config.batch.max_batch = 1
    daemon.start()
    line = Line(daemon)
    line.warm_up()
    n = 10
    received: list = []

    def camera_then_sigterm() -> None:
        for i in range(n):
            line.send("cam0", i, 50)
        time.sleep(0.1)  # frames in flight (10 x 50 ms of work), then the stop signal
        os.kill(os.getpid(), signal.SIGTERM)

    def actuator() -> None:
        end = time.monotonic() + 8.0
        while len(received) < n and time.monotonic() < end:
            v = line.recv(0.1)
            if v is not None:
                received.append(v)

    threads = [threading.Thread(target=camera_then_sigterm), threading.Thread(target=actuator)]
    for t in threads:
        t.start()
    try:
        assert daemon.run_until_signal() == 0
    finally:
        for t in threads:
            t.join(10.0)
        line.close()
    assert [v.frame_id for v in received] == list(range(n))
    assert {v.verdict for v in received} == {"pass"}  # drained, not timed out
