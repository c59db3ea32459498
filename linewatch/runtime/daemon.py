"""The daemon: ingest -> pipeline -> verdict sinks, with metrics, health and systemd glue.

Start-up order: metrics and the health server (so a failed start is visible), the verdict sinks
(linewatch.runtime.sinks: archive, live page, ZeroMQ publisher, MQTT, as the config turns them
on), the pipeline, then ingest last (nothing arrives before everything behind it runs). Then
READY=1 to systemd (linewatch.runtime.systemd). Shutdown (SIGTERM/SIGINT) goes the other way:
STOPPING=1, ingest stops, the pipeline drains (every in-flight frame is answered), the sinks
close, exit 0.

Recipe changeover: `switch_bank` puts another bank (and product config) in service while
frames flow (linewatch.runtime.changeover); the control socket (`linewatch bank switch`) and
SIGHUP ask for it. See docs/operations.md, Recipe changeover.

Self-check (`runtime.selfcheck`, linewatch.runtime.selfcheck): reference frames on a reserved
camera id go through the pipeline like any frame; their verdicts come back here and go to the
self-check alone, never to a sink (publisher, MQTT, archive, live page's counts). Ingest drops
frames of real senders that use the reserved id. It starts after the pipeline (its first
round at once) and stops before ingest; each bank switch loads the new bank's references and
checks it at once.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import linewatch
from linewatch.config import RuntimeConfig
from linewatch.runtime.changeover import BankLoader, BankSwitch, Changeover
from linewatch.runtime.pipeline.clock import SYSTEM_CLOCK, Clock
from linewatch.runtime.ops.health import HealthServer
from linewatch.runtime.ops.logs import SummaryLogger, configure_logging
from linewatch.runtime.ops.metrics import CameraLabels, Metrics
from linewatch.runtime.ops.native_stderr import NativeStderr
from linewatch.runtime.pipeline.runner import Pipeline, Processor
from linewatch.runtime.selfcheck import ReferenceLoader, SelfCheck
from linewatch.runtime.sinks import SinkContext, SinkList, build_sinks
from linewatch.runtime.systemd import Watchdog, sd_notify
from linewatch.runtime.transport import FrameSource
from linewatch.wire import Frame, ImageLimits, Verdict, WireError


class Daemon:
    """Composes Ingest, Pipeline, the verdict sinks, Metrics and the health server.

    config: the `runtime` section. processor: the loaded detector (its bank is loaded, so
    readiness only waits for ingest). log: a structlog logger (default: configured from
    `config.logging` with `configure_logging`).
    summary_interval_s: period of the INFO summary line. drain_timeout_s: how long shutdown
    waits for in-flight frames (default: the frame deadline plus 2 s, after which every
    frame has an answer anyway). bank_loader: what `switch_bank` loads a new bank with
    (None: switches are refused). selfcheck_references: the self-check's references for a
    processor (linewatch.selfcheck_references.load_references; needed when
    `config.selfcheck.enabled`), raising ValueError or OSError with what to fix.
    """

    def __init__(self, config: RuntimeConfig, processor: Processor, log: Any = None,
                 summary_interval_s: float = 60.0, drain_timeout_s: float | None = None,
                 clock: Clock = SYSTEM_CLOCK, bank_loader: BankLoader | None = None,
                 selfcheck_references: ReferenceLoader | None = None) -> None:
        self.config = config
        self._reload_requested = False  # set by SIGHUP, acted on by run_until_signal's loop
        self.clock = clock
        # Without a logger from the caller, the daemon sets up logging from its own config.
        self.log = log if log is not None else configure_logging(config.logging)
        check = config.selfcheck
        self._private_cameras = frozenset({check.camera}) if check.enabled else frozenset()
        # the self-check's camera has a label of its own, like the allow-list's
        self.metrics = Metrics(camera_labels=CameraLabels(config.metrics.max_camera_labels,
                                                          [*config.ingest.cameras, *self._private_cameras]))
        self._show_calibration(processor)
        self.drain_timeout_s = drain_timeout_s if drain_timeout_s is not None else config.pipeline.deadline_ms / 1000 + 2.0
        # Every verdict consumer, in the order each verdict reaches them (linewatch.runtime.sinks).
        self.sinks = SinkList(build_sinks(SinkContext(config, self.metrics, self.log, clock, self.live_status)),
                              self.metrics, self.log)
        overlay = None
        if self.sinks.wants_overlay:  # on the wire: rendered on the stage thread, before the release
            from linewatch.overlay import overlay_jpeg as overlay
        self.pipeline = Pipeline(processor, config.batch, config.pipeline, self._publish, self.metrics, self.log,
                                 overlay=overlay, clock=clock, keep_images=self.sinks.wants_image,
                                 decode_workers=config.ingest.decode_workers, private_cameras=self._private_cameras)
        self.selfcheck: SelfCheck | None = None
        if check.enabled:
            ic = config.ingest
            self.selfcheck = SelfCheck(check, self.pipeline.submit, self.metrics, self.log, clock,
                                       ImageLimits(ic.max_payload_bytes, ic.max_image_pixels, ic.max_decoded_bytes),
                                       loader=selfcheck_references)
        self.changeover = Changeover(self.pipeline, bank_loader, self.metrics, self.log, self._show_bank,
                                     stopping=lambda: self._stopping)
        self.summary = SummaryLogger(self.log, self.pipeline.stats, self.pipeline.take_latencies, summary_interval_s)
        # libpng's/libjpeg's/OpenCV's raw stderr lines as rate-limited log events while it runs
        self.native_stderr = NativeStderr(self.log, self.metrics, enabled=config.logging.capture_native_stderr)
        self.health: HealthServer | None = None
        self.ingest: FrameSource | None = None
        self.control: Any = None  # linewatch.runtime.ops.control.ControlServer
        self.watchdog = Watchdog(self.watchdog_check)
        self._listening = False
        self._served = False  # start() completed once
        self._stopping = False
        self._signal = threading.Event()
        self._unhealthy_logged = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start everything; raises (with what to fix) when a socket cannot be opened."""
        # Imported here: ingest pulls in zmq, which the pipeline and its tests do not need.
        from linewatch.runtime.transport.ingest import Ingest

        p, m = self.processor, self.metrics
        m.set_build_info(linewatch.__version__, p.backend)
        m.set_bank_info(p.bank_id, p.backend, p.bank_images)
        m.track_gpu_memory()
        m.ready.set(0)
        try:
            self.health = HealthServer(self.config.metrics, m.registry, self.dead_threads, self.readiness,
                                       self.sinks.routes)
        except OSError as e:
            mc = self.config.metrics
            raise RuntimeError(
                f"runtime.metrics: cannot listen on {mc.host}:{mc.port}: {e.strerror or e} "
                "(is another linewatch running? pick another port, or 0 for any)"
            ) from None
        self.health.start()
        self.native_stderr.start()
        try:
            self.sinks.start()  # before the pipeline: no verdict may pass one by
            self.pipeline.start()
            if self.selfcheck is not None:
                self.selfcheck.use_bank(p, at_start=True)  # a start without references fails here
                self.selfcheck.start()
            self.ingest = Ingest(self.config.ingest, self._on_frame, self._on_error, log=self.log, metrics=m,
                                 clock=self.clock, security=self.config.security, reserved_cameras=self._private_cameras)
            self.ingest.start()
            if self.config.control.socket:
                from linewatch.runtime.ops.control import ControlServer

                # its `switch` command: switch_bank's answer as a dict
                self.control = ControlServer(self.config.control.socket,
                                             lambda bank, config: self.switch_bank(bank, config).to_dict(), self.log)
                self.control.start()
        except Exception:
            self.stop()  # release what did start (threads, sockets, the HTTP port)
            raise
        self._listening = True
        self._served = True
        self.summary.start()
        m.ready.set(1)
        self.watchdog.start()
        sd_notify("READY=1\nSTATUS=inspecting")
        self.log.info("started", backend=p.backend, bank_id=p.bank_id, metrics_port=self.health.port,
                      endpoints=[e.url for e in self.config.ingest.endpoints], publish=self.config.publish.url,
                      watchdog_s=self.watchdog.interval_s)

    def run_until_signal(self) -> int:
        """Start (if needed), wait for SIGTERM/SIGINT, then shut down cleanly. Returns 0.
        SIGHUP meanwhile: switch to what a restart would load (`switch_bank()`).

        Must be called from the main thread (Python delivers signals there).
        """
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_reload_signal)
        try:
            if self.health is None:
                self.start()
            while not self._signal.wait(0.5):
                if self._reload_requested:
                    self._reload_requested = False
                    self.log.info("reload_signal_received")
                    # on its own thread: loading takes seconds, and SIGTERM meanwhile must not wait
                    threading.Thread(target=self.switch_bank, name="lw-reload", daemon=True).start()
            self.log.info("signal_received")
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    def request_stop(self) -> None:
        """Ask run_until_signal() to return (what the signal handlers do)."""
        self._signal.set()

    def stop(self) -> None:
        """Stop ingest, drain the pipeline (every frame answered), close the sinks."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self.watchdog.stop()  # no WATCHDOG=1 after STOPPING=1
        sd_notify("STOPPING=1")
        self.metrics.ready.set(0)
        t0 = time.monotonic()
        before = self.pipeline.inflight()
        if self.selfcheck is not None:
            self._close(self.selfcheck, "selfcheck")
        if self.ingest is not None:
            self._close(self.ingest, "ingest")
        self._listening = False
        if self.control is not None:
            self._close(self.control, "control")
        clean = self.pipeline.drain(self.drain_timeout_s)
        self.pipeline.stop()
        self.sinks.stop()
        try:
            self.summary.stop()
        except Exception:  # noqa: BLE001
            pass
        if self.health is not None:
            self.health.stop()
        if self._served:  # a start that failed says so in one line (its exception), nothing more
            self.log.info("stopped", drained=clean, inflight_at_stop=before, drain_s=round(time.monotonic() - t0, 3))
        self.native_stderr.stop()  # last: native lines written while stopping are logged too

    # ------------------------------------------------------------------ checks

    def dead_threads(self) -> list[str]:
        """Threads that should be running but are not (for /healthz)."""
        if self._stopping:
            return []
        dead = self.pipeline.dead_threads()
        if self.summary.thread.ident is not None and not self.summary.thread.is_alive():
            dead.append(self.summary.thread.name)
        for part in (self.ingest, self.sinks, self.control, self.selfcheck):
            if part is not None:
                dead.extend(part.dead_threads())
        return dead

    def readiness(self) -> tuple[bool, str]:
        """(ready, why) for /readyz: the bank is loaded (we hold the processor) and ingest listens."""
        if self._stopping:
            return False, "shutting down"
        if not self._listening:
            return False, "ingest not listening yet"
        if not self.pipeline.accepting:
            return False, "pipeline not accepting frames"
        check = self.selfcheck
        if check is not None and self.config.selfcheck.unready_on_failure and check.failing:
            failed = ", ".join(check.last.to_dict()["failed"]) if check.last is not None else ""
            return False, f"self-check failed ({failed}); selfcheck.unready_on_failure is set"
        return True, f"ready: bank {self.processor.bank_id} ({self.processor.backend}) loaded, ingest listening"

    # ------------------------------------------------------------------ callbacks

    def _on_frame(self, frame: Frame) -> None:
        try:
            self.pipeline.submit(frame)
        except Exception as e:  # noqa: BLE001 - never let the pipeline kill an ingest thread
            self.log.error("submit_failed", camera=frame.camera, frame_id=frame.frame_id, error=repr(e))

    def _on_error(self, err: WireError, received_mono: float) -> None:
        """A frame that failed to decode: answered `error` with the wire error's reason."""
        try:
            camera = err.camera if err.camera is not None else ""
            frame_id = err.frame_id if err.frame_id is not None else -1
            self.pipeline.submit_error(camera, frame_id, err.reason, received_mono, self.clock.time())
            self.log.debug("wire_error", camera=camera, frame_id=frame_id, reason=err.reason, detail=err.detail)
        except Exception as e:  # noqa: BLE001
            self.log.error("submit_error_failed", error=repr(e))

    def _publish(self, verdict: Verdict) -> None:
        """The pipeline's on_verdict (its output thread): the verdict, as an Outcome, to every sink
        in order; a sink that raises loses its copy, never the verdict (linewatch.runtime.sinks).
        The self-check's verdicts go to the self-check alone."""
        if verdict.camera in self._private_cameras and self.selfcheck is not None:
            self.selfcheck.on_verdict(verdict)
            return
        self.sinks.publish(verdict)

    @property
    def publisher(self) -> Any:
        """The `publish` sink's Publisher: its bound_url is where the verdicts go out."""
        return self.sinks.target("publish")

    def live_status(self) -> dict[str, Any]:
        """What the live page shows about the daemon itself: the bank and backend in service."""
        p = self.processor
        return {"bank_id": p.bank_id, "backend": p.backend, "bank_images": p.bank_images,
                "ready": self.readiness()[0], "version": linewatch.__version__,
                "selfcheck": self.selfcheck.state() if self.selfcheck is not None else None}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signal.set()

    def _on_reload_signal(self, signum: int, frame: Any) -> None:
        self._reload_requested = True  # a plain flag: a handler must not wait for a lock the loop may hold

    # ------------------------------------------------------------------ bank switch

    @property
    def processor(self) -> Processor:
        """The processor in service (the pipeline's; a switch changes it): the live page and
        /readyz show its bank."""
        return self.pipeline.processor

    def switch_bank(self, bank: str | None = None, config: str | None = None) -> BankSwitch:
        """Put another bank in service while frames flow (a recipe changeover): see
        linewatch.runtime.changeover.Changeover.switch. Slow: never on the verdict path."""
        return self.changeover.switch(bank, config)

    def _show_bank(self, old: Processor, new: Processor) -> None:
        """The metrics that describe the bank in service: its info (the old label set goes), the
        build's backend, and the calibration scores the drift alert compares with."""
        m = self.metrics
        m.bank_info.remove(old.bank_id, old.backend, str(old.bank_images))
        m.set_bank_info(new.bank_id, new.backend, new.bank_images)
        if new.backend != old.backend:
            m.build_info.remove(linewatch.__version__, old.backend)
            m.set_build_info(linewatch.__version__, new.backend)
        self._show_calibration(new)
        if self.selfcheck is not None:  # the new bank's references, checked at once
            self.selfcheck.use_bank(new, at_start=False)

    def _show_calibration(self, processor: Processor) -> None:
        """The scores the processor's bank was calibrated on: the score drift alert's reference
        (none without a calibrated bank: the histogram stays empty)."""
        c = processor.calibration
        self.metrics.set_calibration(c.scores if c is not None else (), c.threshold if c is not None else None)

    def watchdog_check(self) -> bool:
        """Send WATCHDOG=1 if the pipeline is healthy (returns whether it did): a stuck pipeline
        gets no ping, and systemd restarts it. Called every half watchdog interval."""
        ok, why = self.pipeline.healthy()
        dead = self.dead_threads()
        if ok and not dead:
            sd_notify("WATCHDOG=1")
            self._unhealthy_logged = False
            return True
        if not self._unhealthy_logged:
            self._unhealthy_logged = True
            self.log.error("unhealthy_watchdog_withheld", why=why if not ok else "dead threads: " + ", ".join(dead))
        return False

    def _close(self, part: Any, name: str) -> None:
        try:
            part.stop()
        except Exception as e:  # noqa: BLE001 - keep shutting down the rest
            self.log.error("close_failed", part=name, error=repr(e))
