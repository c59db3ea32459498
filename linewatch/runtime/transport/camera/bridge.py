"""The capture loop of `linewatch camera`: source -> frames -> a sink (the daemon's ingest, or
files for `linewatch camera grab`), with reconnects, metrics and log lines.

The loop, in one thread (`CameraBridge.run`):
  - open the source; when that fails, or the source is lost later (device gone, stream error,
    end of a video file, folder removed), close it, log `camera_source_lost` with the reason and
    the wait, and try again after a backoff: reconnect.initial_s, doubling up to reconnect.max_s,
    back to initial_s after the next frame. Every wait is on the stop event: never a busy loop,
    and SIGTERM ends any wait at once. `camera_source_reopened` says how long it was away.
  - each frame: counted (captured), grey frames replicated to 3 channels with mono_to_rgb (or
    sent grey and counted), then handed to the sink, which says what became of it: sent, or
    dropped with a reason (counted). A source whose frames keep (the hot folder, `can_wait`)
    reads nothing while the sink is not ready, waits out a full queue instead of dropping, is
    paced by max_fps instead of skipped, and gets a frame back (`undo`) when stopped meanwhile.
A live source's first open may fail (a camera switched on after the PC): the bridge keeps
trying. A video file's, and any source's in `grab` (`first_open_fatal`), raises SourceError.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from linewatch.config import CameraConfig
from linewatch.images import scale_window
from linewatch.runtime.transport.camera.base import Captured, Source, SourceError, SourceLost
from linewatch.runtime.transport.replay import FramePublisher
from linewatch.runtime.transport.security import ClientKeys

DROP_REASONS = ("send_hwm", "no_daemon", "read_failed", "unreadable_file")


class Backoff:
    """Waits before reopening a lost source: initial, doubling, capped at `maximum`."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.initial


