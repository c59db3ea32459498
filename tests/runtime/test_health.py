"""Health server over real HTTP: /metrics after a pipeline run, /healthz, /readyz."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from linewatch.config import MetricsConfig
from linewatch.runtime.ops.health import HealthServer
from linewatch.runtime.ops.metrics import Metrics
from tests.runtime.fakes import Collector, FakeProcessor, make_frame, make_pipeline


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def serve():
    servers: list[HealthServer] = []

    def make(metrics: Metrics, **kw) -> HealthServer:
        s = HealthServer(MetricsConfig(host="127.0.0.1", port=0), metrics.registry, **kw)
        s.start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def test_metrics_endpoint_shows_the_counts_of_a_pipeline_run(serve) -> None:
    metrics = Metrics()
    out = Collector()
    proc = FakeProcessor([("pre", 0.0), ("net", 0.001)],
                         fail_if=lambda name, images: name == "net" and any(im[0, 0, 0] == 13 for im in images))
    p = make_pipeline(proc, out, max_batch=1, max_delay_ms=0.0, metrics=metrics)
    p.start()
    try:
        for i in range(10):
            p.submit(make_frame("cam0", i, value=13 if i == 4 else None))
        p.submit_error("cam1", 0, "bad_header", 0.0, 0.0)  # received long ago: still an error, not a timeout
        assert out.wait_for(11, timeout_s=5.0)
    finally:
        p.stop()
    server = serve(metrics)
    assert server.port > 0
    status, body = get(server.port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("linewatch_frames_received_total", (("camera", "cam0"),))] == 10
    assert samples[("linewatch_verdicts_total", (("camera", "cam0"), ("verdict", "pass")))] == 4  # 0, 2, 6, 8 (4 errs)
    assert samples[("linewatch_verdicts_total", (("camera", "cam0"), ("verdict", "fail")))] == 5
    assert samples[("linewatch_verdicts_total", (("camera", "cam0"), ("verdict", "error")))] == 1
    assert samples[("linewatch_verdicts_total", (("camera", "cam1"), ("verdict", "error")))] == 1
    assert samples[("linewatch_frame_errors_total", (("reason", "stage_failed:net"),))] == 1
    assert samples[("linewatch_frame_errors_total", (("reason", "bad_header"),))] == 1
    assert samples[("linewatch_batch_size_count", ())] == 10
    assert samples[("linewatch_stage_seconds_count", (("stage", "net"),))] == 9  # the failed batch has no timing
    assert samples[("linewatch_capture_to_verdict_seconds_count", (("camera", "cam0"),))] == 10
    assert samples[("linewatch_inflight_frames", ())] == 0
    assert ("linewatch_queue_depth", (("queue", "stage:net"),)) in samples


def test_healthz_names_a_dead_thread(serve) -> None:
    dead: list[str] = []
    server = serve(Metrics(), liveness=lambda: list(dead))
    assert get(server.port, "/healthz") == (200, "ok\n")
    t = threading.Thread(target=lambda: None, name="lw-stage-net")
    t.start()
    t.join()
    dead.append(t.name)
    status, body = get(server.port, "/healthz")
    assert status == 503 and "lw-stage-net" in body


def test_readyz_says_why_not(serve) -> None:
    state = {"ok": False, "why": "ingest not listening yet"}
    server = serve(Metrics(), readiness=lambda: (state["ok"], state["why"]))
    assert get(server.port, "/readyz") == (503, "ingest not listening yet\n")
    state.update(ok=True, why="ready")
    assert get(server.port, "/readyz") == (200, "ready\n")
    assert get(server.port, "/nope")[0] == 404


def test_a_failing_check_is_a_500_not_a_dead_server(serve) -> None:
    def broken() -> list[str]:
        raise RuntimeError("bug")

    server = serve(Metrics(), liveness=broken)
    status, body = get(server.port, "/healthz")
    assert status == 500 and "bug" in body
    assert get(server.port, "/metrics")[0] == 200


def test_stop_wakes_the_serving_thread_and_closes_the_port() -> None:
    """The serving thread waits in select without a timeout: only stop()'s wake-up ends it, so
    a thread still alive after stop() (which joins it) means the wake-up was lost."""
    server = HealthServer(MetricsConfig(host="127.0.0.1", port=0), Metrics().registry)
    server.start()
    assert get(server.port, "/healthz") == (200, "ok\n")
    server.stop()
    assert not server.thread.is_alive()
    with pytest.raises(urllib.error.URLError):
        get(server.port, "/healthz")
    server.stop()  # twice is harmless
