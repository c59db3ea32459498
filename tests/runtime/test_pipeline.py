"""Pipeline: one verdict per frame, order per camera, deadlines, failures, drain, pipelining."""

from __future__ import annotations

import threading
import time

import pytest

from linewatch.config import BatchConfig, PipelineConfig
from linewatch.runtime.metrics import Metrics
from linewatch.runtime.pipeline import Pipeline
from tests.runtime.fakes import Collector, FakeProcessor, expected_verdict, make_frame, make_pipeline


@pytest.fixture
def started():
    """Start pipelines and always stop them (bounded), even when a test fails."""
    pipes: list[Pipeline] = []

    def start(p: Pipeline) -> Pipeline:
        p.start()
        pipes.append(p)
        return p

    yield start
    for p in pipes:
        p.stop(timeout_s=2.0)


def counter_value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


def test_overload_gives_exactly_one_verdict_per_frame_in_order(started) -> None:
    # Capacity: 3 stages, the slowest 20 ms per batch of <= 4 -> ~200 frames/s.
    # Offered: 2 cameras x 150 frames in ~0.3 s -> ~1000 frames/s, so frames are shed.
    proc = FakeProcessor([("pre", 0.005), ("net", 0.02), ("post", 0.005)])
    out = Collector()
    metrics = Metrics()
    p = started(make_pipeline(proc, out, max_batch=4, max_pending=16, deadline_ms=400, metrics=metrics))
    n_per_cam = 150
    for i in range(n_per_cam):
        for cam in ("cam0", "cam1"):
            p.submit(make_frame(cam, i))
        time.sleep(0.002)
    n = 2 * n_per_cam
    assert out.wait_for(n, timeout_s=10.0), f"only {len(out.verdicts)} of {n} verdicts"
    time.sleep(0.1)  # nothing more may arrive
    assert len(out.verdicts) == n
    by_cam = out.by_camera()
    assert by_cam["cam0"] == list(range(n_per_cam))  # each id once, in arrival order
    assert by_cam["cam1"] == list(range(n_per_cam))
    counts = out.counts()
    assert sum(counts.values()) == n
    assert counts.get("shed", 0) > 0, counts  # overload must shed, with an answer
    assert counts.get("pass", 0) + counts.get("fail", 0) > 0, counts
    for v in out.verdicts:
        if v.verdict in ("pass", "fail"):
            assert v.verdict == expected_verdict(v.frame_id)
            assert v.backend == "fake" and v.bank_id == "bank-test"
            assert set(v.timings) >= {"pre", "net", "post", "inner"}
            assert v.latency_s is not None and v.latency_s >= 0
        elif v.verdict == "shed":
            assert v.reason == "pending_full"
    assert max(proc.batch_sizes) <= 4
    # The metrics tell the same story.
    for value, k in counts.items():
        got = sum(counter_value(metrics, "linewatch_verdicts_total", {"camera": c, "verdict": value})
                  for c in ("cam0", "cam1"))
        assert got == k, (value, got, k)
    assert counter_value(metrics, "linewatch_frames_received_total", {"camera": "cam0"}) == n_per_cam
    assert counter_value(metrics, "linewatch_frames_shed_total", {"reason": "pending_full"}) == counts["shed"]
    assert p.inflight() == 0
    assert p.stats()["received"] == n


def test_lone_frame_goes_out_within_max_delay(started) -> None:
    proc = FakeProcessor([("only", 0.0)])
    out = Collector()
    p = started(make_pipeline(proc, out, max_batch=8, max_delay_ms=30.0))
    t0 = time.monotonic()
    p.submit(make_frame("cam0", 1))
    assert out.wait_for(1, timeout_s=2.0)
    took = out.times[0] - t0
    assert took < 0.030 + 0.1, took  # max_delay plus generous scheduling slack
    assert proc.batch_sizes == [1]
    assert out.verdicts[0].verdict == "fail"


