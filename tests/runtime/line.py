"""A production line around an in-process `Daemon` (tests/runtime/test_daemon.py, test_control.py,
test_live.py): its runtime settings on loopback port 0, a camera and an actuator on its sockets,
and plain HTTP to its health server."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import numpy as np
import zmq

from linewatch import wire
from linewatch.config import (
    BatchConfig, EndpointConfig, IngestConfig, MetricsConfig, PipelineConfig, PublishConfig, RuntimeConfig,
)
from linewatch.runtime.daemon import Daemon


def runtime_config(deadline_ms: float = 2000.0) -> RuntimeConfig:
    return RuntimeConfig(
        ingest=IngestConfig(endpoints=[EndpointConfig(url="tcp://127.0.0.1:*", mode="bind")], decode_workers=2),
        batch=BatchConfig(max_batch=4, max_delay_ms=5.0),
        pipeline=PipelineConfig(deadline_ms=deadline_ms),
        publish=PublishConfig(url="tcp://127.0.0.1:*", mode="bind"),
        metrics=MetricsConfig(host="127.0.0.1", port=0),
    )


def http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Line:
    """A camera (PUB into the daemon's ingest) and an actuator (SUB on its verdicts)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.ctx = zmq.Context()
        self.cam = self.ctx.socket(zmq.PUB)
        self.cam.connect(daemon.ingest.bound_urls[0])
        self.act = self.ctx.socket(zmq.SUB)
        self.act.setsockopt(zmq.SUBSCRIBE, b"")
        self.act.connect(daemon.publisher.bound_url)
        self.image = np.zeros((8, 8, 3), np.uint8)

    def send(self, camera: str, frame_id: int, value: int, capture_ts: float | None = None) -> None:
        self.image[...] = value
        self.cam.send_multipart(wire.encode_frame(camera, frame_id, self.image, capture_ts=capture_ts))

    def wait(self, cond, timeout_s: float = 10.0) -> bool:
        """Wait (bounded) for a condition that verdict traffic or a stage makes true."""
        end = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > end:
                return False
            self.act.poll(10)  # a short blocking wait on the verdict socket, not a sleep
        return True

    def recv(self, timeout_s: float = 2.0):
        """The next verdict that is not a warm-up probe's, or None after `timeout_s`."""
        end = time.monotonic() + timeout_s
        while self.act.poll(max(0, int((end - time.monotonic()) * 1000))):
            verdict = wire.decode_verdict(self.act.recv_multipart())
            if verdict.camera != "warm":
                return verdict
        return None

    def warm_up(self, capture_ts=None) -> None:
        """PUB/SUB drop messages until connected: send probes (camera "warm") until the daemon
        has one; with `capture_ts` (a clock's time function) return once one was sent after
        the connection, without waiting for its verdict. Later reads skip "warm" verdicts."""
        for i in range(500):
            self.send("warm", i, 50, capture_ts=capture_ts() if capture_ts else None)
            if capture_ts is not None:
                if self.daemon.pipeline.stats()["received"]:
                    return
                self.act.poll(10)
            elif self.act.poll(10):
                return
        raise AssertionError("daemon never received a probe frame")

    def close(self) -> None:
        self.cam.close(linger=0)
        self.act.close(linger=0)
        self.ctx.term()
