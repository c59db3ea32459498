"""The self-check (linewatch.runtime.selfcheck) on a fake clock: its schedule, the judgement of
each reference's verdict, a round driven step by step, what it writes to the metrics; then
the pipeline core numbering its verdicts apart."""

from __future__ import annotations

import math

import numpy as np
import pytest

from linewatch.config import BatchConfig, PipelineConfig, SelfCheckConfig
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.pipeline.core import PipelineCore
from linewatch.runtime.selfcheck import Reference, Schedule, SelfCheck, judge
from linewatch.wire import Verdict
from tests.runtime.fakes import FakeClock, quiet_log

GOOD = Reference("good/a.png", "pass", np.full((6, 5, 3), 50, np.uint8))
BAD = Reference("bad/b.png", "fail", np.full((6, 5, 3), 200, np.uint8))


def verdict(value: str, score: float | None = None, threshold: float | None = 1.0, frame_id: int = 0,
            reason: str | None = None) -> Verdict:
    return Verdict(camera="_selfcheck", frame_id=frame_id, verdict=value, capture_ts=0.0, score=score,
                   threshold=threshold if score is not None else None, reason=reason)


# ---------------------------------------------------------------- schedule


def test_schedule_is_due_at_start_then_interval_after_each_start() -> None:
    s = Schedule(60.0)
    assert s.due(1000.0) and s.seconds_until_due(1000.0) == 0.0
    s.started(1000.0)
    assert not s.due(1059.9)
    assert s.seconds_until_due(1030.0) == 30.0
    assert s.due(1060.0)
    s.started(1075.0)  # a round that started late: the next one is 60 s after it
    assert not s.due(1134.0) and s.due(1135.0)
    s.now()  # a bank switch: at once
    assert s.due(1076.0)
    with pytest.raises(ValueError):
        Schedule(0.0)


# ---------------------------------------------------------------- judgement


def test_judge_by_hand() -> None:
    # a good reference passing at 0.5 of the threshold, drift fraction 0.9: fine
    c = judge(GOOD, verdict("pass", 0.5), 0.9)
    assert c.ok and c.failure is None and c.ratio == 0.5
    # at 0.9 exactly: not past the fraction; at 0.95: drift
    assert judge(GOOD, verdict("pass", 0.9), 0.9).ok
    c = judge(GOOD, verdict("pass", 0.95), 0.9)
    assert c.failure == "drift" and "0.95" in c.detail
    # a good one failing, a bad one passing: wrong verdicts
    assert judge(GOOD, verdict("fail", 1.2), 0.9).failure == "wrong_verdict"
    assert judge(BAD, verdict("pass", 0.3), 0.9).failure == "wrong_verdict"
    # a bad one failing is fine, however far above the threshold
    assert judge(BAD, verdict("fail", 7.0), 0.9).ok
    # no pass/fail at all
    c = judge(GOOD, verdict("shed", reason="over_share"), 0.9)
    assert c.failure == "not_judged" and c.detail == "shed (over_share)" and c.ratio is None
    assert judge(BAD, verdict("timeout", reason="deadline_exceeded"), 0.9).failure == "not_judged"
    # an uncalibrated bank (threshold inf): nothing can drift
    assert judge(GOOD, verdict("pass", 3.0, threshold=math.inf), 0.9).ok
    # a judged verdict without a score (a processor's bug) is still judged by its value
    c = judge(BAD, Verdict(camera="_selfcheck", frame_id=0, verdict="pass", capture_ts=0.0), 0.9)
    assert c.failure == "wrong_verdict" and c.detail == "pass, expected fail: score none, threshold none"


# ---------------------------------------------------------------- a round, step by step


class Harness:
    def __init__(self, references: list[Reference] | None, interval_s: float = 60.0, drift: float = 0.9,
                 submit_error: Exception | None = None) -> None:
        self.clock = FakeClock()
        self.metrics = Metrics()
        self.frames = []
        self.submit_error = submit_error
        config = SelfCheckConfig(enabled=True, interval_s=interval_s, drift_fraction=drift)
        self.check = SelfCheck(config, self._submit, self.metrics, quiet_log(), self.clock)
        if references is not None:
            self.check.set_references(references)

    def _submit(self, frame) -> None:
        if self.submit_error is not None:
            raise self.submit_error
        self.frames.append(frame)

    def answer(self, value: str, score: float | None) -> None:
        """The verdict of the last frame submitted, as the pipeline would release it."""
        frame = self.frames[-1]
        self.check.on_verdict(verdict(value, score, frame_id=frame.frame_id))

    def sample(self, name: str, **labels) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


