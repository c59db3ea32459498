"""Prometheus metrics of the daemon, in one place.

`Metrics` owns its own `CollectorRegistry` (never the process-global one), so two daemons
or two tests in one process do not collide. Names follow `linewatch_*` in base units
(seconds, bytes). Dashboards and alerts refer to the names listed by `metric_names()`.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterable
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

# capture -> verdict latency: 1 ms .. 10 s, roughly 1-2-5 per decade.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# One stage on one batch: from a fraction of a millisecond (preprocess) to seconds (SAM).
STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Image score / the bank's threshold (1.0 = the threshold; the detector fails a part above it),
# so one layout fits every bank. Dense from 0.6 to 1: good parts sit there (the calibration
# medians of the test banks built on the development machine, 4-10 calibration images each,
# were 0.69-0.99), and the drift alert compares medians in this range.
SCORE_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 1.0,
                       1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)
OTHER_CAMERAS = "_other"  # the one label shared by cameras beyond max_camera_labels
DEFAULT_MAX_CAMERA_LABELS = 64


def score_ratio(score: float | None, threshold: float | None) -> float | None:
    """`score / threshold`, or None when that is no finite number to record: no score or
    threshold, a threshold that is not positive and finite (an uncalibrated bank judges with
    threshold inf; 0 would divide by zero), or a score that is NaN or infinite. A non-finite
    sample would turn the histogram's `_sum` into NaN or inf for good."""
    if score is None or threshold is None or not (0.0 < threshold < math.inf):
        return None
    ratio = score / threshold
    return ratio if math.isfinite(ratio) else None


class CameraLabels:
    """Bounds the `camera` label values: each series costs memory and scrape time forever.

    The first `limit` camera ids seen (and every id of the allow-list, `known`) get a label
    of their own; any further id shares the label OTHER_CAMERAS. Without a bound, a sender
    cycling through ids (a bug, or anyone who reaches the port) grows /metrics without end:
    20,000 ids were 420,000 series and a 33 MB page in a fault run.
    """

    def __init__(self, limit: int = DEFAULT_MAX_CAMERA_LABELS, known: Iterable[str] = ()) -> None:
        self.limit = limit
        self._labels = set(known)
        self._added = 0  # ids labelled beyond `known`
        self._lock = threading.Lock()
        self.overflowed = False  # some id had to share OTHER_CAMERAS

    def __call__(self, camera: str) -> str:
        if camera in self._labels:  # a set lookup; no lock needed to read
            return camera
        with self._lock:
            if camera in self._labels:
                return camera
            if self._added < self.limit:
                self._labels.add(camera)
                self._added += 1
                return camera
            self.overflowed = True
            return OTHER_CAMERAS


