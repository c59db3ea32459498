"""The live page's state and routes: figures from hand-made verdicts on a fake clock, the ring of
failed parts and their overlays, the routes over a real HTTP server on loopback, readers and the
verdict path at once, and a daemon with the page off (404) and on."""

from __future__ import annotations

import json
import math
import threading
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from linewatch.config import LiveConfig, MetricsConfig
from linewatch.runtime.daemon import Daemon
from linewatch.runtime.ops.health import HealthServer
from linewatch.runtime.sinks.live import WINDOW_S, LiveView
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.sinks.outcome import Outcome
from linewatch.wire import Verdict
from tests.runtime.fakes import FakeClock, FakeProcessor, quiet_log
from tests.runtime.line import Line, runtime_config

STATUS = {"bank_id": "bank-a", "backend": "classic", "bank_images": 16, "ready": True, "version": "9.9"}


def verdict(value: str, frame_id: int = 0, latency_s: float | None = 0.05, image: bool = True, **kw) -> Outcome:
    """A released verdict as the daemon hands it to the sinks (pass/fail ones with a picture)."""
    judged = value in ("pass", "fail")
    picture = np.full((32, 48, 3), 90, np.uint8) if judged and image else None
    fields = dict(camera="cam0", part_id=f"P{frame_id}", score=0.9 if value == "fail" else 0.1 if judged else None,
                  threshold=0.5 if judged else None, latency_s=latency_s,
                  heatmap=np.zeros((32, 48), np.float32) if judged else None, image=picture, run_id="run", seq=frame_id)
    return Outcome.of(Verdict(frame_id=frame_id, verdict=value, capture_ts=1_700_000_000.0 + frame_id, **(fields | kw)))


def view(clock: FakeClock, recent_failures: int = 12, status: dict | None = None) -> LiveView:
    return LiveView(LiveConfig(recent_failures=recent_failures), status=lambda: dict(status or STATUS), clock=clock)


def get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


@pytest.fixture
def served_view():
    """A LiveView routed by a real HealthServer on a free loopback port."""
    servers: list[HealthServer] = []

    def make(live: LiveView) -> int:
        server = HealthServer(MetricsConfig(host="127.0.0.1", port=0), Metrics().registry, routes={"/live": live.handle})
        server.start()
        servers.append(server)
        return server.port

    yield make
    for s in servers:
        s.stop()


def test_rates_latency_percentiles_and_counts_by_hand() -> None:
    clock = FakeClock(mono=1000.0)
    live = view(clock)
    clock.advance(2.0)  # t = 1002: ten verdicts with capture->verdict 10, 20, ... 100 ms, and one without
    values = ["pass"] * 6 + ["fail"] * 2 + ["shed", "timeout"]
    for i, value in enumerate(values):
        live.publish(verdict(value, i, latency_s=(i + 1) / 100))
    live.publish(verdict("error", 10, latency_s=None))
    clock.advance(2.0)  # t = 1004: the view has run 4 s, less than its window

    s = live.state()
    assert s["counts"] == {"pass": 6, "fail": 2, "error": 1, "timeout": 1, "shed": 1}
    assert s["total"] == 11
    assert s["judged_per_s"] == pytest.approx(8 / 4)  # pass + fail over the 4 s it has run
    assert s["verdicts_per_s"] == pytest.approx(11 / 4)
    # linear interpolation over 10, 20, ..., 100 ms: p50 halfway between 50 and 60; p99 at
    # rank 0.99 * 9 = 8.91, i.e. 90 + 0.91 * 10
    assert s["latency_ms"]["p50"] == pytest.approx(55.0)
    assert s["latency_ms"]["p99"] == pytest.approx(99.1)
    assert s["latency_ms"]["n"] == 10
    assert s["window_s"] == WINDOW_S
    assert s["time"] == clock.wall
    assert s["daemon"]["bank_id"] == "bank-a" and s["daemon"]["ready"] is True
    assert "weights-free" in s["daemon"]["backend_label"]  # the classic backend says what it is

    clock.advance(WINDOW_S - 2.0 + 0.5)  # t = 1012.5: the verdicts of t = 1002 left the window
    s = live.state()
    assert s["judged_per_s"] == 0.0 and s["verdicts_per_s"] == 0.0 and s["latency_ms"] is None
    assert s["total"] == 11  # counts are since the start
    live.publish(verdict("pass", 11, latency_s=0.25))
    s = live.state()
    assert s["judged_per_s"] == pytest.approx(1 / WINDOW_S)  # a whole window has passed: over WINDOW_S
    assert s["latency_ms"]["p50"] == pytest.approx(250.0) and s["latency_ms"]["p99"] == pytest.approx(250.0)


