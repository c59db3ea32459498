"""Fixtures of the ops tests.

`live_daemon`: a process-local stand-in for `linewatch serve` -- the daemon's own `Metrics`
registry served by its own `HealthServer` on a free loopback port, with a few frames'
worth of samples recorded -- so the scrape tests need no model, bank or camera.
INTEGRATOR: once `linewatch serve` runs without a GPU (classic backend), switch this fixture
to start `linewatch serve -c <tmp config with runtime.metrics.port=PORT>` as a subprocess.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass

import pytest


@dataclass
class LiveDaemon:
    url: str  # http://127.0.0.1:PORT
    host: str
    port: int
    metrics: object

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


@pytest.fixture
def live_daemon():
    pytest.importorskip("linewatch.runtime.metrics", reason="linewatch.runtime.metrics not written yet")
    health = pytest.importorskip("linewatch.runtime.health", reason="linewatch.runtime.health not written yet")
    from linewatch import __version__
    from linewatch.config import MetricsConfig
    from linewatch.runtime.metrics import Metrics

    m = Metrics()
    m.set_build_info(__version__, "classic")
    m.set_bank_info("test-bank", "classic", 8)
    m.ready.set(1)
    m.track_queue("pending", lambda: 3.0)
    for i, verdict in enumerate(["pass", "pass", "fail", "error", "timeout", "shed"]):
        m.frames_received.labels(camera="cam0").inc()
        m.verdicts.labels(camera="cam0", verdict=verdict).inc()
        m.capture_to_verdict.labels(camera="cam0").observe(0.05 * (i + 1))
    m.frame_errors.labels(reason="decode_failed").inc()
    m.frames_shed.labels(reason="overload").inc()
    m.frames_timed_out.labels(camera="cam0").inc()
    m.late_results.inc()
    for stage in ("preprocess", "features", "segment", "match", "measure"):
        m.stage_seconds.labels(stage=stage).observe(0.01)
    m.batch_size.observe(4)
    m.inflight_frames.set(2)
    m.last_frame_timestamp.set(time.time())
    m.gpu_memory.labels(kind="allocated").set(0)

    server = health.HealthServer(MetricsConfig(host="127.0.0.1", port=0), m.registry)
    server.start()
    try:
        yield LiveDaemon(f"http://127.0.0.1:{server.port}", "127.0.0.1", server.port, m)
    finally:
        server.stop()
