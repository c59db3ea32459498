"""The whole daemon over real sockets: frames in over ZMQ, verdicts out, HTTP, systemd, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time

import pytest

from linewatch.runtime.daemon import Daemon
from tests.runtime.fakes import FakeClock, FakeProcessor, GatedProcessor, expected_verdict, quiet_log
from tests.runtime.line import Line, http, runtime_config
from tests.waiting import wait_until


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
        """Every notification sent so far (and not yet read)."""
        got = []
        sock.settimeout(0.0)
        while True:
            try:
                got.append(sock.recv(4096).decode())
            except (socket.timeout, BlockingIOError):
                return got

    def wait_for(message: str, timeout_s: float = 5.0) -> bool:
        """Block until `message` arrives (bounded); the ones before it are read and dropped."""
        sock.settimeout(timeout_s)
        try:
            while sock.recv(4096).decode() != message:
                pass
            return True
        except socket.timeout:
            return False

    messages.wait_for = wait_for
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
        stats = daemon.pipeline.stats()  # exactly one verdict per frame, each one published
        assert daemon.publisher.wait_idle(5.0)
        assert sum(stats["verdicts"].values()) == stats["received"] == daemon.publisher.published
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
        assert notify()[0].startswith("READY=1")
        assert notify.wait_for("WATCHDOG=1")  # the watchdog thread pings while healthy
    finally:
        line.close()
        daemon.stop()
    assert notify()[-1] == "STOPPING=1"
    assert daemon.readiness()[0] is False


def test_watchdog_is_withheld_while_a_stage_is_stuck(notify, monkeypatch) -> None:
    clock = FakeClock()
    proc = GatedProcessor()
    daemon = Daemon(runtime_config(deadline_ms=100.0), proc, log=quiet_log(), clock=clock)
    daemon.pipeline.stall_s = 0.15
    monkeypatch.delenv("WATCHDOG_USEC")  # no watchdog thread: this test calls the check itself
    daemon.start()
    line = Line(daemon)
    try:
        assert daemon.watchdog_check() is True and notify()[-1] == "WATCHDOG=1"
        line.warm_up(capture_ts=clock.time)  # the first probe holds the detector: a hung CUDA call, say
        clock.advance(0.005)  # max_delay_ms: the probe's batch is due
        daemon.pipeline.tick()
        assert proc.entered.wait(5.0)
        line.send("cam0", 0, 50, capture_ts=clock.time())
        assert line.wait(lambda: daemon.pipeline.stats()["received"] >= 2)
        clock.advance(0.1)
        assert daemon.watchdog_check() is True and notify() == ["WATCHDOG=1"]  # busy 0.1 s: not stuck yet
        clock.advance(0.1)  # stuck for 0.2 s > stall_s
        assert daemon.pipeline.healthy()[0] is False
        assert daemon.watchdog_check() is False and "WATCHDOG=1" not in notify()  # systemd would restart us
        daemon.pipeline.tick()  # cam0 #0's deadline (100 ms) has passed on this clock
        v = line.recv(5.0)
        assert (v.camera, v.verdict) == ("cam0", "timeout")  # frames are still answered meanwhile
        proc.gate.set()  # the call returns
        assert line.wait(lambda: daemon.pipeline.healthy()[0])
        assert daemon.watchdog_check() is True and notify()[-1] == "WATCHDOG=1"  # pings resume
    finally:
        proc.gate.set()
        line.close()
        daemon.stop()


def test_sigterm_drains_every_in_flight_frame_and_returns_0() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals need the main thread")
    config = runtime_config(deadline_ms=5000.0)
    config.batch.max_batch = 1  # before the daemon reads it: ten batches, one frame each
    proc = FakeProcessor([("net", 0.0)])
    net = proc.stages[0][1]
    cam0_inside = threading.Event()

    def watched(images):
        if images[0][0, 0, 0] == 51 and not cam0_inside.is_set():  # the first cam0 frame (probes are 50)
            cam0_inside.set()
            # held until the stop signal has begun the drain: all ten frames are in flight then
            assert wait_until(lambda: not daemon.pipeline.accepting, 10.0, poll_s=0.005)
        return net(images)

    proc.stages = [("net", watched)]
    daemon = Daemon(config, proc, log=quiet_log())
    assert daemon.pipeline.core.max_batch == 1
    daemon.start()
    line = Line(daemon)
    line.warm_up()
    n = 10
    received: list = []

    def camera_then_sigterm() -> None:
        for i in range(n):
            line.send("cam0", i, 51)
        assert cam0_inside.wait(10.0)
        # every frame received, none answered (wait_until: the actuator thread owns the verdict socket)
        assert wait_until(lambda: daemon.pipeline.inflight() == n, 10.0, poll_s=0.005)
        # and run_until_signal (main thread) has put its handler in place: before, SIGTERM ends pytest
        assert wait_until(lambda: signal.getsignal(signal.SIGTERM) != default_handler, 10.0, poll_s=0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    def actuator() -> None:
        end = time.monotonic() + 8.0
        while len(received) < n and time.monotonic() < end:
            v = line.recv(0.1)
            if v is not None:
                received.append(v)

    default_handler = signal.getsignal(signal.SIGTERM)
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
    assert set(proc.batch_sizes) == {1}  # max_batch 1 was in force: ten batches were in flight
