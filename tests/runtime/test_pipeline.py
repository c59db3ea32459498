"""Pipeline: the core run by threads. One verdict per frame, order, deadlines, failures, drain.

The rules themselves are tested step by step in test_core.py; these tests check that the
threads carry them out. Nothing here asserts how long anything took: waits are bounded
(a hang fails instead of blocking the suite), and time moves on a fake clock where it matters.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from linewatch.config import BatchConfig, PipelineConfig
from linewatch.detector.result import InspectionResult
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.pipeline.runner import Pipeline
from linewatch.wire import Verdict
from tests.runtime.fakes import (Collector, FakeClock, FakeProcessor, GatedProcessor, expected_verdict, make_frame,
                                 make_pipeline)



def counter_value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


def test_overload_gives_exactly_one_verdict_per_frame_in_order(started) -> None:
    # 300 frames from two cameras at once into stages of 5/20/5 ms per batch of <= 4, with
    # 16 places to wait: most are shed, every one is answered once, in order per camera.
    proc = FakeProcessor([("pre", 0.005), ("net", 0.02), ("post", 0.005)])
    out = Collector()
    metrics = Metrics()
    p = started(make_pipeline(proc, out, max_batch=4, max_pending=16, deadline_ms=60_000, metrics=metrics))
    n_per_cam = 150
    for i in range(n_per_cam):
        for cam in ("cam0", "cam1"):
            p.submit(make_frame(cam, i))
    n = 2 * n_per_cam
    assert out.wait_for(n), f"only {len(out.verdicts)} of {n} verdicts"
    p.stop()  # joins every thread: a second verdict for any frame would be in `out` now
    assert len(out.verdicts) == n
    by_cam = out.by_camera()
    assert by_cam["cam0"] == list(range(n_per_cam))  # each id once, in arrival order
    assert by_cam["cam1"] == list(range(n_per_cam))
    counts = out.counts()
    assert counts.get("shed", 0) > 0, counts  # overload must shed, with an answer
    assert counts.get("pass", 0) + counts.get("fail", 0) > 0, counts
    for v in out.verdicts:
        if v.verdict in ("pass", "fail"):
            assert v.verdict == expected_verdict(v.frame_id)
            assert v.backend == "fake" and v.bank_id == "bank-test"
            assert set(v.timings) >= {"pre", "net", "post", "inner"}
            assert v.latency_s is not None and v.latency_s >= 0
        else:
            assert (v.verdict, v.reason) == ("shed", "pending_full"), v
    assert max(proc.batch_sizes) <= 4
    # The metrics tell the same story.
    for value, k in counts.items():
        got = sum(counter_value(metrics, "linewatch_verdicts_total", {"camera": c, "verdict": value})
                  for c in ("cam0", "cam1"))
        assert got == k, (value, got, k)
    assert counter_value(metrics, "linewatch_frames_received_total", {"camera": "cam0"}) == n_per_cam
    assert sum(counter_value(metrics, "linewatch_frames_shed_total", {"camera": c, "reason": "pending_full"})
               for c in ("cam0", "cam1")) == counts["shed"]
    assert p.inflight() == 0
    assert p.stats()["received"] == n


def test_deadline_answers_timeout_and_discards_late_result(started) -> None:
    clock = FakeClock()
    proc = GatedProcessor()
    out = Collector()
    metrics = Metrics()
    p = started(make_pipeline(proc, out, max_batch=1, max_delay_ms=0.0, deadline_ms=100.0, metrics=metrics, clock=clock))
    p.submit(make_frame("cam0", 7, clock=clock))
    assert proc.entered.wait(5.0)
    clock.advance(0.099)
    p.tick()
    clock.advance(0.001)  # the deadline
    p.tick()
    assert out.wait_for(1)
    v = out.verdicts[0]
    assert (v.verdict, v.reason) == ("timeout", "deadline_exceeded")
    proc.gate.set()  # the detector's result comes after the timeout
    p.stop()  # joins the stage thread: its result has been handled
    assert counter_value(metrics, "linewatch_late_results_total") == 1
    assert len(out.verdicts) == 1
    assert counter_value(metrics, "linewatch_frames_timed_out_total", {"camera": "cam0"}) == 1


def test_raising_stage_fails_its_batch_only(started) -> None:
    proc = FakeProcessor([("pre", 0.0), ("net", 0.002)],
                         fail_if=lambda name, images: name == "net" and any(im[0, 0, 0] == 13 for im in images))
    out = Collector()
    metrics = Metrics()
    p = started(make_pipeline(proc, out, max_batch=1, max_delay_ms=0.0, metrics=metrics))
    for i in range(10):
        p.submit(make_frame("cam0", i, value=13 if i in (2, 3) else (200 if i % 2 else 50)))
    assert out.wait_for(10, timeout_s=5.0)
    assert [v.frame_id for v in out.verdicts] == list(range(10))
    for v in out.verdicts:
        if v.frame_id in (2, 3):
            assert v.verdict == "error" and v.reason == "stage_failed:net"
        else:
            assert v.verdict == expected_verdict(v.frame_id)
    assert counter_value(metrics, "linewatch_frame_errors_total", {"reason": "stage_failed:net"}) == 2
    assert p.healthy()[0]


def test_wrong_number_of_results_is_an_error_not_a_crash(started) -> None:
    proc = FakeProcessor([("only", 0.0)], wrong_length=True)
    out = Collector()
    p = started(make_pipeline(proc, out, max_batch=2, max_delay_ms=1.0))
    p.submit(make_frame("cam0", 0))
    p.submit(make_frame("cam0", 1))
    assert out.wait_for(2, timeout_s=2.0)
    assert {v.verdict for v in out.verdicts} == {"error"}
    assert {v.reason for v in out.verdicts} == {"stage_failed:only"}


def test_decode_errors_keep_their_place_in_camera_order(started) -> None:
    proc = GatedProcessor()
    out = Collector()
    p = started(make_pipeline(proc, out, max_batch=1, max_delay_ms=0.0))
    p.submit(make_frame("cam0", 1))
    assert proc.entered.wait(5.0)  # frame 1 is inside the detector
    p.submit_error("cam0", 2, "bad_payload", time.monotonic(), time.time())
    p.submit_error("cam1", 9, "bad_payload", time.monotonic(), time.time())
    assert out.wait_for(1)
    proc.gate.set()
    assert out.wait_for(3)
    # cam1 is not held back by cam0's frame in the detector; cam0's error waits for frame 1.
    assert [(v.camera, v.frame_id) for v in out.verdicts] == [("cam1", 9), ("cam0", 1), ("cam0", 2)]
    assert out.verdicts[2].verdict == "error" and out.verdicts[2].reason == "bad_payload"


def test_drain_answers_everything_in_flight_then_sheds_new_frames(started) -> None:
    # On a clock that never moves, a lone frame could wait for company (10 s) for ever:
    # drain must send it on at once.
    clock = FakeClock()
    proc = FakeProcessor([("a", 0.0), ("b", 0.0)])
    out = Collector()
    p = started(make_pipeline(proc, out, max_batch=2, max_delay_ms=10_000.0, deadline_ms=5000.0, clock=clock))
    for i in range(21):  # an odd count leaves a lone frame waiting for company
        p.submit(make_frame("cam0", i, clock=clock))
    assert p.drain(timeout_s=5.0) is True
    assert len(out.verdicts) == 21
    assert [v.verdict for v in out.verdicts] == [expected_verdict(i) for i in range(21)]
    p.submit(make_frame("cam0", 99, clock=clock))
    assert out.wait_for(22)
    assert out.verdicts[-1].verdict == "shed" and out.verdicts[-1].reason == "shutting_down"


def test_drain_timeout_and_stop_still_answer_every_frame() -> None:
    proc = GatedProcessor()  # never opens: a hung detector
    out = Collector()
    p = make_pipeline(proc, out, max_batch=1, max_delay_ms=0.0, deadline_ms=60_000.0)
    p.start()
    for i in range(5):
        p.submit(make_frame("cam0", i))
    assert p.drain(timeout_s=0.05) is False  # the gate never opens: any wait ends the same
    p.stop(timeout_s=0.5)
    proc.gate.set()
    assert [v.frame_id for v in out.verdicts] == list(range(5))
    assert {v.verdict for v in out.verdicts} == {"timeout"}
    assert {v.reason for v in out.verdicts} == {"shutdown"}


def test_stop_wakes_the_idle_stage_threads(monkeypatch) -> None:
    """Idle stage threads wait on their queues; stop() must wake them rather than leave them to
    their next poll. With the poll an hour long, a thread still alive after stop() (which
    joins each for up to 5 s) means its wake-up was lost."""
    from linewatch.runtime.pipeline import runner

    monkeypatch.setattr(runner, "POLL_S", 3600.0)
    out = Collector()
    p = make_pipeline(FakeProcessor([("a", 0.0), ("b", 0.0)]), out, max_batch=1, max_delay_ms=0.0)
    p.start()
    p.submit(make_frame("cam0", 0))
    assert out.wait_for(1)
    p.stop(timeout_s=5.0)
    assert p.running_after_stop() == []


def test_stages_run_pipelined(started) -> None:
    # Batch 0 may only leave stage "b" once stage "a" is working on batch 1: run one stage
    # after the other and this deadlocks (and fails after 5 s) instead of passing.
    a_has_second = threading.Event()
    seen_by_a: list[int] = []

    def stage_a(images):
        seen_by_a.append(len(seen_by_a))
        if len(seen_by_a) == 2:
            a_has_second.set()
        return images

    def stage_b(images):
        if not a_has_second.is_set():
            assert a_has_second.wait(5.0), "stage a never got batch 1 while stage b held batch 0"
        return [InspectionResult(score=0.1, verdict="pass", threshold=0.5, heatmap=np.zeros((2, 2), np.float32), backend="fake") for _ in images]

    proc = FakeProcessor([("a", 0.0)])
    proc.stages = [("a", stage_a), ("b", stage_b)]
    out = Collector()
    p = started(make_pipeline(proc, out, max_batch=1, max_delay_ms=0.0))
    for i in range(4):
        p.submit(make_frame("cam0", i))
    assert out.wait_for(4)
    assert [v.verdict for v in out.verdicts] == ["pass"] * 4


def test_on_verdict_exception_does_not_lose_later_verdicts(started) -> None:
    got: list[int] = []
    done = threading.Event()

    def flaky(v) -> None:
        if v.frame_id == 1:
            raise OSError("socket gone")
        got.append(v.frame_id)
        if len(got) == 3:
            done.set()

    p = started(make_pipeline(FakeProcessor([("only", 0.0)]), flaky, max_batch=1, max_delay_ms=0.0))  # type: ignore[arg-type]
    for i in range(4):
        p.submit(make_frame("cam0", i))
    assert done.wait(2.0)
    assert got == [0, 2, 3]
    assert p.dead_threads() == []


def test_stuck_stage_is_reported_unhealthy(started) -> None:
    clock = FakeClock()
    proc = GatedProcessor()
    out = Collector()
    p = make_pipeline(proc, out, max_batch=1, max_delay_ms=0.0, deadline_ms=100.0, clock=clock)
    p.stall_s = 0.2
    started(p)
    assert p.healthy() == (True, "ok")
    p.submit(make_frame("cam0", 0, clock=clock))
    assert proc.entered.wait(5.0)
    clock.advance(0.19)
    assert p.healthy() == (True, "ok")
    clock.advance(0.02)
    ok, why = p.healthy()
    assert not ok and why == "stage only stuck for 0.2 s"
    proc.gate.set()


def test_frames_submitted_out_of_receive_order_are_answered_in_receive_order(started) -> None:
    # Ingest's decode threads can hand frames over out of order; arrival order is receive order.
    proc = FakeProcessor([("s", 0.01)])
    out = Collector()
    p = started(make_pipeline(proc, out, max_batch=1, max_delay_ms=0.0))
    t0 = time.monotonic()
    p.submit(make_frame("cam0", 1, received_mono=t0))
    p.submit(make_frame("cam0", 0, received_mono=t0 - 0.001))  # decoded later, received first
    p.submit_error("cam0", 2, "bad_shape", t0 + 0.001, time.time())
    assert out.wait_for(3, timeout_s=2.0)
    assert [v.frame_id for v in out.verdicts] == [0, 1, 2]


def test_released_verdicts_are_not_kept_alive_until_their_deadline(started) -> None:
    # The deadline heap holds every frame until its deadline; it must not hold its heatmap
    # (at 2000 frames/s x 2 s that would be ~800 MB of 224x224 maps).
    import gc
    import weakref

    proc = FakeProcessor([("only", 0.0)])
    inner = proc.stages[0][1]
    refs: list[weakref.ref] = []

    def only(images):
        results = inner(images)
        refs.extend(weakref.ref(r.heatmap) for r in results)
        return results

    proc.stages = [("only", only)]
    count = Collector()
    p = started(make_pipeline(proc, lambda v: count(Verdict(v.camera, v.frame_id, v.verdict, v.capture_ts)),
                              max_batch=4, deadline_ms=30_000.0))  # type: ignore[arg-type]
    for i in range(20):
        p.submit(make_frame("cam0", i))
    assert count.wait_for(20)
    p.stop()
    gc.collect()
    assert len(refs) == 20 and all(r() is None for r in refs)


def test_overlay_is_rendered_from_the_frames_own_image(started) -> None:
    seen: list[tuple[int, str]] = []

    def overlay(image, result) -> bytes:
        seen.append((int(image[0, 0, 0]), result.verdict))
        return b"jpeg-of-%d" % int(image[0, 0, 0])

    out = Collector()
    pipe = started(Pipeline(FakeProcessor([("only", 0.0)]), BatchConfig(max_batch=4, max_delay_ms=5.0),
                            PipelineConfig(), out, overlay=overlay))
    for i in range(4):
        pipe.submit(make_frame("cam", i))
    assert out.wait_for(4, timeout_s=5.0)
    verdicts = sorted(out.verdicts, key=lambda v: v.frame_id)
    pixel = [200 if i % 2 else 50 for i in range(4)]  # make_frame's value for frame i
    assert [v.overlay_jpeg for v in verdicts] == [b"jpeg-of-%d" % p for p in pixel]
    assert sorted(seen) == sorted((pixel[i], expected_verdict(i)) for i in range(4))


def test_frame_the_detector_cannot_judge_errors_alone(started) -> None:
    proc = FakeProcessor([("only", 0.0)])

    def check_image(image, name) -> None:
        if image[0, 0, 0] == 13:
            raise ValueError(f"{name}: wrong size")

    proc.check_image = check_image
    out = Collector()
    pipe = started(make_pipeline(proc, out, max_batch=4, max_delay_ms=20.0))
    for i, value in enumerate([50, 13, 200, 50]):
        pipe.submit(make_frame("cam", i, value=value))
    assert out.wait_for(4, timeout_s=5.0)
    by_id = {v.frame_id: v for v in out.verdicts}
    assert [by_id[i].verdict for i in range(4)] == ["pass", "error", "fail", "pass"]
    assert by_id[1].reason == "bad_image"
    assert [v.frame_id for v in out.verdicts] == [0, 1, 2, 3]  # still in order


def test_frames_are_decoded_in_the_first_stage_and_a_wrong_size_is_refused_before_decoding(started, monkeypatch) -> None:
    """Frames arrive read, not decoded (as ingest hands them on). One declaring another size
    than the bank's is answered bad_image without a decode; one whose bytes fail to decode is
    answered decode_failed alone; the others are judged, in order."""
    import cv2

    from linewatch import wire

    decoded: list[int] = []
    real_imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: (decoded.append(1), real_imdecode(*a, **k))[1])

    def read(frame_id: int, image: np.ndarray, encoding: str, corrupt: bool = False) -> wire.Frame:
        parts = wire.encode_frame("cam", frame_id, image, encoding=encoding)
        if corrupt:  # the header reads; the compressed pixels do not
            data = bytearray(parts[2])
            data[60:-20] = bytes(len(data) - 80)
            parts[2] = bytes(data)
        return wire.read_frame(parts, wire.ImageLimits(), time.time(), time.monotonic())

    proc = FakeProcessor([("only", 0.0)])
    proc.frame_size = (16, 16)
    out = Collector()
    metrics = Metrics()
    pipe = started(make_pipeline(proc, out, max_batch=4, max_delay_ms=20.0, metrics=metrics))
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    frames = [read(0, np.full((16, 16, 3), 50, np.uint8), "png"), read(1, np.full((16, 32, 3), 50, np.uint8), "png"),
              read(2, noise, "png", corrupt=True), read(3, np.full((16, 16, 3), 200, np.uint8), "raw")]
    for frame in frames:
        assert frame.image is None
        pipe.submit(frame)
    assert out.wait_for(4, timeout_s=5.0)
    assert [(v.frame_id, v.verdict, v.reason) for v in out.verdicts] == [
        (0, "pass", None), (1, "error", "bad_image"), (2, "error", "decode_failed"), (3, "fail", None)]
    assert len(decoded) == 2  # frames 0 and 2: the wrong size was never decoded, raw needs no decoder
    assert metrics.registry.get_sample_value("linewatch_stage_seconds_count", {"stage": "decode"}) >= 1


def test_grey_and_colour_frames_are_refused_before_decoding_on_a_bank_of_the_other_kind(started, monkeypatch) -> None:
    """A mono bank's processor: a colour frame is answered colour_image without a decode, grey
    frames are judged, 16-bit ones through the processor's sample window. A colour bank's
    processor answers a grey frame grey_image, again without a decode."""
    import cv2

    from linewatch import wire

    decoded: list[int] = []
    real_imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: (decoded.append(1), real_imdecode(*a, **k))[1])

    def read(frame_id: int, image: np.ndarray, pixel_format: str = "gray") -> wire.Frame:
        parts = wire.encode_frame("cam", frame_id, image, encoding="png", pixel_format=pixel_format)
        return wire.read_frame(parts, wire.ImageLimits(), time.time(), time.monotonic())

    def run(proc: FakeProcessor, frames: list[wire.Frame]) -> list[tuple[int, str, str | None]]:
        out = Collector()
        pipe = started(make_pipeline(proc, out, max_batch=4, max_delay_ms=20.0))
        for frame in frames:
            pipe.submit(frame)
        assert out.wait_for(len(frames), timeout_s=5.0)
        return [(v.frame_id, v.verdict, v.reason) for v in out.verdicts]

    mono = FakeProcessor([("only", 0.0)])
    mono.frame_size, mono.colour_mode, mono.sample_window = (16, 16), "mono", (1000, 2000)
    # 16-bit grey 1200 -> round(200 * 255 / 1000) = 51 (pass); 1600 -> 153 (fail); 8-bit 200 (fail)
    frames = [read(0, np.full((16, 16), 1200, np.uint16)), read(1, np.full((16, 16, 3), 50, np.uint8), "rgb"),
              read(2, np.full((16, 16), 1600, np.uint16)), read(3, np.full((16, 16), 200, np.uint8))]
    assert run(mono, frames) == [(0, "pass", None), (1, "error", "colour_image"), (2, "fail", None), (3, "fail", None)]
    assert len(decoded) == 3  # the colour frame was never decoded

    decoded.clear()
    colour = FakeProcessor([("only", 0.0)])
    colour.frame_size, colour.colour_mode = (16, 16), "colour"
    frames = [read(0, np.full((16, 16, 3), 50, np.uint8), "rgb"), read(1, np.full((16, 16), 50, np.uint8))]
    assert run(colour, frames) == [(0, "pass", None), (1, "error", "grey_image")]
    assert len(decoded) == 1


def test_refusal_reason_and_detail_say_what_arrived_and_what_the_bank_judges() -> None:
    from linewatch import wire

    proc = FakeProcessor([("only", 0.0)])
    proc.frame_size, proc.colour_mode = (16, 16), "mono"
    colour = wire.read_frame(wire.encode_frame("cam", 1, np.zeros((16, 16, 3), np.uint8), encoding="png"),
                             wire.ImageLimits(), 1.0, 1.0)
    reason, detail = Pipeline._unjudgeable(proc, colour)
    assert reason == "colour_image"
    assert detail == "arrived 16x16 png, 3 channels of 8 bits (0.0 MB decoded): a colour frame, the bank judges " \
                     "grey (mono) frames"
    proc.colour_mode = "colour"
    grey = wire.read_frame(wire.encode_frame("cam", 1, np.zeros((16, 16), np.uint8), pixel_format="gray"),
                           wire.ImageLimits(), 1.0, 1.0)
    assert Pipeline._unjudgeable(proc, grey)[0] == "grey_image"
    proc.colour_mode = None  # a processor that does not say: either is judged
    assert Pipeline._unjudgeable(proc, grey) is None


def test_record_stream_reaches_every_tensor_of_a_detector_batch() -> None:
    # The stage data is the detector's Batch dataclass; walking only lists and dicts protected
    # nothing (issue #8). A stand-in for torch records which "CUDA tensors" were marked.
    import types

    from linewatch.detector.inspector import Batch, Encoded
    from linewatch.detector.match import MatchResult
    from linewatch.runtime.pipeline.runner import _record_stream

    class FakeTensor:
        def __init__(self, name: str, is_cuda: bool = True) -> None:
            self.name, self.is_cuda, self.streams = name, is_cuda, []

        def record_stream(self, stream) -> None:
            self.streams.append(stream)

    fake_torch = types.SimpleNamespace(Tensor=FakeTensor)
    tensors = {name: FakeTensor(name) for name in ("features", "matches", "maps", "listed", "cpu")}
    tensors["cpu"].is_cuda = False
    encoded = Encoded(**{f.name: None for f in dataclasses.fields(Encoded)})
    encoded.features = tensors["features"]
    match = MatchResult(**{f.name: None for f in dataclasses.fields(MatchResult)})
    match.matches = tensors["matches"]
    batch = Batch(images=[np.zeros((2, 2, 3), np.uint8)], encoded=encoded, match=match,
                  object_maps=tensors["maps"], timings={"x": 0.1})
    batch.sizes = [tensors["listed"], tensors["cpu"]]  # any nesting
    _record_stream(batch, fake_torch, "stream-1")
    assert {n: t.streams for n, t in tensors.items()} == {
        "features": ["stream-1"], "matches": ["stream-1"], "maps": ["stream-1"], "listed": ["stream-1"], "cpu": []}
