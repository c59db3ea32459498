"""Tap: subscribe to the verdict stream and show one line per verdict (or call a function).

    cam0 #17 FAIL score=3.21 thr=2.10 lat=12.3ms objects=2 part=A-0017
    cam0 #18 ERROR reason=too_large lat=0.4ms objects=0

ZMQ subscriptions match topic prefixes ("cam1" also matches "cam10"), so the camera filter
is applied exactly after receiving. A tap that connects late misses earlier verdicts (PUB/SUB
keeps no history).

Verdicts lost on the way (ZeroMQ's PUB drops them for a subscriber whose queue is full, and
tells nobody) show as gaps in the verdicts' `seq`, which counts 0, 1, 2, ... per daemon run
over all cameras: `SequenceGaps` counts them. This needs every verdict, so it only works for
a subscription to all cameras (filter locally instead of subscribing to one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import structlog
import zmq

from linewatch import wire
from linewatch.runtime.transport.security import ClientKeys
from linewatch.wire import Verdict
from linewatch.wire import WireError

POLL_MS = 100


def format_verdict(verdict: Verdict) -> str:
    """One human-readable line for a verdict."""
    items = [f"{verdict.camera} #{verdict.frame_id} {verdict.verdict.upper()}"]
    if verdict.reason:
        items.append(f"reason={verdict.reason}")
    if verdict.score is not None:
        items.append(f"score={verdict.score:.2f}")
    if verdict.threshold is not None:
        items.append(f"thr={verdict.threshold:.2f}")
    if verdict.latency_s is not None:
        items.append(f"lat={verdict.latency_s * 1000:.1f}ms")
    items.append(f"objects={len(verdict.objects)}")
    if verdict.part_id is not None:
        items.append(f"part={verdict.part_id}")
    if verdict.heatmap is not None:
        items.append(f"heatmap={verdict.heatmap.shape[0]}x{verdict.heatmap.shape[1]}")
    if verdict.overlay_jpeg is not None:
        items.append(f"overlay={len(verdict.overlay_jpeg)}B")
    return " ".join(items)


class SequenceGaps:
    """Counts verdicts lost between the daemon and this subscriber, from gaps in `seq`.

    A new `run_id` (the daemon restarted) starts counting afresh; the first verdict seen of a
    run sets the start (verdicts before a late subscriber connected are not losses).
    """

    def __init__(self) -> None:
        self.run_id: str | None = None
        self._next = 0
        self.lost = 0  # verdicts missing from the sequence so far
        self.runs = 0  # daemon runs seen

    def observe(self, verdict: Verdict) -> int:
        """Account for one verdict; returns how many were lost just before it."""
        if verdict.run_id is None or verdict.seq is None:
            return 0
        if verdict.run_id != self.run_id:
            self.run_id, self._next = verdict.run_id, verdict.seq + 1
            self.runs += 1
            return 0
        missing = max(0, verdict.seq - self._next)
        self.lost += missing
        self._next = max(self._next, verdict.seq + 1)
        return missing


def tap(
    endpoint: str,
    callback: Callable[[Verdict], None] | None = None,
    count: int | None = None,
    timeout_s: float | None = None,
    cameras: Iterable[str] | None = None,
    mode: str = "connect",
    stop: threading.Event | None = None,
    gaps: SequenceGaps | None = None,
    curve: ClientKeys | None = None,
) -> int:
    """Receive verdicts from `endpoint` until `count` were seen, `timeout_s` (total wall time)
    passed or `stop` is set. Each verdict goes to `callback` (default: print its line).
    Undecodable messages are logged and skipped. Returns the number of verdicts seen.
    `gaps`, with no camera filter, counts the verdicts lost on the way (each gap is logged).
    `curve`: CurveZMQ keys for a daemon with runtime.security.
    """
    log = structlog.get_logger("linewatch.tap")
    wanted = set(cameras) if cameras else None
    handle = callback if callback is not None else (lambda v: print(format_verdict(v), flush=True))
    end = None if timeout_s is None else time.monotonic() + timeout_s
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sock)
    for camera in wanted or [""]:
        sock.setsockopt(zmq.SUBSCRIBE, camera.encode("utf-8"))
    seen = 0
    try:
        if mode == "bind":
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
        while (count is None or seen < count) and not (stop is not None and stop.is_set()):
            wait_ms = POLL_MS
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    break
                wait_ms = min(POLL_MS, max(1, int(left * 1000)))
            if not sock.poll(wait_ms):
                continue
            parts = sock.recv_multipart()
            try:
                verdict = wire.decode_verdict(parts)
            except WireError as e:
                log.warning("undecodable verdict message", reason=e.reason, detail=e.detail)
                continue
            if wanted is not None and verdict.camera not in wanted:
                continue
            if gaps is not None and wanted is None:
                missing = gaps.observe(verdict)
                if missing:
                    log.warning("verdicts lost", count=missing, before=verdict.id, total_lost=gaps.lost)
            seen += 1
            handle(verdict)
    finally:
        sock.close(linger=0)
        context.term()
    return seen