def test_status_is_read_at_each_request_and_unknown_backends_keep_their_name() -> None:
    status = dict(STATUS)
    live = LiveView(LiveConfig(), status=lambda: dict(status), clock=FakeClock())
    assert live.state()["daemon"]["bank_id"] == "bank-a"
    status.update(bank_id="bank-b", backend="fake", ready=False)  # a changeover while running
    d = live.state()["daemon"]
    assert (d["bank_id"], d["backend"], d["backend_label"], d["ready"]) == ("bank-b", "fake", "fake", False)


def test_failure_ring_keeps_the_newest_and_renders_each_overlay_once_on_request(overlay_renderings) -> None:
    rendered = overlay_renderings
    live = view(FakeClock(), recent_failures=3)
    objects = [{"bbox": [1, 2, 10, 8], "status": "missing", "score": 0.8},
               {"bbox": [20, 2, 10, 8], "status": "matched", "score": 0.1},
               {"bbox": [30, 12, 10, 8], "status": "unmatched", "score": 0.7},
               {"bbox": [30, 20, 5, 5], "status": "missing", "score": 0.6}]
    for i in range(5):
        live.publish(verdict("pass", 2 * i))
        live.publish(verdict("fail", 2 * i + 1, objects=objects, branch_scores={"objects": 3.5, "patch": -0.5}))
    live.publish(verdict("fail", 11, image=False, score=math.nan))
    assert rendered == []  # the verdict path encodes nothing

    failures = live.state()["failures"]
    assert [f["frame_id"] for f in failures] == [11, 9, 7]  # the newest 3, newest first
    newest, shown = failures[0], failures[1]
    assert newest["image"] is None and newest["score"] is None  # no picture; NaN is JSON null
    assert shown["objects"] == {"missing": 2, "unmatched": 1}
    assert shown["branch_scores"] == {"objects": 3.5, "patch": -0.5}
    assert (shown["camera"], shown["part_id"], shown["score"], shown["threshold"]) == ("cam0", "P9", 0.9, 0.5)
    assert shown["verdict_id"] == "run-9" and shown["capture_ts"] == 1_700_000_009.0

    jpeg = live.failure_jpeg(shown["id"])
    picture = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == (32, 48, 3)
    assert live.failure_jpeg(shown["id"]) is jpeg and rendered == [9]  # rendered once, then cached
    assert live.failure_jpeg(newest["id"]) is None  # a failure without a picture

    ids = [f["id"] for f in failures]
    for i in range(3):  # three newer failures push the shown ones out
        live.publish(verdict("fail", 20 + i))
    assert all(live.failure_jpeg(i) is None for i in ids)
    assert len(set(ids)) == 3