class CameraMetrics:
    """The bridge's Prometheus metrics, in a registry of its own (served on its own /metrics)."""

    def __init__(self, camera: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.captured = Counter("linewatch_camera_frames_captured", "Frames read from the source",
                                ["camera"], registry=r).labels(camera)
        self.sent = Counter("linewatch_camera_frames_sent", "Frames handed to the socket towards the daemon "
                            "(grab: written)", ["camera"], registry=r).labels(camera)
        dropped = Counter("linewatch_camera_frames_dropped",
                          "Frames lost, by reason: send_hwm (send_hwm frames already wait for the daemon), "
                          "no_daemon (no daemon subscribed), read_failed (the source failed to deliver a frame), "
                          "unreadable_file (hot folder: a file that never became a readable image)",
                          ["camera", "reason"], registry=r)
        self.dropped = {reason: dropped.labels(camera, reason) for reason in DROP_REASONS}
        self.skipped = Counter("linewatch_camera_frames_skipped", "Frames read and not sent on purpose (max_fps)",
                               ["camera"], registry=r).labels(camera)
        self.grey = Counter("linewatch_camera_grey_frames", "Grey frames sent grey (mono_to_rgb off): the daemon "
                            "answers them `error` (grey_image) unless its bank is mono", ["camera"], registry=r).labels(camera)
        self.reconnects = Counter("linewatch_camera_reconnects", "Times the source was lost and opened again",
                                  ["camera"], registry=r).labels(camera)
        self.open_failures = Counter("linewatch_camera_open_failures", "Failed tries to open the source",
                                     ["camera"], registry=r).labels(camera)
        self.source_up = Gauge("linewatch_camera_source_up", "1 while the source is open", ["camera"],
                               registry=r).labels(camera)
        self.last_capture = Gauge("linewatch_camera_last_frame_capture_timestamp_seconds",
                                  "Capture time of the last frame (seconds since the epoch)", ["camera"],
                                  registry=r).labels(camera)
        self.native_messages = Counter("linewatch_native_messages", "Lines native libraries (OpenCV, FFmpeg, libjpeg, "
                                       "libpng) wrote to stderr, logged as native_library_message", ["library"],
                                       registry=r)
        self.clock_offset = Gauge("linewatch_camera_clock_offset_seconds", "Host clock minus the camera's clock, "
                                  "as the source maps camera timestamps (GenICam); absent for sources without one",
                                  ["camera"], registry=r)
        self._camera = camera
        self._last_frame_mono = time.monotonic()  # before the first frame: since start
        Gauge("linewatch_camera_seconds_since_last_frame", "Seconds since the last frame was read (since the "
              "bridge started, before the first)", ["camera"], registry=r).labels(camera).set_function(
            lambda: time.monotonic() - self._last_frame_mono)

    def frame(self, capture_ts: float, clock_offset_s: float | None = None) -> None:
        self._last_frame_mono = time.monotonic()
        self.captured.inc()
        self.last_capture.set(capture_ts)
        if clock_offset_s is not None:
            self.clock_offset.labels(self._camera).set(clock_offset_s)


class Sink(Protocol):
    def start(self, stop: threading.Event) -> None:
        """Called by the loop before the first open (may wait, on `stop`)."""

    def ready(self) -> bool:
        """Whether a frame handed on now would be taken (a source that can wait asks before reading)."""

    def deliver(self, captured: Captured, image: np.ndarray, pixel_format: str) -> str:
        """Hand one frame on: "sent", or a reason from DROP_REASONS."""

    def close(self) -> None: ...


class DaemonSink:
    """Frames to the daemon's ingest: an XPUB socket that connects (FramePublisher)."""

    def __init__(self, config: CameraConfig, curve: ClientKeys | None, log: Any = None) -> None:
        self.config = config
        self.log = log
        self.publisher = FramePublisher(config.endpoint, config.camera, config.encoding, mode="connect", curve=curve,
                                        send_hwm=config.send_hwm, watch_subscribers=True,
                                        jpeg_quality=config.jpeg_quality)

    def start(self, stop: threading.Event) -> None:
        """Wait (connect_timeout_s at most) for the daemon to subscribe: frames before that would be lost."""
        if not self.publisher.wait_subscribed(self.config.connect_timeout_s, stop) and not stop.is_set() and self.log:
            self.log.warning("camera_no_daemon", camera=self.config.camera, endpoint=self.config.endpoint,
                             detail=f"no daemon subscribed within {self.config.connect_timeout_s:g} s; frames are "
                             "dropped and counted (no_daemon) until one does")

    def ready(self) -> bool:
        return self.publisher.subscribed

    def deliver(self, captured: Captured, image: np.ndarray, pixel_format: str) -> str:
        return self.publisher.send(captured.frame_id, image, capture_ts=captured.capture_ts, part_id=captured.part_id,
                                   pixel_format=pixel_format)

    def close(self) -> None:
        self.publisher.close()


class FileSink:
    """Frames to PNG files in a folder, and their ids and times for grab.json."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.records: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)

    def start(self, stop: threading.Event) -> None:
        pass

    def ready(self) -> bool:
        return True

    def deliver(self, captured: Captured, image: np.ndarray, pixel_format: str) -> str:
        name = f"frame-{len(self.records):05d}.png"
        if pixel_format == "rgb":
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        ok, encoded = cv2.imencode(".png", image)
        if not ok:
            raise OSError(f"could not encode frame {captured.frame_id} as PNG")
        (self.out / name).write_bytes(encoded.tobytes())
        self.records.append({
            "file": name, "frame_id": captured.frame_id, "capture_ts": captured.capture_ts,
            "part_id": captured.part_id, "width": int(image.shape[1]), "height": int(image.shape[0]),
            "channels": 1 if image.ndim == 2 else int(image.shape[2]),
            "pixel_format": "gray" if pixel_format == "gray" else "rgb",  # as written: PNG holds RGB
        })
        return "sent"

    def close(self) -> None:
        pass


class CameraBridge:
    """Source -> sink, with reconnects (see the module's docstring)."""

    def __init__(self, config: CameraConfig, source: Source, sink: Sink, metrics: CameraMetrics, log: Any,
                 first_open_fatal: bool | None = None) -> None:
        self.config = config
        self.source = source
        self.sink = sink
        self.metrics = metrics
        self.log = log
        self.first_open_fatal = (not source.live) if first_open_fatal is None else first_open_fatal
        self.delivered = 0  # frames the sink took ("sent")
        self.dropped = 0
        self.up = False
        self.heartbeat = time.monotonic()  # the loop's last sign of life (the systemd watchdog looks)
        self.lost_reason: str | None = "not opened yet"
        self._backoff = Backoff(config.reconnect.initial_s, config.reconnect.max_s)
        self._next_send = 0.0
        self._warned_grey = False
        self._warned_depth = False
        self._logged_drop: dict[str, float] = {}
        self._unreadable_seen = 0
        self._waiting = False  # a source that can wait is waiting for the daemon

    def run(self, stop: threading.Event, count: int | None = None) -> int:
        """Capture until `stop` is set or `count` frames were delivered; returns frames delivered.
        Raises SourceError when the first open fails and `first_open_fatal`."""
        lost_at: float | None = None
        tries = 0
        opened_once = False
        try:
            self.sink.start(stop)
            while not stop.is_set() and (count is None or self.delivered < count):
                self.heartbeat = time.monotonic()
                if not self.up:
                    try:
                        self.source.open()
                    except SourceLost as e:
                        self.metrics.open_failures.inc()
                        if not opened_once and self.first_open_fatal:
                            raise SourceError(f"cannot open {self.source.describe()}: {e}") from None
                        tries += 1
                        self._wait_after_loss(stop, f"cannot open: {e}", tries)
                        continue
                    self.up, opened_once = True, True
                    self.lost_reason = None
                    self.metrics.source_up.set(1)
                    if lost_at is not None:
                        self.metrics.reconnects.inc()
                        self.log.info("camera_source_reopened", camera=self.config.camera, source=self.source.describe(),
                                      away_s=round(time.monotonic() - lost_at, 3), tries=tries)
                    else:
                        self.log.info("camera_source_opened", camera=self.config.camera, source=self.source.describe())
                    lost_at, tries = None, 0
                if self.source.can_wait and not self.sink.ready():  # files keep: read none while no daemon takes them
                    if not self._waiting:
                        self._waiting = True
                        self.log.warning("camera_waiting_for_daemon", camera=self.config.camera,
                                         endpoint=self.config.endpoint, detail="no daemon subscribed; files stay in "
                                         "the folder until one does")
                    stop.wait(0.1)
                    continue
                if self._waiting:
                    self._waiting = False
                    self.log.info("camera_daemon_back", camera=self.config.camera, endpoint=self.config.endpoint)
                lost_before = self.source.lost_frames
                try:
                    captured = self.source.read(stop)
                except SourceLost as e:
                    self._count_lost(lost_before)
                    self.source.close()
                    self.up = False
                    self.metrics.source_up.set(0)
                    lost_at = time.monotonic()
                    tries = 1
                    self._wait_after_loss(stop, str(e), tries)
                    continue
                self._count_lost(lost_before)
                if captured is not None:
                    self._backoff.reset()
                    self._deliver(captured, stop)
        finally:
            self.source.close()
            self.up = False
            self.metrics.source_up.set(0)
            self.sink.close()
        return self.delivered

    def _wait_after_loss(self, stop: threading.Event, reason: str, tries: int) -> None:
        delay = self._backoff.next()
        self.lost_reason = reason
        self.log.warning("camera_source_lost", camera=self.config.camera, source=self.source.describe(),
                         reason=reason, tries=tries, retry_in_s=round(delay, 3))
        stop.wait(delay)

    def _count_lost(self, before: int) -> None:
        lost = self.source.lost_frames - before
        if lost > 0:
            self.metrics.dropped["read_failed"].inc(lost)
            self.dropped += lost
        unreadable = getattr(self.source, "unreadable_files", None)
        if unreadable is not None:
            new = unreadable - self._unreadable_seen
            if new > 0:
                self.metrics.dropped["unreadable_file"].inc(new)
                self.dropped += new
            self._unreadable_seen = unreadable

    def _deliver(self, captured: Captured, stop: threading.Event) -> None:
        """Hand one frame to the sink. A source whose frames can wait (a hot folder: the file stays)
        is paced by max_fps and waits out a full queue or an absent daemon instead of dropping;
        stopped meanwhile, the frame is given back (`undo`: the file is sent after the restart)."""
        self.metrics.frame(captured.capture_ts, self.source.clock_offset_s)
        waits = self.source.can_wait
        handed_on = False
        try:
            if self.config.max_fps > 0 and not self._on_schedule(stop, waits):
                return
            image, pixel_format = self._colour(captured)
            outcome = self.sink.deliver(captured, image, pixel_format)
            delay = 0.01
            while waits and outcome != "sent" and not stop.wait(delay):
                self.heartbeat = time.monotonic()  # waiting is no hang: the watchdog must not kill it
                delay = min(delay * 2, 0.5)
                outcome = self.sink.deliver(captured, image, pixel_format)
            if waits and outcome != "sent":
                return  # stopped while waiting: given back, neither sent nor lost
            handed_on = True
        finally:
            finish = captured.done if handed_on or not waits else captured.undo
            if finish is not None:
                finish()
        if outcome == "sent":
            self.delivered += 1
            self.metrics.sent.inc()
            return
        self.dropped += 1
        self.metrics.dropped[outcome].inc()
        now = time.monotonic()
        if now - self._logged_drop.get(outcome, -1e9) >= 10.0:  # one line per reason per 10 s
            self._logged_drop[outcome] = now
            self.log.warning("camera_frame_dropped", camera=self.config.camera, frame_id=captured.frame_id,
                             reason=outcome, dropped_total=self.dropped)

    def _on_schedule(self, stop: threading.Event, waits: bool) -> bool:
        """max_fps: whether this frame goes now (after waiting for its turn, for a source that can
        wait; a live source's early frame is skipped and counted)."""
        interval = 1.0 / self.config.max_fps
        now = time.monotonic()
        if now < self._next_send:
            if not waits:
                self.metrics.skipped.inc()
                return False
            while now < self._next_send:  # in steps, so the watchdog sees the loop alive
                if stop.wait(min(self._next_send - now, 1.0)):
                    return False
                self.heartbeat = now = time.monotonic()
        if self._next_send == 0.0 or now - self._next_send > interval:  # the first frame, or long behind
            self._next_send = now + interval
        else:  # on the schedule: a late frame does not push the next one later
            self._next_send += interval
        return True

    def _colour(self, captured: Captured) -> tuple[np.ndarray, str]:
        image, pixel_format = self._sample_depth(captured.image), captured.pixel_format
        if pixel_format != "gray":
            return image, pixel_format
        if self.config.mono_to_rgb:
            return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), "bgr"
        self.metrics.grey.inc()
        if not self._warned_grey:
            self._warned_grey = True
            self.log.warning("camera_grey_frames", camera=self.config.camera, source=self.source.describe(),
                             detail="the source delivers grey frames; they are sent grey, which a mono bank (built "
                             "from grey good images) judges and a colour bank answers `error` (grey_image); for a "
                             "colour bank set mono_to_rgb (--mono-to-rgb) to send them as 3 equal channels")
        return image, pixel_format

    def _sample_depth(self, image: np.ndarray) -> np.ndarray:
        """16-bit samples (Mono10/12/16, 16-bit files) go as they are in raw and PNG frames, so the
        daemon's `detector.sample_window` sees all of them; JPEG holds 8 bits, so for it they are
        reduced through the full 16-bit range (`images.scale_window`'s default, as the daemon's
        default window would), with one warning."""
        if image.dtype != np.uint16 or self.config.encoding != "jpeg":
            return image
        if not self._warned_depth:
            self._warned_depth = True
            self.log.warning("camera_16bit_to_8bit", camera=self.config.camera, source=self.source.describe(),
                             detail="16-bit frames are reduced to 8 bits (v / 257) for JPEG, and the daemon's "
                             "detector.sample_window does not apply; encoding raw or png sends all 16 bits")
        return scale_window(image)
