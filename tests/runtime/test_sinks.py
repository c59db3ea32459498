"""Verdict sinks as one list: a dummy sink registered the way a backend is (one `register` line)
is built, started, fed in order, watched and stopped by a real daemon over real sockets, and a
sink that raises loses only its own copy. Plus the Outcome every sink receives and the registry."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading

import numpy as np
import pytest

import linewatch.runtime.sinks.outcome as outcome_module
from linewatch.config import AckedConfig, ArchiveConfig, MqttConfig
from linewatch.runtime.daemon import Daemon
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.sinks.outcome import Outcome
from linewatch.runtime.sinks import SINKS, Sink, SinkContext, build_sinks, register
from linewatch.wire import Verdict
from tests.runtime.fakes import FakeClock, FakeProcessor, quiet_log
from tests.runtime.line import Line, http, runtime_config


class DummySink(Sink):
    """Records what the daemon does to it in `events` (shared by the dummies of one test, so
    their order shows); keeps one worker thread alive until `kill()`; raises on the verdicts
    `fail_on` picks."""

    wants_image = True

    def __init__(self, name: str, events: list[tuple], fail_on=lambda verdict: False) -> None:
        self.name = name
        self.target = self
        self.events = events
        self.fail_on = fail_on
        self.outcomes: list[Outcome] = []
        self.queued = 0  # what `pending` reports (the queue depth gauge)
        self._die = threading.Event()
        self.worker = threading.Thread(target=self._die.wait, name=f"{name}-worker", daemon=True)
        self._stopped = False

    def start(self) -> None:
        self.events.append(("start", self.name))
        self.worker.start()

    def publish(self, outcome: Outcome) -> None:
        self.events.append(("publish", self.name, outcome.verdict.camera, outcome.verdict.frame_id))
        if self.fail_on(outcome.verdict):
            raise RuntimeError(f"{self.name} cannot take {outcome.verdict.frame_id}")
        self.outcomes.append(outcome)

    def stop(self) -> None:
        self.events.append(("stop", self.name))
        self._stopped = True
        self._die.set()

    @property
    def pending(self) -> int:
        return self.queued

    def dead_threads(self) -> list[str]:
        if self.worker.ident is None or self._stopped:
            return []
        return [] if self.worker.is_alive() else [self.worker.name]

    def kill(self) -> None:
        """Its worker thread ends while the sink runs (a bug in a real sink)."""
        self._die.set()
        self.worker.join(10.0)


@pytest.fixture
def registered():
    """Registers sink factories for one test (the real ones register in linewatch.runtime.sinks)."""
    sections = []

    def add(section: str, factory, before: str | None = None):
        sections.append(section)
        return register(section, factory, before=before)

    yield add
    for section in sections:
        SINKS.pop(section, None)


def judged(line: Line, n: int) -> list:
    """The next n verdicts over ZeroMQ (warm-up probes skipped)."""
    got = [line.recv(10.0) for _ in range(n)]
    assert None not in got, got
    return got


def test_a_registered_sink_is_started_fed_in_order_watched_and_stopped(registered) -> None:
    events: list[tuple] = []
    sinks: dict[str, DummySink] = {}

    def factory(name: str, **kw):
        def build(context: SinkContext) -> DummySink:
            assert context.config.publish.url == "tcp://127.0.0.1:*"  # its factory sees the runtime config
            sinks[name] = DummySink(name, events, **kw)
            return sinks[name]
        return build

    registered("dummy_first", factory("first"), before="publish")  # sees each verdict before it leaves
    registered("dummy_second", factory("second"))  # after every other sink
    daemon = Daemon(runtime_config(), FakeProcessor([("net", 0.0)]), log=quiet_log())
    assert [s.name for s in daemon.sinks] == ["live", "first", "publish", "second"]
    assert events == []  # built, not started
    daemon.start()
    line = Line(daemon)
    try:
        assert events == [("start", "first"), ("start", "second")]  # in list order, before any verdict
        line.warm_up()
        for i in range(6):
            line.send("cam0", i, 200 if i % 2 else 50)
        got = judged(line, 6)
        assert [(v.frame_id, v.verdict) for v in got] == [(i, "fail" if i % 2 else "pass") for i in range(6)]
        assert line.wait(lambda: sum(1 for o in sinks["second"].outcomes if o.verdict.camera == "cam0") == 6)

        fed = [e for e in events if e[0] == "publish" and e[2] == "cam0"]
        # each verdict to both, the first before the second, verdicts in release order
        assert fed == [("publish", name, "cam0", i) for i in range(6) for name in ("first", "second")]
        for sink in sinks.values():
            cam0 = [o for o in sink.outcomes if o.verdict.camera == "cam0"]
            assert [o.verdict.seq for o in cam0] == sorted(o.verdict.seq for o in cam0)
            assert all(o.image is not None and o.verdict.image is None for o in cam0)  # the image beside the verdict
        first, second = ([o for o in sinks[name].outcomes if o.verdict.camera == "cam0"] for name in ("first", "second"))
        assert len(first) == len(second) == 6 and all(a is b for a, b in zip(first, second))  # one Outcome, shared

        sinks["second"].queued = 7
        assert daemon.metrics.registry.get_sample_value("linewatch_queue_depth", {"queue": "second"}) == 7

        assert http(daemon.health.port, "/healthz") == (200, "ok\n")
        sinks["first"].kill()
        assert daemon.dead_threads() == ["first-worker"]
        assert http(daemon.health.port, "/healthz") == (503, "dead threads: first-worker\n")
    finally:
        line.close()
        daemon.stop()
    stops = [e for e in events if e[0] == "stop"]
    assert stops == [("stop", "second"), ("stop", "first")]  # the last first
    assert events[-2:] == stops  # after the last verdict: the pipeline drained first


def test_a_sink_that_raises_loses_its_copy_and_nothing_else(registered) -> None:
    events: list[tuple] = []
    sinks: dict[str, DummySink] = {}

    def build(name: str, **kw):
        def factory(context: SinkContext) -> DummySink:
            sinks[name] = DummySink(name, events, **kw)
            return sinks[name]
        return factory

    registered("dummy_flaky", build("flaky", fail_on=lambda v: v.verdict == "fail"), before="publish")
    registered("dummy_after", build("after"))
    log = io.StringIO()
    daemon = Daemon(runtime_config(), FakeProcessor([("net", 0.0)]), log=quiet_log(log, logging.INFO))
    daemon.start()
    line = Line(daemon)
    try:
        line.warm_up()
        for i in range(6):
            line.send("cam0", i, 200 if i % 2 else 50)
        got = judged(line, 6)  # every verdict left on ZeroMQ, the failed ones too
        assert [(v.frame_id, v.verdict) for v in got] == [(i, "fail" if i % 2 else "pass") for i in range(6)]
        assert line.wait(lambda: sum(1 for o in sinks["after"].outcomes if o.verdict.camera == "cam0") == 6)
        assert [o.verdict.frame_id for o in sinks["flaky"].outcomes if o.verdict.camera == "cam0"] == [0, 2, 4]
        dropped = daemon.metrics.registry.get_sample_value("linewatch_sink_dropped_total",
                                                           {"sink": "flaky", "reason": "exception"})
        assert dropped == 3
        failed = [json.loads(x) for x in log.getvalue().splitlines() if '"sink_failed"' in x]
        assert [(e["sink"], e["frame_id"]) for e in failed] == [("flaky", 1), ("flaky", 3), ("flaky", 5)]
        assert "cannot take 1" in failed[0]["error"]
    finally:
        line.close()
        daemon.stop()


def test_the_overlay_is_rendered_once_for_every_sink_that_wants_it(registered, overlay_renderings) -> None:
    rendered = overlay_renderings
    events: list[tuple] = []
    pictures: dict[str, list] = {"a": [], "b": []}

    class Drawing(DummySink):
        def publish(self, outcome: Outcome) -> None:
            super().publish(outcome)
            if outcome.verdict.verdict == "fail":
                pictures[self.name].append(outcome.overlay_jpeg())

    for name in ("a", "b"):
        registered(f"dummy_{name}", lambda context, name=name: Drawing(name, events))
    daemon = Daemon(runtime_config(), FakeProcessor([("net", 0.0)]), log=quiet_log())
    daemon.start()
    line = Line(daemon)
    try:
        line.warm_up()
        line.send("cam0", 7, 200)
        assert judged(line, 1)[0].verdict == "fail"
        assert line.wait(lambda: len(pictures["b"]) == 1)
        live = daemon.sinks.target("live")
        failure_id = live.state()["failures"][0]["id"]
        page = live.failure_jpeg(failure_id)  # the live page shows the same picture
        assert pictures["a"][0][:2] == b"\xff\xd8" and pictures["a"][0] is pictures["b"][0] is page
        assert rendered == [7]  # once, for the two sinks and the page
    finally:
        line.close()
        daemon.stop()


# ---------------------------------------------------------------- the record and the registry


def released(value: str = "fail", image: bool = True, **kw) -> Verdict:
    return Verdict(camera="cam0", frame_id=3, verdict=value, capture_ts=1.0, score=0.9, threshold=0.5,
                   heatmap=np.zeros((8, 8), np.float32), backend="fake", run_id="run", seq=3,
                   image=np.full((8, 8, 3), 90, np.uint8) if image else None, **kw)


def test_an_outcome_is_immutable_and_leaves_the_released_verdict_as_it_was() -> None:
    verdict = released()
    outcome = Outcome.of(verdict)
    assert verdict.image is not None  # not changed: the outcome's verdict is a copy without the image
    assert outcome.verdict.image is None and outcome.image is verdict.image and outcome.verdict == verdict
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.image = None  # type: ignore[misc]
    assert not outcome.overlay_rendered
    jpeg = outcome.overlay_jpeg()
    assert jpeg[:2] == b"\xff\xd8" and outcome.overlay_jpeg() is jpeg and outcome.overlay_rendered
    # rendered for the wire by the pipeline already: that rendering is the outcome's
    wired = Outcome.of(released(overlay_jpeg=b"\xff\xd8wire"))
    assert wired.overlay_rendered and wired.overlay_jpeg() == b"\xff\xd8wire"
    # nothing to draw: no image, or a verdict that was not judged
    assert Outcome.of(released(image=False)).overlay_jpeg() is None
    assert Outcome(Verdict(camera="c", frame_id=1, verdict="timeout", capture_ts=0.0)).overlay_jpeg() is None


def test_threads_asking_at_once_share_one_rendering(monkeypatch) -> None:
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow(image, verdict):
        calls.append(verdict.frame_id)
        entered.set()
        assert release.wait(10.0)
        return b"\xff\xd8one"

    monkeypatch.setattr(outcome_module, "overlay_jpeg", slow)
    outcome = Outcome.of(released())
    results: list[bytes | None] = []
    first = threading.Thread(target=lambda: results.append(outcome.overlay_jpeg()))
    first.start()
    assert entered.wait(10.0)  # the first is rendering; the second waits for its result
    second = threading.Thread(target=lambda: results.append(outcome.overlay_jpeg()))
    second.start()
    release.set()
    first.join(10.0)
    second.join(10.0)
    assert calls == [3] and results == [b"\xff\xd8one", b"\xff\xd8one"]


def test_the_registry_keeps_its_order_and_refuses_a_second_registration(registered, tmp_path) -> None:
    assert list(SINKS) == ["archive", "live", "publish", "acked", "mqtt"]  # the archive's row before ZeroMQ
    with pytest.raises(ValueError, match="already registered"):
        register("live", lambda context: None)
    registered("dummy_off", lambda context: None)  # a factory whose section leaves its sink off
    registered("dummy_front", lambda context: DummySink("front", []), before="archive")
    assert list(SINKS) == ["dummy_front", "archive", "live", "publish", "acked", "mqtt", "dummy_off"]
    config = runtime_config()
    config.archive = ArchiveConfig(enabled=True, path=str(tmp_path / "archive"))
    config.mqtt = MqttConfig(enabled=True, host="127.0.0.1")
    config.acked = AckedConfig(enabled=True, subscribers=["gate1"])
    context = SinkContext(config, Metrics(), quiet_log(), FakeClock(), status=dict)
    assert [s.name for s in build_sinks(context)] == ["front", "archive_row", "live", "publish", "acked", "mqtt"]
    config.live.enabled = False
    config.archive.enabled = False
    config.mqtt.enabled = False
    config.acked.enabled = False
    assert [s.name for s in build_sinks(context)] == ["front", "publish"]