def test_routes_over_real_http(served_view) -> None:
    live = view(FakeClock())
    live.publish(verdict("fail", 1, objects=[{"bbox": [4, 4, 10, 10], "status": "surplus", "score": 1.0}]))
    live.publish(verdict("pass", 2))
    port = served_view(live)

    status, ctype, body = get(port, "/live")
    assert status == 200 and ctype.startswith("text/html")
    assert b"/live/live.js" in body and b"/live/live.css" in body and b"://" not in body  # nothing from elsewhere
    for name, kind in (("live.js", "text/javascript"), ("live.css", "text/css")):
        status, ctype, body = get(port, f"/live/{name}")
        assert status == 200 and ctype.startswith(kind) and len(body) > 100, name
    assert b"://" not in get(port, "/live/live.js")[2] + get(port, "/live/live.css")[2]

    status, ctype, body = get(port, "/live/state.json?t=1")
    assert status == 200 and ctype == "application/json"
    state = json.loads(body)
    assert state["counts"]["fail"] == 1 and state["counts"]["pass"] == 1
    image_url = state["failures"][0]["image"]

    status, ctype, body = get(port, image_url)
    assert status == 200 and ctype == "image/jpeg"
    overlay = cv2.cvtColor(cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert overlay.shape == (32, 48, 3)
    assert np.abs(overlay.astype(int) - 90).max() > 60  # the banner and box are drawn over the grey part

    for path in ("/live/failures/nope.jpg", "/live/failures/00000000-1.jpg", "/live/failures/../state.json",
                 "/live/failures/" + image_url.rsplit("/", 1)[1] + "x", "/live/nothing", "/live/static/live.js", "/lively"):
        status, ctype, body = get(port, path)
        assert status == 404 and ctype.startswith("text/plain"), path
        assert b"Traceback" not in body


def test_readers_and_the_verdict_path_at_once() -> None:
    live = view(FakeClock(), recent_failures=4)
    n = 3000
    done = threading.Event()
    problems: list[str] = []
    seen_failure_ids: list[str] = []

    def write() -> None:
        try:
            for i in range(n):
                live.publish(verdict("fail" if i % 3 == 0 else "pass", i, image=i % 2 == 0))
        finally:
            done.set()

    def read() -> None:
        last_total = 0
        while not done.is_set():
            status, _, body = live.handle("/live/state.json", "")
            state = json.loads(body)
            if status != 200 or state["total"] != sum(state["counts"].values()) or state["total"] < last_total:
                problems.append(f"inconsistent snapshot: {state['counts']} total {state['total']} after {last_total}")
            last_total = state["total"]
            for f in state["failures"]:
                if f["image"]:
                    seen_failure_ids.append(f["id"])
                    status, _, _ = live.handle(f["image"], "")  # it may have left the ring meanwhile: 404
                    if status not in (200, 404):
                        problems.append(f"image route answered {status}")

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert not problems, problems[:5]
    s = live.state()
    assert s["counts"]["fail"] == n // 3 and s["counts"]["pass"] == n - n // 3 and s["total"] == n
    assert len(s["failures"]) == 4


def test_daemon_with_the_page_off_answers_404_and_keeps_no_pictures() -> None:
    config = runtime_config()
    config.live.enabled = False
    daemon = Daemon(config, FakeProcessor([("net", 0.0)]), log=quiet_log())
    daemon.start()
    try:
        assert "live" not in [sink.name for sink in daemon.sinks]
        assert daemon.pipeline._keep_images is False  # no frame image is held for anyone
        status, _, body = get(daemon.health.port, "/live")
        assert status == 404, body
        assert get(daemon.health.port, "/live/state.json")[0] == 404
        assert get(daemon.health.port, "/metrics")[0] == 200
    finally:
        daemon.stop()


def test_daemon_serves_the_page_by_default_with_its_verdicts_and_bank() -> None:
    assert LiveConfig().enabled is True
    processor = FakeProcessor([("net", 0.0)])
    daemon = Daemon(runtime_config(), processor, log=quiet_log())
    daemon.start()
    line = Line(daemon)
    try:
        line.warm_up()
        for i, value in enumerate([50, 200, 50]):  # pass, fail, pass (the fake scores pixel / 255)
            line.send("cam0", i, value)
        got = [line.recv(30) for _ in range(3)]  # the page counts a verdict before it is sent
        assert [(v.frame_id, v.verdict) for v in got] == [(0, "pass"), (1, "fail"), (2, "pass")]
        port = daemon.health.port

        state = json.loads(get(port, "/live/state.json")[2])
        by_camera_fail = [f for f in state["failures"] if f["camera"] == "cam0"]
        assert [f["frame_id"] for f in by_camera_fail] == [1]
        assert state["counts"]["fail"] == 1 and state["counts"]["pass"] >= 2  # warm-up frames pass too
        assert state["daemon"]["ready"] is True
        assert (state["daemon"]["bank_id"], state["daemon"]["backend"]) == ("bank-test", "fake")
        status, ctype, body = get(port, by_camera_fail[0]["image"])
        assert status == 200 and ctype == "image/jpeg" and body[:2] == b"\xff\xd8"
        processor.bank_id = "bank-next"  # what a changeover does: the page follows
        assert json.loads(get(port, "/live/state.json")[2])["daemon"]["bank_id"] == "bank-next"
    finally:
        line.close()
        daemon.stop()
