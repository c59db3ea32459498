"""The live inspection page: what the line is doing now, at a glance, in any browser.

`LiveView.publish` runs on the verdict path (the pipeline's output thread) and only counts and
keeps references: the verdict counts, a window of recent release times and latencies, and the
latest failed parts' outcomes (linewatch.runtime.sinks.outcome). Everything costly happens on the HTTP
thread of the request that wants it: the percentiles when the page asks for its state, a failed
part's overlay JPEG (heatmap + object boxes) when the page first asks for that picture (the
outcome's overlay: rendered once, shared with any other sink that wants it).

Routes under /live (served by the metrics server, `HealthServer(routes={"/live": view.handle})`):
  /live                    the page (static/live.html; it polls state.json about once a second)
  /live/live.css, live.js  its style and script (no framework, nothing fetched from elsewhere)
  /live/state.json         the figures and the failed parts, newest first
  /live/failures/<id>.jpg  a failed part's overlay; an id no longer shown answers 404
"""

from __future__ import annotations

import itertools
import json
import math
import re
import secrets
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from linewatch.config import LiveConfig
from linewatch.runtime.pipeline.clock import SYSTEM_CLOCK, Clock
from linewatch.runtime.sinks.outcome import Outcome
from linewatch.wire import VERDICT_VALUES
from linewatch.runtime.sinks import Sink, SinkContext

WINDOW_S = 10.0  # frames/s and latency percentiles are over the verdicts of the last this many seconds

# file name -> content type of what the page loads besides state.json and the pictures
STATIC_FILES = {
    "live.html": "text/html; charset=utf-8",
    "live.css": "text/css; charset=utf-8",
    "live.js": "text/javascript; charset=utf-8",
}
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
_FAILURE_PATH = re.compile(r"/live/failures/([0-9a-f]+-[0-9]+)\.jpg")


@dataclass
class _Failure:
    """A failed part as the page shows it: its outcome (a reference, nothing copied)."""

    id: str
    outcome: Outcome


def _finite(x: Any) -> float | None:
    """A number JSON can carry (strict parsers reject NaN/Infinity): non-finite and None -> null."""
    return float(x) if x is not None and math.isfinite(x) else None