def test_deadline_answers_timeout_and_discards_late_result(started) -> None:
    proc = FakeProcessor([("slow", 0.4)])
    out = Collector()
    metrics = Metrics()
    p = started(make_pipeline(proc, out, max_batch=1, max_delay_ms=0.0, deadline_ms=100.0, metrics=metrics))
    frame = make_frame("cam0", 7)
    p.submit(frame)
    assert out.wait_for(1, timeout_s=2.0)
    v = out.verdicts[0]
    assert v.verdict == "timeout" and v.reason == "deadline_exceeded"
    waited = out.times[0] - frame.received_mono
    assert 0.09 <= waited < 0.3, waited
    # The result arrives at ~0.4 s: discarded, counted, and no second verdict.
    deadline = time.monotonic() + 2.0
    while counter_value(metrics, "linewatch_late_results_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counter_value(metrics, "linewatch_late_results_total") == 1
    assert len(out.verdicts) == 1
    assert counter_value(metrics, "linewatch_frames_timed_out_total", {"camera": "cam0"}) == 1


def test_deadline_counts_from_received_time_not_submit_time(started) -> None:
    proc = FakeProcessor([("slow", 0.3)])
    out = Collector()
    p = started(make_pipeline(proc, out, max_batch=1, max_delay_ms=0.0, deadline_ms=100.0))
    p.submit(make_frame("cam0", 1, received_mono=time.monotonic() - 1.0))  # sat 1 s in ingest
    assert out.wait_for(1, timeout_s=1.0)
    assert out.verdicts[0].verdict == "timeout"
    assert out.times[0] - (time.monotonic() - 1.0) < 1.2


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
    proc = FakeProcessor([("slow", 0.1)])
    out = Collector()
    p = started(make_pipeline(proc, out, max_batch=1, max_delay_ms=0.0))
    p.submit(make_frame("cam0", 1))
    p.submit_error("cam0", 2, "bad_payload", time.monotonic(), time.time())
    p.submit_error("cam1", 9, "bad_payload", time.monotonic(), time.time())
    assert out.wait_for(3, timeout_s=2.0)
    # cam1 is not held back by cam0's slow frame; cam0's error waits for frame 1.
    assert [(v.camera, v.frame_id) for v in out.verdicts] == [("cam1", 9), ("cam0", 1), ("cam0", 2)]
    assert out.verdicts[2].verdict == "error" and out.verdicts[2].reason == "bad_payload"


def test_drain_answers_everything_in_flight_then_sheds_new_frames(started) -> None:
    proc = FakeProcessor([("a", 0.01), ("b", 0.02)])
    out = Collector()
    p = started(make_pipeline(proc, out, max_batch=2, max_delay_ms=10_000.0, deadline_ms=5000.0))
    for i in range(21):  # an odd count leaves a lone frame waiting for company
        p.submit(make_frame("cam0", i))
    t0 = time.monotonic()
    assert p.drain(timeout_s=5.0) is True
    assert time.monotonic() - t0 < 2.0  # did not wait for the 10 s batch delay
    assert len(out.verdicts) == 21
    assert [v.verdict for v in out.verdicts] == [expected_verdict(i) for i in range(21)]
    p.submit(make_frame("cam0", 99))
    assert out.wait_for(22, timeout_s=2.0)
    assert out.verdicts[-1].verdict == "shed" and out.verdicts[-1].reason == "shutting_down"


def test_drain_timeout_and_stop_still_answer_every_frame() -> None:
    proc = FakeProcessor([("stuck", 1.0)])
    out = Collector()
    p = make_pipeline(proc, out, max_batch=1, max_delay_ms=0.0, deadline_ms=10_000.0)
    p.start()
    for i in range(5):
        p.submit(make_frame("cam0", i))
    t0 = time.monotonic()
    assert p.drain(timeout_s=0.2) is False
    p.stop(timeout_s=2.0)
    assert time.monotonic() - t0 < 4.0
    assert [v.frame_id for v in out.verdicts] == list(range(5))
    assert {v.verdict for v in out.verdicts} == {"timeout"}
    assert {v.reason for v in out.verdicts} == {"shutdown"}


def test_stages_run_pipelined_near_the_slowest_stage_bound(started) -> None:
    costs = [("pre", 0.010), ("net", 0.020), ("post", 0.010)]
    proc = FakeProcessor(costs)
    out = Collector()
    p = started(make_pipeline(proc, out, max_batch=1, max_delay_ms=0.0, max_pending=256, deadline_ms=30_000.0))
    n = 50
    for i in range(n):
        p.submit(make_frame("cam0", i))
    assert out.wait_for(n, timeout_s=10.0)
    # Steady state: from the first verdict to the last, one batch per slowest-stage cost.
    rate = (n - 1) / (out.times[-1] - out.times[0])
    bound = 1 / max(c for _, c in costs)  # 50 batches/s; sequential would be 25
    assert rate > 0.6 * bound, f"{rate:.1f} batches/s vs bound {bound:.1f}"
    assert [v.verdict for v in out.verdicts] == [expected_verdict(i) for i in range(n)]


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
    proc = FakeProcessor([("stuck", 0.5)])
    out = Collector()
    p = make_pipeline(proc, out, max_batch=1, max_delay_ms=0.0, deadline_ms=100.0)
    p.stall_s = 0.2
    started(p)
    assert p.healthy() == (True, "ok")
    p.submit(make_frame("cam0", 0))
    time.sleep(0.35)
    ok, why = p.healthy()
    assert not ok and "stuck" in why


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
    count = []
    p = started(make_pipeline(proc, lambda v: count.append(1), max_batch=4, deadline_ms=30_000.0))  # type: ignore[arg-type]
    for i in range(20):
        p.submit(make_frame("cam0", i))
    end = time.monotonic() + 2.0
    while len(count) < 20 and time.monotonic() < end:
        time.sleep(0.01)
    assert len(count) == 20
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


def test_overload_keeps_judging_at_capacity_instead_of_timing_out_everything(started) -> None:
    # Capacity: slowest stage 40 ms per batch of <= 4 -> ~100 frames/s. Offered: ~400 frames/s
    # for 1.5 s with a 300 ms deadline. Without shedding hopeless frames before work, the
    # stages fill with frames that time out while queued and almost nothing is judged.
    proc = FakeProcessor([("pre", 0.01), ("net", 0.04), ("post", 0.01)])
    out = Collector()
    pipe = started(make_pipeline(proc, out, max_batch=4, max_delay_ms=2.0, max_pending=64, deadline_ms=300.0))
    sent, start = 0, time.monotonic()
    while time.monotonic() - start < 1.5:
        pipe.submit(make_frame("cam", sent))
        sent += 1
        time.sleep(0.0025)
    assert out.wait_for(sent, timeout_s=10.0)
    counts = {}
    for v in out.verdicts:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    judged = counts.get("pass", 0) + counts.get("fail", 0)
    assert len(out.verdicts) == sent and sorted(v.frame_id for v in out.verdicts) == list(range(sent))
    assert judged >= 0.4 * 100 * 1.5, counts  # most of the ~150 frames capacity allows
    assert counts.get("shed", 0) > 0, counts


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