def test_a_round_puts_each_reference_in_one_at_a_time_and_passes() -> None:
    h = Harness([GOOD, BAD])
    assert h.sample("linewatch_selfcheck_interval_seconds") == 60.0
    assert h.sample("linewatch_selfcheck_failures_total", kind="wrong_verdict") == 0.0  # exists from the start
    assert h.check.poll()  # due at start: the first reference goes in
    assert len(h.frames) == 1
    frame = h.frames[0]
    # as a camera sends it: the reserved camera, PNG bytes read but not decoded, captured now
    assert frame.camera == "_selfcheck" and frame.image is None and frame.encoded.encoding == "png"
    assert frame.capture_ts == h.clock.time() and frame.received_mono == h.clock.monotonic()
    assert np.array_equal(frame.decoded(), GOOD.image)  # lossless
    assert h.check.poll() and len(h.frames) == 1  # no second frame before the first one's verdict
    h.check.on_verdict(verdict("pass", 0.4, frame_id=frame.frame_id + 1))  # not the one in flight: ignored
    assert h.check.poll() and len(h.frames) == 1
    h.answer("pass", 0.4)
    assert h.check.poll() and len(h.frames) == 2
    assert np.array_equal(h.frames[1].decoded(), BAD.image) and h.frames[1].frame_id != frame.frame_id
    h.clock.advance(0.25)
    h.answer("fail", 2.0)
    assert not h.check.poll()  # judged, and the round is over
    last = h.check.last
    assert last.ok and [c.reference for c in last.checks] == ["good/a.png", "bad/b.png"]
    assert last.finished - last.started == 0.25
    assert not h.check.failing
    assert h.sample("linewatch_selfcheck_rounds_total", result="pass") == 1.0
    assert h.sample("linewatch_selfcheck_failing") == 0.0
    assert h.sample("linewatch_selfcheck_last_ok_timestamp_seconds") == h.clock.time()
    assert h.sample("linewatch_selfcheck_score_ratio", reference="good/a.png") == 0.4
    assert h.sample("linewatch_selfcheck_score_ratio", reference="bad/b.png") == 2.0
    # the next round: interval_s after the start of this one
    h.clock.advance(59.0)
    assert not h.check.poll() and len(h.frames) == 2
    assert h.check.state()["next_in_s"] == pytest.approx(0.75)
    h.clock.advance(0.75)
    assert h.check.poll() and len(h.frames) == 3


def test_a_wrong_verdict_and_a_drift_fail_the_round_and_are_counted() -> None:
    good2 = Reference("good/c.png", "pass", np.full((6, 5, 3), 60, np.uint8))
    h = Harness([GOOD, good2, BAD], drift=0.8)
    ok_before = h.sample("linewatch_selfcheck_last_ok_timestamp_seconds")
    h.check.poll()
    h.answer("pass", 0.85)  # good, but past 0.8 x threshold: drift
    h.check.poll()
    h.answer("pass", 0.1)  # fine
    h.check.poll()
    h.answer("pass", 0.3)  # a bad part passed: wrong verdict
    assert not h.check.poll()
    assert h.check.failing
    state = h.check.state()["last"]
    assert state["ok"] is False and state["failed"] == ["good/a.png", "bad/b.png"]
    assert [c["failure"] for c in state["checks"]] == ["drift", None, "wrong_verdict"]
    assert h.sample("linewatch_selfcheck_failures_total", kind="drift") == 1.0
    assert h.sample("linewatch_selfcheck_failures_total", kind="wrong_verdict") == 1.0
    assert h.sample("linewatch_selfcheck_failures_total", kind="not_judged") == 0.0
    assert h.sample("linewatch_selfcheck_rounds_total", result="fail") == 1.0
    assert h.sample("linewatch_selfcheck_failing") == 1.0
    assert h.sample("linewatch_selfcheck_last_ok_timestamp_seconds") == ok_before == 0.0
    assert h.sample("linewatch_selfcheck_last_timestamp_seconds") == h.clock.time()