class LiveView:
    """The live page's state and its HTTP routes.

    config: `runtime.live`. status(): the daemon's bank_id, backend, bank_images, ready and
    version, read at each request (the bank can change while running). clock: monotonic for
    the window, wall for the page's "as of" time (a fake one in tests).
    """

    def __init__(self, config: LiveConfig, status: Callable[[], dict[str, Any]], clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self._status = status
        self._clock = clock
        self._started = clock.monotonic()
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(VERDICT_VALUES, 0)
        # (release time, capture->verdict seconds or None, judged), oldest first, the last WINDOW_S
        self._window: deque[tuple[float, float | None, bool]] = deque()
        self._failures: deque[_Failure] = deque(maxlen=config.recent_failures)
        # ids unique across restarts, so that a browser never shows a picture of an earlier run
        self._run = secrets.token_hex(4)
        self._numbers = itertools.count(1)
        self._static = {name: (resources.files("linewatch.runtime.sinks") / "static" / name).read_bytes()
                        for name in STATIC_FILES}

    # ------------------------------------------------------------------ the verdict path

    def publish(self, outcome: Outcome) -> None:
        """Count one released verdict; keep a failed part's outcome (no copy, no encoding)."""
        now = self._clock.monotonic()
        verdict = outcome.verdict
        failure = None
        if verdict.verdict == "fail":
            failure = _Failure(f"{self._run}-{next(self._numbers)}", outcome)
        with self._lock:
            self._counts[verdict.verdict] += 1
            self._window.append((now, verdict.latency_s, verdict.verdict in ("pass", "fail")))
            self._forget_before(now - WINDOW_S)
            if failure is not None:
                self._failures.append(failure)

    def _forget_before(self, t: float) -> None:
        """Drop window entries released before `t` (caller holds the lock)."""
        while self._window and self._window[0][0] < t:
            self._window.popleft()

    # ------------------------------------------------------------------ what the page reads

    def state(self) -> dict[str, Any]:
        """Everything the page shows, as plain JSON values."""
        now = self._clock.monotonic()
        with self._lock:
            self._forget_before(now - WINDOW_S)
            counts = dict(self._counts)
            window = list(self._window)
            failures = list(self._failures)
        # before the daemon has run a whole window, the rate is over the time it has run
        span = min(WINDOW_S, now - self._started)
        latencies = [lat for _, lat, _ in window if lat is not None]
        judged = sum(1 for _, _, j in window if j)
        # here, not at the top: `linewatch archive ...` imports this package, and the backends import torch
        from linewatch.detector.backends import BACKEND_LABELS

        status = self._status()
        backend = status.get("backend")
        return {
            "time": self._clock.time(),
            "daemon": {**status, "backend_label": BACKEND_LABELS.get(backend, backend) if backend else None},
            "window_s": WINDOW_S,
            "judged_per_s": judged / span if span > 0 else 0.0,
            "verdicts_per_s": len(window) / span if span > 0 else 0.0,
            "latency_ms": {
                "p50": float(np.percentile(latencies, 50)) * 1000,
                "p99": float(np.percentile(latencies, 99)) * 1000,
                "n": len(latencies),
            } if latencies else None,
            "counts": counts,
            "total": sum(counts.values()),
            "failures": [self._describe(f) for f in reversed(failures)],
        }

    @staticmethod
    def _describe(f: _Failure) -> dict[str, Any]:
        v = f.outcome.verdict
        return {
            "id": f.id,
            "verdict_id": v.id,
            "camera": v.camera,
            "frame_id": v.frame_id,
            "part_id": v.part_id,
            "capture_ts": _finite(v.capture_ts),
            "score": _finite(v.score),
            "threshold": _finite(v.threshold),
            "reason": v.reason,
            # what the object branch saw: how many objects of each status other than "matched"
            "objects": dict(Counter(str(o.get("status")) for o in v.objects if o.get("status") != "matched")),
            "branch_scores": {k: _finite(z) for k, z in v.branch_scores.items()},
            "bank_id": v.bank_id,
            "image": f"/live/failures/{f.id}.jpg" if f.outcome.image is not None else None,
        }

    def failure_jpeg(self, failure_id: str) -> bytes | None:
        """The overlay of a failed part still shown (the outcome's: rendered once, at the first
        request unless a sink needed it before); None when the id is not (or no longer) among
        them or it has no picture."""
        with self._lock:
            failure = next((f for f in self._failures if f.id == failure_id), None)
        if failure is None or failure.outcome.image is None:
            return None
        return failure.outcome.overlay_jpeg()

    # ------------------------------------------------------------------ HTTP

    def handle(self, path: str, query: str) -> tuple[int, str, bytes]:
        """The route of every path under /live: (status, content type, body)."""
        if path in ("/live", "/live/"):
            return 200, STATIC_FILES["live.html"], self._static["live.html"]
        name = path.removeprefix("/live/")
        if name in STATIC_FILES:
            return 200, STATIC_FILES[name], self._static[name]
        if path == "/live/state.json":
            return 200, JSON, json.dumps(self.state(), allow_nan=False).encode()
        m = _FAILURE_PATH.fullmatch(path)
        if m:
            try:
                jpeg = self.failure_jpeg(m.group(1))
            except Exception as e:  # noqa: BLE001 - a picture that cannot be drawn is that picture's problem
                return 500, TEXT, f"could not render the overlay of failed part {m.group(1)}: {e!r}\n".encode()
            if jpeg is not None:
                return 200, "image/jpeg", jpeg
            return 404, TEXT, f"no failed part {m.group(1)} is shown any more\n".encode()
        return 404, TEXT, b"not found; the live page is /live\n"


# ---------------------------------------------------------------- as a verdict sink


class LiveSink(Sink):
    name = "live"
    wants_image = True  # a failed part's overlay is drawn from it (Outcome.overlay_jpeg, on request)

    def __init__(self, view) -> None:  # a LiveView
        self.target = view
        self.routes = {"/live": view.handle}

    def publish(self, outcome: Outcome) -> None:
        self.target.publish(outcome)


def build(context: SinkContext) -> LiveSink | None:
    if not context.config.live.enabled:
        return None
    return LiveSink(LiveView(context.config.live, status=context.status, clock=context.clock))
