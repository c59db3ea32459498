"""Ingest over real ZeroMQ sockets on loopback: our format, imagezmq's real ImageSender in both
modes, oversized payloads, unknown-camera floods, prompt stop. Every wait is bounded."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator

import cv2
import imagezmq
import numpy as np
import pytest
import zmq

from linewatch import wire
from linewatch.config import EndpointConfig, IngestConfig
from linewatch.runtime.transport.ingest import Ingest
from linewatch.runtime.ops.metrics import Metrics
from linewatch.wire import Frame
from tests.runtime.fakes import FakeClock, quiet_log
from tests.runtime.fakes import FrameCollector as Collector

ANY_PORT = "tcp://127.0.0.1:*"


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def started() -> Iterator[Callable[..., tuple[Ingest, Collector]]]:
    """started(endpoints, **config) -> (running Ingest, Collector); stopped afterwards."""
    made: list[Ingest] = []

    def make(endpoints: list[EndpointConfig], log=None, metrics=None, clock=None, **config) -> tuple[Ingest, Collector]:
        sink = Collector()
        extra = {"clock": clock} if clock is not None else {}
        ingest = Ingest(IngestConfig(endpoints=endpoints, **config), sink.on_frame, sink.on_error, log=log,
                        metrics=metrics, **extra)
        ingest.start()
        made.append(ingest)
        return ingest, sink

    yield make
    for ingest in made:
        ingest.stop()


def _image(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _join_pubsub(send_probe: Callable[[int], None], arrived: Callable[[], bool], sink: Collector) -> None:
    """Beat the slow-joiner: send probes until one comes through (bounded: about 5 s)."""
    for i in range(100):
        send_probe(i)
        if sink.wait(arrived, 0.05):
            return
    pytest.fail("PUB/SUB subscription never established")


def _pub(context: zmq.Context, url: str) -> zmq.Socket:
    sock = context.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    return sock


# ---------------------------------------------------------------- linewatch format


def test_linewatch_frames_arrive_with_their_ids(started, context) -> None:
    ingest, sink = started([EndpointConfig(url=ANY_PORT)])
    pub = _pub(context, ingest.bound_urls[0])
    _join_pubsub(lambda i: pub.send_multipart(wire.encode_frame("cam0", 10_000 + i, _image(0))), lambda: bool(sink.frames), sink)

    images = {fid: _image(fid) for fid in range(5)}
    for fid, image in images.items():
        pub.send_multipart(wire.encode_frame("cam0", fid, image, encoding="png", part_id=f"P{fid}", capture_ts=50.0 + fid))
    assert sink.wait(lambda: sum(f.frame_id < 10_000 for f in sink.frames) == 5)
    got = [f for f in sink.frames if f.frame_id < 10_000]
    assert sorted(f.frame_id for f in got) == list(range(5))
    for frame in got:
        np.testing.assert_array_equal(frame.decoded(), images[frame.frame_id])
        assert (frame.camera, frame.part_id, frame.capture_ts) == ("cam0", f"P{frame.frame_id}", 50.0 + frame.frame_id)
        assert frame.received_ts > 1e9 and frame.received_mono <= time.monotonic()


def test_frames_are_handed_on_read_not_decoded_in_arrival_order(started, context, monkeypatch) -> None:
    """Ingest decodes no pixel (the pipeline decodes only the frames it admits): frames leave
    with their bytes and declared size, and frames and errors leave in arrival order."""
    decodes: list[int] = []
    real_imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: (decodes.append(1), real_imdecode(*a, **k))[1])
    events: list[tuple] = []
    ingest, sink = started([EndpointConfig(url=ANY_PORT)])
    sink.on_frame = lambda f, on=sink.on_frame: (events.append(("frame", f.camera, f.frame_id)), on(f))
    sink.on_error = lambda e, mono, on=sink.on_error: (events.append(("error", e.camera, e.frame_id)), on(e, mono))
    ingest._on_frame, ingest._on_error = sink.on_frame, sink.on_error
    pub = _pub(context, ingest.bound_urls[0])
    _join_pubsub(lambda i: pub.send_multipart(wire.encode_frame("probe", i, _image(0))), lambda: bool(sink.frames), sink)

    pub.send_multipart(wire.encode_frame("cam0", 0, _image(1), encoding="png"))
    pub.send_multipart(wire.encode_frame("cam0", 1, _image(2, h=20, w=40), encoding="jpeg"))
    pub.send_multipart(wire.encode_frame("cam0", 2, _image(3))[:2])  # truncated
    pub.send_multipart(wire.encode_frame("cam0", 3, _image(4)))
    assert sink.wait(lambda: len([e for e in events if e[1] == "cam0"]) == 4)
    assert [e for e in events if e[1] == "cam0"] == [
        ("frame", "cam0", 0), ("frame", "cam0", 1), ("error", "cam0", 2), ("frame", "cam0", 3)]
    assert decodes == []
    frames = {f.frame_id: f for f in sink.frames if f.camera == "cam0"}
    assert all(f.image is None for f in frames.values())
    assert [(f.encoded.encoding, f.height_width) for f in frames.values()] == [
        ("png", (24, 32)), ("jpeg", (20, 40)), ("raw", (24, 32))]
    np.testing.assert_array_equal(frames[0].decoded(), _image(1))


def test_bad_messages_become_addressed_errors(started, context) -> None:
    ingest, sink = started([EndpointConfig(url=ANY_PORT)])
    pub = _pub(context, ingest.bound_urls[0])
    _join_pubsub(lambda i: pub.send_multipart(wire.encode_frame("cam0", i, _image(0))), lambda: bool(sink.frames), sink)

    good = wire.encode_frame("cam0", 77, _image(1))
    pub.send_multipart(good[:2])  # truncated
    pub.send_multipart([good[0], good[1], b"\xff\xd8 broken"])  # size mismatch
    assert sink.wait(lambda: len(sink.errors) == 2)
    assert sorted((e.reason, e.camera, e.frame_id) for e in sink.errors) == [("bad_shape", "cam0", 77), ("truncated", "cam0", 77)]
    assert ingest.stats()["errors"] == {"truncated": 1, "bad_shape": 1}


def test_oversized_payload_is_refused_and_serving_continues(started, context) -> None:
    ingest, sink = started([EndpointConfig(url=ANY_PORT)], max_payload_bytes=1 << 20)
    pub = _pub(context, ingest.bound_urls[0])
    _join_pubsub(lambda i: pub.send_multipart(wire.encode_frame("cam0", 10_000 + i, _image(0))), lambda: bool(sink.frames), sink)

    huge = 200 * 1024 * 1024
    topic, header, _ = wire.encode_frame("cam0", 1, _image(0))
    header = json.dumps({**json.loads(header), "shape": [huge // 3072, 1024, 3]}).encode()
    pub.send_multipart([topic, header, bytes(huge)], copy=False)
    pub.send_multipart(wire.encode_frame("cam0", 2, _image(2)))
    assert sink.wait(lambda: any(f.frame_id == 2 for f in sink.frames), 20.0), "the next good frame never arrived"
    assert [(e.reason, e.camera, e.frame_id) for e in sink.errors] == [("too_large", "cam0", 1)]


def test_unknown_camera_flood_does_not_starve_a_good_camera(started, context) -> None:
    metrics = Metrics()
    # a clock that never moves: one report for the intruder, then only counted drops
    ingest, sink = started([EndpointConfig(url=ANY_PORT)], cameras=["good"], clock=FakeClock(), metrics=metrics)
    good, intruder = _pub(context, ingest.bound_urls[0]), _pub(context, ingest.bound_urls[0])
    _join_pubsub(lambda i: good.send_multipart(wire.encode_frame("good", 10_000 + i, _image(0))), lambda: bool(sink.frames), sink)
    _join_pubsub(lambda i: intruder.send_multipart(wire.encode_frame("intruder", i, _image(0))), lambda: bool(sink.errors), sink)

    flood = wire.encode_frame("intruder", 1, _image(3, 8, 8))
    dropped = lambda: ingest.stats()["suppressed"].get("unknown_camera", 0)  # noqa: E731
    # 50 intruder frames before each good one, from this thread: a flood at whatever rate this
    # machine allows, never depending on how a flooding thread happens to be scheduled
    for fid in range(20):
        for _ in range(50):
            intruder.send_multipart(flood)
        good.send_multipart(wire.encode_frame("good", fid, _image(fid)))
    assert sink.wait(lambda: sum(f.frame_id < 10_000 for f in sink.frames) == 20 and dropped() > 10, 10.0), dropped()
    assert sorted(f.frame_id for f in sink.frames if f.frame_id < 10_000) == list(range(20))
    assert all(f.camera == "good" for f in sink.frames)
    reports = [e for e in sink.errors if e.reason == "unknown_camera"]
    assert all(e.camera == "intruder" for e in reports)
    assert len(reports) == 1  # one per second (on this clock: ever), not one per frame
    # the flood's tail may still be arriving: every dropped frame is counted in the metric too
    sample = lambda: metrics.registry.get_sample_value("linewatch_messages_dropped_total", {"reason": "unknown_camera"})  # noqa: E731
    assert sink.wait(lambda: sample() == dropped(), 10.0), (sample(), dropped())


# ---------------------------------------------------------------- imagezmq


def test_imagezmq_reqrep_sender_gets_ok_at_once(context) -> None:
    """The reply goes out before the frame is handed on: on_frame waits until the sender has
    its OK (were the reply sent after on_frame, both would wait until the 5 s timeouts)."""
    release = threading.Event()
    sink = Collector()
    answered: list[bool] = []

    def slow_on_frame(frame: Frame) -> None:
        answered.append(release.wait(5.0))
        sink.on_frame(frame)

    config = IngestConfig(endpoints=[EndpointConfig(url=ANY_PORT, protocol="imagezmq-reqrep")], decode_workers=1)
    ingest = Ingest(config, slow_on_frame, sink.on_error)
    ingest.start()
    sender = imagezmq.ImageSender(connect_to=ingest.bound_urls[0])
    sender.zmq_socket.setsockopt(zmq.RCVTIMEO, 5000)  # a missing reply fails instead of hanging
    try:
        rgb = [_image(1), _image(2)]
        before_us = int(time.time() * 1e6)
        assert sender.send_image("line1-cam", cv2.cvtColor(rgb[0], cv2.COLOR_RGB2BGR)) == b"OK"
        assert not sink.frames  # answered OK (RCVTIMEO 5 s) while on_frame was still blocked
        release.set()
        jpg = cv2.imencode(".png", cv2.cvtColor(rgb[1], cv2.COLOR_RGB2BGR))[1].tobytes()  # lossless bytes via send_jpg
        assert sender.send_jpg("line1-cam|exposure=800", jpg) == b"OK"
        assert sink.wait(lambda: len(sink.frames) == 2)
        assert answered == [True, True]
        frames = sorted(sink.frames, key=lambda f: f.frame_id)
        assert {f.camera for f in frames} == {"line1-cam"}
        assert before_us <= frames[0].frame_id < frames[1].frame_id  # receive time in microseconds
        for frame, sent in zip(frames, rgb):
            np.testing.assert_array_equal(frame.decoded(), sent)  # BGR on the wire, RGB out
    finally:
        release.set()
        sender.close()
        ingest.stop()


def test_imagezmq_pubsub_array_and_jpeg(started) -> None:
    sender = imagezmq.ImageSender(connect_to=ANY_PORT, REQ_REP=False)  # imagezmq's PUB binds
    try:
        url = sender.zmq_socket.getsockopt_string(zmq.LAST_ENDPOINT)
        ingest, sink = started([EndpointConfig(url=url, mode="connect", protocol="imagezmq-pubsub")])
        _join_pubsub(lambda i: sender.send_image("probe", _image(0)), lambda: bool(sink.frames), sink)

        rgb = _image(5)
        sender.send_image("cam-a", np.ascontiguousarray(rgb[..., ::-1]))
        flat = np.zeros((16, 16, 3), np.uint8)
        flat[...] = (10, 100, 200)  # BGR
        sender.send_jpg("cam-a|x", cv2.imencode(".jpg", flat)[1].tobytes())
        assert sink.wait(lambda: sum(f.camera == "cam-a" for f in sink.frames) == 2)
        got = sorted((f for f in sink.frames if f.camera == "cam-a"), key=lambda f: f.frame_id)
        np.testing.assert_array_equal(got[0].decoded(), rgb)
        assert np.abs(got[1].decoded()[0, 0].astype(int) - (200, 100, 10)).max() <= 3
    finally:
        sender.close()


# ---------------------------------------------------------------- lifecycle


def test_stop_is_prompt_and_idempotent_and_bind_errors_raise() -> None:
    sink = Collector()
    ingest = Ingest(IngestConfig(endpoints=[EndpointConfig(url=ANY_PORT)]), sink.on_frame, sink.on_error)
    ingest.start()
    clash = Ingest(IngestConfig(endpoints=[EndpointConfig(url=ingest.bound_urls[0])]), sink.on_frame, sink.on_error)
    with pytest.raises(RuntimeError, match="cannot open endpoint"):
        clash.start()
    clash.stop()  # never started: a no-op
    ingest.stop()
    ingest.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("ingest-")]


def test_stop_wakes_every_receive_thread() -> None:
    """The receive threads wait in poll without a timeout: stop()'s one wake-up must end all of
    them (stop joins them; a thread left alive means a wake-up was lost)."""
    sink = Collector()
    ingest = Ingest(IngestConfig(endpoints=[EndpointConfig(url=ANY_PORT), EndpointConfig(url=ANY_PORT)]),
                    sink.on_frame, sink.on_error)
    ingest.start()
    assert len(ingest.threads()) == 2
    ingest.stop()
    assert not [t for t in ingest.threads() if t.is_alive()]


def test_imagezmq_frame_ids_do_not_repeat_when_the_daemon_restarts(context) -> None:
    # Fault run: imagezmq frame ids started again at 0, so camera + frame id named two parts.
    ids = []
    for _ in range(2):  # two daemon lifetimes, the same sender camera
        sink = Collector()
        config = IngestConfig(endpoints=[EndpointConfig(url=ANY_PORT, protocol="imagezmq-reqrep")])
        ingest = Ingest(config, sink.on_frame, sink.on_error)
        ingest.start()
        sender = imagezmq.ImageSender(connect_to=ingest.bound_urls[0])
        sender.zmq_socket.setsockopt(zmq.RCVTIMEO, 5000)
        try:
            for i in range(3):
                assert sender.send_image("cam", _image(i)) == b"OK"
            assert sink.wait(lambda: len(sink.frames) == 3)
            ids.append(sorted(f.frame_id for f in sink.frames))
        finally:
            sender.close()
            ingest.stop()
    first, second = ids
    assert len(set(first + second)) == 6 and max(first) < min(second)


def test_every_message_is_answered_or_counted_and_refusals_log_once_per_reason(started, context) -> None:
    # Fault run: messages with a non-UTF-8 topic beyond one per second were dropped and counted
    # nowhere, and every refused frame wrote a log line (13 MB of log for 10,000 messages).
    clock = FakeClock()  # never moves: no rate limit opens again during the test
    metrics = Metrics()
    log_lines = io.StringIO()
    ingest, sink = started([EndpointConfig(url=ANY_PORT)], clock=clock, metrics=metrics, log=quiet_log(log_lines))
    pub = _pub(context, ingest.bound_urls[0])
    pub.setsockopt(zmq.SNDHWM, 100_000)  # the sender must not drop: every message is accounted for here
    _join_pubsub(lambda i: pub.send_multipart(wire.encode_frame("probe", i, _image(0))),
                 lambda: bool(sink.frames), sink)
    good = wire.encode_frame("cam0", 0, _image(1))
    bad_dtype = [good[0], json.dumps({**json.loads(good[1]), "dtype": "float32"}).encode(), good[2]]
    n = 300
    for i in range(n):
        pub.send_multipart([b"\xff\xfe" + bytes([i % 256]), good[1], good[2]])  # topic not UTF-8: unaddressable
        pub.send_multipart(bad_dtype)  # addressable: an error verdict each
        pub.send_multipart(wire.encode_frame("cam0", i, _image(1)))
    pub.send_multipart(wire.encode_frame("cam0", n, _image(1)))  # a marker behind everything else

    def cam0_frames() -> int:
        return sum(f.camera == "cam0" for f in sink.frames)

    assert sink.wait(lambda: cam0_frames() == n + 1 and len(sink.errors) == 1 + n, 20.0), (cam0_frames(), len(sink.errors))
    dropped = metrics.registry.get_sample_value("linewatch_messages_dropped_total", {"reason": "bad_header"})
    reported = sum(e.reason == "bad_header" for e in sink.errors)
    assert (reported, dropped) == (1, n - 1)  # one answered, the rest counted: none lost silently
    assert sum(e.reason == "bad_dtype" and e.camera == "cam0" for e in sink.errors) == n
    refused = [json.loads(line) for line in log_lines.getvalue().splitlines() if '"frame refused"' in line]
    assert sorted(line["reason"] for line in refused) == ["bad_dtype", "bad_header"]  # one line per reason
    pub.close(linger=0)