def test_a_frame_that_cannot_go_in_or_no_references_fail_the_round() -> None:
    h = Harness([GOOD], submit_error=RuntimeError("pipeline stopped"))
    assert h.check.poll()  # submitting failed: that reference is not judged
    assert not h.check.poll()
    assert h.check.last.checks[0].failure == "not_judged" and "pipeline stopped" in h.check.last.checks[0].detail
    h = Harness(None)  # no references were ever set
    assert not h.check.poll() and h.frames == []
    assert h.check.failing and h.check.last.checks[0].failure == "no_references"
    assert h.sample("linewatch_selfcheck_failures_total", kind="no_references") == 1.0
    h.check.set_references(None, error="the bank's good images are gone")  # a bank switch whose references failed
    assert not h.check.poll()
    assert h.check.last.checks[0].detail == "the bank's good images are gone"


def test_new_references_are_checked_at_once_and_a_running_round_keeps_its_own() -> None:
    h = Harness([GOOD])
    h.check.poll()
    h.check.set_references([BAD])  # while the round with GOOD runs
    h.answer("pass", 0.1)
    assert not h.check.poll()
    assert [c.reference for c in h.check.last.checks] == ["good/a.png"]
    assert h.check.poll()  # due at once, not interval_s later
    assert np.array_equal(h.frames[-1].decoded(), BAD.image)


# ---------------------------------------------------------------- numbered apart


def test_private_camera_verdicts_are_numbered_apart() -> None:
    """The self-check's verdicts take no number of the published sequence: a subscriber of the
    published verdicts sees 0, 1, 2, ... with no gap where a self-check frame went."""
    clock = FakeClock()
    core = PipelineCore(BatchConfig(max_batch=4), PipelineConfig(deadline_ms=1000.0), 1, clock, Metrics(),
                        run_id="r1", private_cameras=frozenset({"_selfcheck"}))
    for i in range(6):
        slot = core.register("_selfcheck" if i % 2 else "cam", i, clock.time(), clock.time(), clock.monotonic())
        core.answer_simple(slot, "error", "test")
    released = core.take_released()
    assert [(v.camera, v.id) for v in released] == [
        ("cam", "r1-0"), ("_selfcheck", "r1._selfcheck-0"), ("cam", "r1-1"), ("_selfcheck", "r1._selfcheck-1"),
        ("cam", "r1-2"), ("_selfcheck", "r1._selfcheck-2")]


# ---------------------------------------------------------------- in a daemon (real sockets, this process)


def _daemon(references, unready_on_failure: bool = False):
    from linewatch.config import SelfCheckConfig
    from linewatch.runtime.daemon import Daemon
    from tests.runtime.fakes import FakeProcessor
    from tests.runtime.line import runtime_config

    config = runtime_config()
    config.selfcheck = SelfCheckConfig(enabled=True, interval_s=3600.0, unready_on_failure=unready_on_failure)
    return Daemon(config, FakeProcessor([("only", 0.0)]), log=quiet_log(), selfcheck_references=references)


