"""Logging: structlog, one line per event on stderr (journald picks it up), JSON or console.

Per-frame events are DEBUG only; at INFO the daemon writes start/stop, failures and a
periodic summary line (frames, verdicts by value, fps, latency percentiles), so months of
unattended running do not fill the journal.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Callable, TextIO

import numpy as np
import structlog

from linewatch.config import LoggingConfig


class CurrentStderr:
    """A file that writes to whatever `sys.stderr` is at the time of each write.

    The log's default stream: while native_stderr captures file descriptor 2, `sys.stderr` is a
    copy of the original stderr, and the log lines must go there, not into the capture (a
    PrintLogger keeps the file object it was made with, so it cannot be sys.stderr itself).
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(config: LoggingConfig, stream: TextIO | None = None) -> Any:
    """Set up structlog for the process and return a logger bound to "linewatch".

    Level filtering happens before any formatting, so a filtered DEBUG call costs next to
    nothing. `stream` defaults to stderr, looked up at each line (CurrentStderr; tests pass a
    StringIO).
    """
    renderer: Any
    if config.format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, config.level)),
        logger_factory=structlog.PrintLoggerFactory(file=stream if stream is not None else CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger("linewatch")


class RateLimiter:
    """Decides whether an event for `key` is reported now; counts the ones it holds back.

    At most one report per key per `interval_s` (by the caller's clock readings). At most
    `max_keys` keys are remembered (a sender cycling through camera ids must not grow it);
    beyond that, new keys share the key "<other>". Thread-safe.
    """

    def __init__(self, interval_s: float, max_keys: int = 256) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: str, now: float) -> int | None:
        """None: hold this one back. Otherwise: report it, with this many held back before it."""
        with self._lock:
            if key not in self._last and len(self._last) >= self.max_keys:
                key = "<other>"
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._suppressed.pop(key, 0)

    def take_held_back(self) -> dict[str, int]:
        """The counts held back since each key's last report (and forgets them): what a
        component logs once more when it stops, so no count is lost."""
        with self._lock:
            held, self._suppressed = self._suppressed, {}
            return held


def percentile_ms(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) of `values` (seconds), in milliseconds; None when empty."""
    if not values:
        return None
    return round(float(np.percentile(np.asarray(values), q)) * 1000.0, 3)


class SummaryLogger:
    """Writes one INFO "summary" line every `interval_s` seconds on its own thread.

    stats(): cumulative {"received": int, "verdicts": {value: int}, ...}
    take_latencies(): latencies in seconds since the previous call (and clears them).
    The line holds the counts for the interval, fps and p50/p99 latency in ms.
    """

    def __init__(self, log: Any, stats: Callable[[], dict[str, Any]], take_latencies: Callable[[], list[float]],
                 interval_s: float = 60.0) -> None:
        self.log = log
        self._stats = stats
        self._take_latencies = take_latencies
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lw-summary", daemon=True)
        self._prev: dict[str, Any] = {"received": 0, "verdicts": {}}
        self._prev_t = time.monotonic()

    def start(self) -> None:
        """Start the summary thread."""
        self._prev = self._stats()
        self._take_latencies()
        self._prev_t = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """Write a last summary and stop the thread (nothing, when it never started)."""
        self._stop.set()
        if not self._thread.is_alive() and self._thread.ident is None:
            return
        self._thread.join(2.0)
        self.emit()

    @property
    def thread(self) -> threading.Thread:
        """The summary thread (for liveness checks)."""
        return self._thread

    def emit(self) -> dict[str, Any]:
        """Write one summary line for the time since the previous one; returns its fields."""
        now = time.monotonic()
        cur = self._stats()
        lat = self._take_latencies()
        dt = max(now - self._prev_t, 1e-9)
        frames = cur["received"] - self._prev.get("received", 0)
        verdicts = {k: n - self._prev.get("verdicts", {}).get(k, 0) for k, n in cur["verdicts"].items()}
        fields = {
            "interval_s": round(dt, 1),
            "frames": frames,
            "fps": round(frames / dt, 2),
            "verdicts": {k: n for k, n in verdicts.items() if n},
            "inflight": cur.get("inflight"),
            "late_results": cur.get("late_results", 0) - self._prev.get("late_results", 0),
            "latency_p50_ms": percentile_ms(lat, 50),
            "latency_p99_ms": percentile_ms(lat, 99),
        }
        self._prev, self._prev_t = cur, now
        self.log.info("summary", **fields)
        return fields

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.emit()
            except Exception as e:  # noqa: BLE001 - a summary must never kill anything
                self.log.error("summary_failed", error=repr(e))