class Metrics:
    """Every metric the runtime exposes, registered on a private registry.

    Attributes are the prometheus_client metric objects; callers use them directly
    (`metrics.frames_received.labels(camera=metrics.camera_label("cam0")).inc()`), plus a few
    helpers for values that are read at scrape time (queue depths, GPU memory). A camera
    label always goes through `camera_label`, which bounds how many there can be.
    """

    def __init__(self, registry: CollectorRegistry | None = None, camera_labels: CameraLabels | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        # camera id -> its `camera` label value (bounded); use it for every camera label
        self.camera_label = camera_labels if camera_labels is not None else CameraLabels()
        r = self.registry
        self.frames_received = Counter(
            "linewatch_frames_received", "Frames taken off the ingest sockets.", ["camera"], registry=r
        )
        self.verdicts = Counter(
            "linewatch_verdicts", "Verdicts published, by value (pass/fail/error/timeout/shed).",
            ["camera", "verdict"], registry=r,
        )
        self.frame_errors = Counter(
            "linewatch_frame_errors", "Frames answered `error`, by reason.", ["reason"], registry=r
        )
        self.frames_shed = Counter(
            "linewatch_frames_shed", "Frames answered `shed` (overload: over_share, pending_full, deadline_unreachable; "
            "shutting_down), per camera.", ["camera", "reason"], registry=r
        )
        self.frames_timed_out = Counter(
            "linewatch_frames_timed_out", "Frames answered `timeout` at their deadline.", ["camera"], registry=r
        )
        self.messages_dropped = Counter(
            "linewatch_messages_dropped", "Messages taken off an ingest socket that got no verdict, by reason "
            "(rate-limited refusals nobody can be answered for, receive or internal failures).", ["reason"], registry=r,
        )
        self.connections_refused = Counter(
            "linewatch_connections_refused", "CurveZMQ handshakes refused, by socket (frames/verdicts/acked) and reason "
            "(not_allowed: key not in the allow-list; handshake_failed: no or wrong keys).", ["socket", "reason"],
            registry=r,
        )
        self.capacity = Gauge(
            "linewatch_capacity_frames_per_second",
            "Frames per second the pipeline can judge, as measured: one over the slowest stage's time per "
            "frame (decode included); what admission shares among the cameras. 0 until measured.", registry=r,
        )
        self.late_results = Counter(
            "linewatch_late_results", "Detector results discarded because the frame was already answered.", registry=r
        )
        self.capture_to_verdict = Histogram(
            "linewatch_capture_to_verdict_seconds",
            "Sender capture timestamp to verdict release (crosses two clocks; see pipeline.py).",
            ["camera"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.score_ratio = Histogram(
            "linewatch_score_ratio",
            "Image score / the bank's threshold of judged frames (pass/fail), 1.0 = the threshold.",
            ["camera", "verdict"], buckets=SCORE_RATIO_BUCKETS, registry=r,
        )
        self.calibration_score_ratio = self._calibration_histogram()
        self.stage_seconds = Histogram(
            "linewatch_stage_seconds", "Wall time of one detector stage on one batch.", ["stage"],
            buckets=STAGE_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "linewatch_batch_size", "Frames per batch handed to the detector.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("linewatch_queue_depth", "Items waiting in a runtime queue.", ["queue"], registry=r)
        self.inflight_frames = Gauge(
            "linewatch_inflight_frames", "Frames received but not yet published.", registry=r
        )
        self.last_frame_timestamp = Gauge(
            "linewatch_last_frame_timestamp_seconds", "Epoch time of the last received frame.", registry=r
        )
        self.gpu_memory = Gauge(
            "linewatch_gpu_memory_bytes", "CUDA memory of this process (torch allocator).", ["kind"], registry=r
        )
        self.build_info = Gauge("linewatch_build_info", "Version and backend of this daemon (value 1).",
                                ["version", "backend"], registry=r)
        self.bank_info = Gauge("linewatch_bank_info", "The loaded template bank (value 1).",
                               ["bank_id", "backend", "images"], registry=r)
        self.ready = Gauge("linewatch_ready", "1 when the daemon accepts frames, else 0.", registry=r)
        self.sink_dropped = Counter(
            "linewatch_sink_dropped", "Verdicts a secondary sink could not take, by sink (archive_row, archive_image, "
            "mqtt) and reason; the verdict itself was published.", ["sink", "reason"], registry=r,
        )
        self.archive_bytes = Gauge("linewatch_archive_bytes", "Size of the verdict archive on disk.", registry=r)
        self.mqtt_connected = Gauge("linewatch_mqtt_connected", "1 while the MQTT sink is connected to its broker.",
                                    registry=r)
        # the acknowledged verdict channel (runtime.acked), per configured subscriber
        self.acked_sent = Counter(
            "linewatch_acked_verdicts_sent", "Verdicts sent on the acknowledged channel, per subscriber (resent ones "
            "included).", ["subscriber"], registry=r,
        )
        self.acked_resent = Counter(
            "linewatch_acked_verdicts_resent", "Verdicts sent again to a subscriber that said hello (reconnected or "
            "restarted).", ["subscriber"], registry=r,
        )
        self.acked_acked = Counter(
            "linewatch_acked_verdicts_acked", "Verdicts a subscriber acknowledged (or confirmed by the last seq of "
            "its hello).", ["subscriber"], registry=r,
        )
        self.acked_missed = Counter(
            "linewatch_acked_verdicts_missed", "Verdicts a subscriber never acknowledged: expired (capture_ts + "
            "budget_ms passed) or overflow (its buffer was full).", ["subscriber", "reason"], registry=r,
        )
        self.acked_connected = Gauge(
            "linewatch_acked_subscriber_connected", "1 while a configured subscriber of the acknowledged channel is "
            "connected and heard from within absent_after_ms.", ["subscriber"], registry=r,
        )
        self.acked_unacked = Gauge(
            "linewatch_acked_unacked", "Verdicts waiting for a subscriber's acknowledgement.", ["subscriber"], registry=r,
        )
        self.acked_refused = Counter(
            "linewatch_acked_hellos_refused", "Hellos on the acknowledged channel from names that are not configured.",
            registry=r,
        )
        self.native_messages = Counter(
            "linewatch_native_messages", "Lines native libraries wrote to stderr (libpng, libjpeg, opencv, unknown), "
            "each turned into a log event (rate-limited: the counter has every one).", ["library"], registry=r,
        )
        self.selfcheck_failures = Counter(
            "linewatch_selfcheck_failures", "Self-check references that failed, by kind: wrong_verdict (a good one "
            "failed or a bad one passed), drift (a good one passed above selfcheck.drift_fraction of the threshold), "
            "not_judged (no pass/fail: shed, timeout, error), no_references (none could be loaded).", ["kind"],
            registry=r,
        )
        self.selfcheck_rounds = Counter(
            "linewatch_selfcheck_rounds", "Self-check rounds finished, by result (pass/fail).", ["result"], registry=r
        )
        self.selfcheck_failing = Gauge(
            "linewatch_selfcheck_failing", "1 while the last finished self-check failed, else 0.", registry=r
        )
        self.selfcheck_last_ok_timestamp = Gauge(
            "linewatch_selfcheck_last_ok_timestamp_seconds", "Epoch time of the last self-check that passed (0: none "
            "yet).", registry=r
        )
        self.selfcheck_last_timestamp = Gauge(
            "linewatch_selfcheck_last_timestamp_seconds", "Epoch time of the last finished self-check (0: none yet).",
            registry=r
        )
        self.selfcheck_interval = Gauge(
            "linewatch_selfcheck_interval_seconds", "selfcheck.interval_s of this daemon; 0 when the self-check is off.",
            registry=r
        )
        self.selfcheck_score_ratio = Gauge(
            "linewatch_selfcheck_score_ratio", "Score / threshold of each self-check reference in its last round.",
            ["reference"], registry=r
        )
        self.bank_switches = Counter(
            "linewatch_bank_switches", "Bank changeovers asked for while running, by result (switched/refused).",
            ["result"], registry=r,
        )

    # ------------------------------------------------------------------ helpers

    def set_build_info(self, version: str, backend: str) -> None:
        """Expose the running version and detector backend (value 1)."""
        self.build_info.labels(version=version, backend=backend).set(1)

    def set_bank_info(self, bank_id: str, backend: str, images: int | str) -> None:
        """Expose which template bank is loaded (value 1)."""
        self.bank_info.labels(bank_id=bank_id, backend=backend, images=str(images)).set(1)

    def observe_score(self, camera_label: str, verdict: str, score: float | None, threshold: float | None) -> bool:
        """Record a judged frame's score / threshold in `linewatch_score_ratio`; returns whether
        it was recorded (see `score_ratio` for what is skipped)."""
        ratio = score_ratio(score, threshold)
        if ratio is None:
            return False
        self.score_ratio.labels(camera=camera_label, verdict=verdict).observe(ratio)
        return True

    def _calibration_histogram(self) -> Histogram:
        return Histogram(
            "linewatch_calibration_score_ratio",
            "Score / threshold of the good images the bank in service was calibrated on (set at start and at "
            "each bank switch).", buckets=SCORE_RATIO_BUCKETS, registry=self.registry,
        )

    def set_calibration(self, scores: Iterable[float], threshold: float | None) -> int:
        """Fill `linewatch_calibration_score_ratio` with the bank's calibration scores; the
        drift alert compares the live pass scores with them. After a bank switch it holds the
        new bank's alone: a histogram cannot be emptied, so each call registers it anew.
        Returns how many were recorded."""
        self.registry.unregister(self.calibration_score_ratio)
        self.calibration_score_ratio = self._calibration_histogram()
        n = 0
        for score in scores:
            ratio = score_ratio(score, threshold)
            if ratio is not None:
                self.calibration_score_ratio.observe(ratio)
                n += 1
        return n

    def track_queue(self, queue: str, depth: Callable[[], float]) -> None:
        """Read `depth()` at every scrape for `linewatch_queue_depth{queue=...}`."""
        self.queue_depth.labels(queue=queue).set_function(depth)

    def track_gpu_memory(self) -> bool:
        """Report torch's CUDA allocator figures at scrape time, if CUDA is in use.

        Only looks at torch when the process has already imported it (the detector does):
        importing torch here just for a gauge would cost seconds and memory on CPU-only hosts.
        Returns whether GPU memory is tracked.
        """
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return False
        self.gpu_memory.labels(kind="allocated").set_function(lambda: float(torch.cuda.memory_allocated()))
        self.gpu_memory.labels(kind="reserved").set_function(lambda: float(torch.cuda.memory_reserved()))
        return True

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (what /metrics serves)."""
        return generate_latest(self.registry)

    def metric_names(self) -> set[str]:
        """Sample names as queried in PromQL, for cross-checking dashboards and alerts.

        Counters appear as `<name>_total`, gauges as `<name>`, histograms as `<name>_bucket`,
        `<name>_sum` and `<name>_count`. The `_created` samples prometheus_client adds are
        left out: nothing should alert on them.
        """
        names: set[str] = set()
        for family in self.registry.collect():
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
            else:
                names.add(family.name)
        return names


def metric_names() -> set[str]:
    """The sample names a fresh `Metrics` exposes (see `Metrics.metric_names`)."""
    return Metrics().metric_names()