def test_daemon_routes_selfcheck_verdicts_to_the_selfcheck_alone() -> None:
    """The fake processor passes pixel value 50 (score 0.2 of threshold 0.5) and fails 200.
    The round at start passes; a second round (asked for once the subscriber is connected)
    reaches no subscriber, whose verdicts stay numbered without a gap; a real sender using the
    reserved id is dropped and counted."""
    import json

    from tests.runtime.line import Line, http
    from tests.waiting import wait_until

    loaded = []

    def references(processor):
        loaded.append(processor.bank_id)
        return [GOOD, BAD]

    daemon = _daemon(references)
    daemon.start()
    line = Line(daemon)
    m = daemon.metrics.registry.get_sample_value
    try:
        assert loaded == ["bank-test"]
        assert wait_until(lambda: m("linewatch_selfcheck_rounds_total", {"result": "pass"}) == 1.0, 10.0)
        line.warm_up()
        daemon.selfcheck.set_references(references(daemon.processor))  # what a bank switch does: a round at once
        assert wait_until(lambda: m("linewatch_selfcheck_rounds_total", {"result": "pass"}) == 2.0, 10.0)
        line.send("_selfcheck", 0, 200)  # an impostor: dropped unread
        for i in range(3):
            line.send("cam0", i, 50)
        got = [line.recv(5.0) for _ in range(3)]
        assert [(v.camera, v.frame_id, v.verdict) for v in got] == [("cam0", i, "pass") for i in range(3)]
        assert line.recv(0.3) is None  # nothing else: no self-check verdict, no answer to the impostor
        assert [v.seq for v in got] == list(range(got[0].seq, got[0].seq + 3))
        assert m("linewatch_messages_dropped_total", {"reason": "reserved_camera"}) == 1.0
        assert m("linewatch_selfcheck_failing") == 0.0
        assert daemon.publisher.wait_idle(5.0)
        # the publisher sent the probes and cam0's frames, none of the 4 self-check frames
        stats = daemon.pipeline.stats()
        assert daemon.publisher.published == stats["received"] - 4
        # the live page shows the last round (its first state.json imports the backends, torch:
        # done here, so that a loaded machine's import time is not the request's)
        import linewatch.detector.backends  # noqa: F401

        status, body = http(daemon.health.port, "/live/state.json")
        shown = json.loads(body)["daemon"]["selfcheck"]
        assert status == 200 and shown["last"]["ok"] is True and shown["camera"] == "_selfcheck"
        assert [c["reference"] for c in shown["last"]["checks"]] == ["good/a.png", "bad/b.png"]
        assert http(daemon.health.port, "/readyz")[0] == 200
    finally:
        line.close()
        daemon.stop()


def test_daemon_with_a_failing_reference_is_unready_when_asked_to_be() -> None:
    from tests.runtime.line import http
    from tests.waiting import wait_until

    mislabelled = Reference("good/actually-bad.png", "pass", BAD.image)
    daemon = _daemon(lambda processor: [GOOD, mislabelled], unready_on_failure=True)
    daemon.start()
    m = daemon.metrics.registry.get_sample_value
    try:
        assert wait_until(lambda: m("linewatch_selfcheck_rounds_total", {"result": "fail"}) == 1.0, 10.0)
        assert m("linewatch_selfcheck_failures_total", {"kind": "wrong_verdict"}) == 1.0
        status, body = http(daemon.health.port, "/readyz")
        assert status == 503 and "self-check failed (good/actually-bad.png)" in body
    finally:
        daemon.stop()


def test_daemon_refuses_to_start_without_its_references() -> None:
    def references(processor):
        raise ValueError("selfcheck: /nowhere/000.png: no such file")

    daemon = _daemon(references)
    with pytest.raises(RuntimeError, match="no such file"):
        daemon.start()
    assert daemon.health is not None and daemon.dead_threads() == []


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("runtime, message", [
    ({"selfcheck": {"enabled": True}, "ingest": {"cameras": ["cam0", "_selfcheck"]}},
     "ingest.cameras lists '_selfcheck', the camera id selfcheck.camera reserves"),
    ({"selfcheck": {"enabled": True, "good_count": 0, "bad_count": 0}}, "selfcheck is enabled without references"),
    ({"selfcheck": {"enabled": True, "good_count": 0, "bad_count": 2}}, "bad_count (2) references are made from good"),
    ({"selfcheck": {"enabled": True, "drift_fraction": 0}}, "drift_fraction"),
    ({"selfcheck": {"enabled": True, "interval_s": 0.5}}, "interval_s"),
    ({"selfcheck": {"enabled": True, "camera": "bad\nid"}}, "must be printable"),
])
def test_config_refuses(runtime, message) -> None:
    from linewatch.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({"runtime": runtime})


def test_config_leaves_a_camera_named_like_it_alone_while_off() -> None:
    from linewatch.config import config_from_dict

    config = config_from_dict({"runtime": {"ingest": {"cameras": ["_selfcheck"]}, "selfcheck": {"bad": ["x.png"]}}})
    assert not config.runtime.selfcheck.enabled
