"""Logging: JSON lines at the configured level, and the periodic summary."""

from __future__ import annotations

import io
import json

import structlog

from linewatch.config import LoggingConfig
from linewatch.runtime.ops.logs import SummaryLogger, configure_logging, percentile_ms


def test_json_lines_filtered_by_level() -> None:
    buf = io.StringIO()
    try:
        log = configure_logging(LoggingConfig(level="INFO", format="json"), stream=buf)
        log.debug("frame", camera="cam0", frame_id=1)  # per-frame: DEBUG, filtered out at INFO
        log.info("started", backend="classic")
        log.error("stage_failed", stage="net")
    finally:
        structlog.reset_defaults()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["started", "stage_failed"]
    assert events[0]["level"] == "info" and events[0]["backend"] == "classic" and "timestamp" in events[0]


def test_summary_reports_interval_counts_fps_and_percentiles() -> None:
    buf = io.StringIO()
    log = structlog.wrap_logger(structlog.PrintLogger(buf), processors=[structlog.processors.JSONRenderer()])
    stats = {"received": 0, "verdicts": {"pass": 0, "fail": 0}, "late_results": 0, "inflight": 0}
    lat: list[float] = []
    s = SummaryLogger(log, lambda: {**stats, "verdicts": dict(stats["verdicts"])},
                      lambda: [lat.pop() for _ in range(len(lat))], interval_s=3600)
    s.start()
    stats.update(received=100, verdicts={"pass": 90, "fail": 10})
    lat.extend([0.001] * 98 + [0.5, 0.5])
    fields = s.emit()
    s.stop()
    assert fields["frames"] == 100 and fields["verdicts"] == {"pass": 90, "fail": 10}
    assert fields["latency_p50_ms"] == 1.0 and fields["latency_p99_ms"] > 100
    assert fields["fps"] > 0
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert lines[0]["event"] == "summary" and lines[0]["frames"] == 100
    assert lines[1]["frames"] == 0  # the closing summary covers only what came after
    assert percentile_ms([], 50) is None
