"""Publisher: verdicts out on a ZeroMQ PUB socket, one message per verdict (linewatch.wire).

`publish()` may be called from any thread: it only enqueues. One sender thread owns the PUB
socket (ZMQ sockets are not thread-safe), encodes attachments (heatmap PNG/float16, overlay
JPEG) per PublishConfig and sends. A verdict whose attachments cannot be encoded is still
sent, without them: the verdict itself must never be lost to a rendering problem.

The queue in front of the sender is unbounded on purpose: verdicts are small, the PUB send
never blocks (at send_hwm ZMQ drops for the slow subscriber only), so the queue only grows
if encoding is slower than inspection, and dropping a verdict here would ship a part
unjudged. `pending` exposes its depth for metrics.

The overlay needs the image, which this module never sees: whoever holds the image (the
pipeline) fills Verdict.overlay_jpeg, with linewatch.overlay.overlay_jpeg; with
`overlay_jpeg: true` it is attached when present.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import structlog
import zmq

from linewatch import wire
from linewatch.config import PublishConfig, SecurityConfig
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.transport.security import CurveServer, SecurityError
from linewatch.wire import Verdict


class Publisher:
    """Thread-safe verdict publisher (a `VerdictPublisher`; the daemon's `publish` sink); binds/connects in start() (errors raise there)."""

    def __init__(self, config: PublishConfig, log: Any = None, metrics: Metrics | None = None,
                 security: SecurityConfig | None = None) -> None:
        """`security`, when enabled, makes the PUB socket a CurveZMQ server that lets only the
        subscribers whose public keys are in `security.verdict_subscribers` receive."""
        self._security = security if security is not None and security.enabled else None
        self._metrics = metrics if metrics is not None else Metrics()
        self._curve: CurveServer | None = None
        self._config = config
        self._log = log if log is not None else structlog.get_logger("linewatch.publish")
        self._queue: queue.Queue[Verdict | None] = queue.Queue()
        self._closed = False
        self._abort = threading.Event()
        self._close_lock = threading.Lock()
        self._published = 0
        self._unsent = 0  # queued and not yet handed to ZMQ (or given up on)
        self._idle = threading.Condition()
        self._drain_deadline = 0.0
        self._thread = threading.Thread(target=self._send_loop, name="publish", daemon=True)
        self._bound_url = ""

    def start(self) -> None:
        """Open the PUB socket (RuntimeError naming the URL when it cannot) and start sending."""
        config = self._config
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, config.send_hwm)
        if self._security is not None:
            try:
                self._curve = CurveServer.from_config(self._context, self._security, "verdicts", self._metrics, self._log)
            except SecurityError:
                self._socket.close(linger=0)
                self._context.term()
                raise
            self._curve.secure(self._socket)
        try:
            if config.mode == "bind":
                self._socket.bind(config.url)
                self._bound_url = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self._socket.connect(config.url)
                self._bound_url = config.url
        except zmq.ZMQError as e:
            self._socket.close(linger=0)
            if self._curve is not None:
                self._curve.stop()
            self._context.term()
            raise RuntimeError(f"publish: cannot {config.mode} {config.url}: {e}") from e
        if self._curve is not None:
            self._curve.start()
        self._thread.start()

    @property
    def bound_url(self) -> str:
        """The resolved endpoint (real port when the config said tcp://host:* or :0)."""
        return self._bound_url

    @property
    def pending(self) -> int:
        """Verdicts queued and not yet sent."""
        return self._queue.qsize()

    @property
    def published(self) -> int:
        """Verdicts handed to ZMQ so far."""
        return self._published

    def dead_threads(self) -> list[str]:
        """The sender thread, if it died while running."""
        if self._thread.ident is None or self._closed:
            return []
        return [] if self._thread.is_alive() else [self._thread.name]

    def stats(self) -> dict[str, int]:
        """Verdicts handed to ZMQ and still queued."""
        return {"published": self._published, "pending": self.pending}

    def publish(self, verdict: Verdict) -> None:
        """Queue one verdict for sending; never blocks. Raises RuntimeError after close()."""
        if self._closed:
            raise RuntimeError(f"publish after close: {verdict.camera} #{verdict.frame_id} {verdict.verdict}")
        with self._idle:
            self._unsent += 1
        self._queue.put(verdict)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every verdict published so far has been handed to ZMQ; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unsent == 0, timeout_s)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Send what is queued (up to `timeout_s`, ZMQ linger included), then close. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._thread.ident is None:  # never started
            return
        self._drain_deadline = time.monotonic() + timeout_s
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._abort.set()
            self._thread.join(1.0)
        left = self._queue.qsize()
        if left:
            self._log.error("verdicts not published before close", count=left)
        if self._curve is not None:
            self._curve.stop()
        if not self._thread.is_alive():
            self._context.term()

    def _send_loop(self) -> None:
        while not self._abort.is_set():
            verdict = self._queue.get()
            if verdict is None:
                break
            try:
                self._send(verdict)
            finally:
                with self._idle:
                    self._unsent -= 1
                    self._idle.notify_all()
        linger_ms = max(0, int((self._drain_deadline - time.monotonic()) * 1000)) if not self._abort.is_set() else 0
        self._socket.close(linger=linger_ms)

    def _send(self, verdict: Verdict) -> None:
        heatmap, overlay = self._config.heatmap, self._config.overlay_jpeg
        try:
            parts = wire.encode_verdict(verdict, heatmap, overlay)
        except Exception:
            self._log.exception("verdict attachments failed; sending without", camera=verdict.camera, frame_id=verdict.frame_id)
            try:
                parts = wire.encode_verdict(verdict, "none", False)
            except Exception:
                self._log.exception("verdict could not be encoded", camera=verdict.camera, frame_id=verdict.frame_id)
                return
        try:
            self._socket.send_multipart(parts, copy=False)
            self._published += 1
        except zmq.ZMQError as e:
            self._log.error("verdict send failed", camera=verdict.camera, frame_id=verdict.frame_id, error=str(e))
