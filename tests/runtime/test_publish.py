"""Publisher and tap over real ZeroMQ sockets on loopback. Every wait is bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from linewatch import wire
from linewatch.config import PublishConfig
from linewatch.runtime.transport.publish import Publisher
from linewatch.runtime.transport.tap import SequenceGaps, format_verdict, tap
from linewatch.wire import Verdict

ANY_PORT = "tcp://127.0.0.1:*"


def _verdict(camera: str, frame_id: int, **kw) -> Verdict:
    return Verdict(camera=camera, frame_id=frame_id, verdict=kw.pop("verdict", "pass"), capture_ts=1000.0 + frame_id, **kw)


@pytest.fixture
def publisher(request) -> Iterator[Publisher]:
    config = getattr(request, "param", {})
    pub = Publisher(PublishConfig(url=ANY_PORT, **config))
    pub.start()
    yield pub
    pub.stop(timeout_s=0.5)


@pytest.fixture
def subscriber(publisher: Publisher) -> Iterator[zmq.Socket]:
    """A raw SUB socket that has provably joined (probes until one arrives)."""
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(publisher.bound_url)
    for i in range(100):
        publisher.publish(_verdict("probe", i))
        if sock.poll(50):
            break
    else:
        pytest.fail("subscription never established")
    yield sock  # probes still in flight arrive later; _receive skips them
    sock.close(linger=0)
    context.term()


def _receive(sock: zmq.Socket, n: int, timeout_s: float = 5.0) -> list[Verdict]:
    got: list[Verdict] = []
    end = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < end:
        if sock.poll(50):
            verdict = wire.decode_verdict(sock.recv_multipart())
            if verdict.camera != "probe":
                got.append(verdict)
    return got


@pytest.mark.parametrize("publisher", [{"heatmap": "png", "overlay_jpeg": True}], indirect=True)
def test_verdicts_come_back_in_order_with_attachments(publisher: Publisher, subscriber: zmq.Socket) -> None:
    heat = np.arange(48, dtype=np.float32).reshape(6, 8) / 10
    sent = [
        _verdict("cam0", i, verdict=["pass", "fail", "error", "timeout", "shed"][i % 5], score=i * 0.5, threshold=2.0,
                 heatmap=heat + i, overlay_jpeg=b"\xff\xd8jpeg%d" % i, reason=None if i % 5 < 2 else "why")
        for i in range(25)
    ]
    for verdict in sent:
        publisher.publish(verdict)
    got = _receive(subscriber, len(sent))
    assert [v.frame_id for v in got] == list(range(25))
    for a, b in zip(sent, got):
        assert (b.verdict, b.score, b.reason, b.capture_ts, b.overlay_jpeg) == (a.verdict, a.score, a.reason, a.capture_ts, a.overlay_jpeg)
        np.testing.assert_allclose(b.heatmap, a.heatmap, atol=1e-3)


def test_publish_is_thread_safe_and_keeps_each_threads_order(publisher: Publisher, subscriber: zmq.Socket) -> None:
    def worker(camera: str) -> None:
        for i in range(100):
            publisher.publish(_verdict(camera, i))

    threads = [threading.Thread(target=worker, args=(f"cam{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5.0)
    got = _receive(subscriber, 400)
    assert len(got) == 400
    for k in range(4):
        assert [v.frame_id for v in got if v.camera == f"cam{k}"] == list(range(100))
    assert all(v.heatmap is None for v in got)  # heatmap "none" by default


def test_close_flushes_what_is_queued(publisher: Publisher, subscriber: zmq.Socket) -> None:
    for i in range(300):
        publisher.publish(_verdict("cam0", i))
    publisher.stop(timeout_s=2.0)
    assert [v.frame_id for v in _receive(subscriber, 300)] == list(range(300))
    publisher.stop()  # idempotent
    with pytest.raises(RuntimeError):
        publisher.publish(_verdict("cam0", 301))


def test_tap_filters_cameras_and_prints_lines(publisher: Publisher, capsys) -> None:
    seen: list[Verdict] = []
    joined = threading.Event()
    three = threading.Event()
    stop = threading.Event()

    def on_verdict(verdict: Verdict) -> None:
        if verdict.camera == "probe":
            joined.set()
        else:
            seen.append(verdict)
            if len(seen) == 3:
                three.set()

    runner = threading.Thread(target=tap, args=(publisher.bound_url, on_verdict), kwargs={"stop": stop, "timeout_s": 20})
    runner.start()
    try:
        for i in range(100):  # slow joiner
            publisher.publish(_verdict("probe", i))
            if joined.wait(0.05):
                break
        assert joined.is_set()
        for i in range(3):
            publisher.publish(_verdict("cam1", i, verdict="fail", score=3.21, threshold=2.1, latency_s=0.0123))
        assert three.wait(5.0)
        assert [v.frame_id for v in seen] == [0, 1, 2]
    finally:
        stop.set()
        runner.join(5.0)
    assert not runner.is_alive()

    # exact camera filter (cam1 must not match cam10), count and print
    printer = threading.Thread(target=tap, args=(publisher.bound_url,), kwargs={"count": 2, "timeout_s": 10, "cameras": ["cam1"]})
    printer.start()
    for i in range(200):
        publisher.publish(_verdict("cam10", i))
        publisher.publish(_verdict("cam1", i, verdict="error", reason="too_large"))
        printer.join(0.02)
        if not printer.is_alive():
            break
    printer.join(5.0)
    assert not printer.is_alive()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("cam1 #") and " ERROR reason=too_large" in line for line in lines)


@pytest.mark.timeout(30)  # a tap that ignored its timeout would hang here
def test_tap_timeout_returns() -> None:
    assert tap("tcp://127.0.0.1:1", callback=lambda v: None, timeout_s=0.05) == 0


def test_format_verdict() -> None:
    line = format_verdict(_verdict("cam0", 17, verdict="fail", score=3.21, threshold=2.1, latency_s=0.0123,
                                   objects=[{"label": "a"}, {"label": "b"}]))
    assert line == "cam0 #17 FAIL score=3.21 thr=2.10 lat=12.3ms objects=2"


def test_sequence_gaps_count_losses_and_restart_with_a_new_run() -> None:
    gaps = SequenceGaps()
    seqs = [("r1", 5), ("r1", 6), ("r1", 9), ("r1", 8), ("r1", 10), ("r2", 0), ("r2", 3)]
    missing = [gaps.observe(_verdict("c", i, run_id=run, seq=seq)) for i, (run, seq) in enumerate(seqs)]
    # joined r1 at 5 (not a loss); 7-8 missing before 9; 8 late is not counted again;
    # r2 is a restart; 1-2 missing before 3
    assert missing == [0, 0, 2, 0, 0, 0, 2]
    assert (gaps.lost, gaps.runs) == (4, 2)
    assert gaps.observe(_verdict("c", 99)) == 0  # a verdict without seq (older daemon) is ignored


def test_a_subscriber_that_stops_reading_can_count_exactly_what_it_lost() -> None:
    # Fault run: a subscriber that stopped reading lost 5,500 of 20,000 verdicts while the
    # daemon counted 20,000 published. ZeroMQ's PUB tells nobody; the seq numbers tell the
    # subscriber, exactly.
    publisher = Publisher(PublishConfig(url=ANY_PORT, send_hwm=10))
    publisher.start()
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 10)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(publisher.bound_url)
    try:
        for i in range(100):  # join (slow joiner): probes until one arrives, then read none
            publisher.publish(_verdict("probe", i, run_id="probe", seq=i))
            if sock.poll(50):
                break
        n = 3000
        for i in range(n):  # the subscriber reads nothing meanwhile
            publisher.publish(_verdict("cam0", i, run_id="run", seq=i))
        assert publisher.wait_idle(10.0)
        gaps = SequenceGaps()
        got: list[int] = []

        def read(until_silent_ms: int, until=lambda: False) -> None:
            while not until() and sock.poll(until_silent_ms):
                verdict = wire.decode_verdict(sock.recv_multipart())
                if verdict.run_id == "run":
                    got.append(verdict.seq)
                    gaps.observe(verdict)

        read(200)  # everything still queued: 200 ms of silence says the queues are empty for the marker
        publisher.publish(_verdict("cam0", n, run_id="run", seq=n))  # the next one makes the tail's loss visible
        read(10_000, until=lambda: bool(got) and got[-1] == n)  # the marker is the last one sent
        assert got[0] == 0 and got[-1] == n  # joined before the first; the marker arrived
        assert 0 < gaps.lost < n
        assert len(got) + gaps.lost == n + 1  # every verdict is either received or counted lost
    finally:
        sock.close(linger=0)
        context.term()
        publisher.stop(timeout_s=0.5)
