"""The daemon: ingest -> pipeline -> publish, with metrics, health and systemd glue.

Start-up order: metrics and the health server (so a failed start is visible), the pipeline,
the publisher, then ingest last (nothing arrives before everything behind it runs). Then
READY=1 to systemd. Shutdown (SIGTERM/SIGINT) goes the other way: STOPPING=1, ingest stops,
the pipeline drains (every in-flight frame is answered), the publisher closes, exit 0.

Recipe changeover: `switch_bank` puts another bank (and product config) in service while
frames flow, through the bank loader the caller gives (`linewatch serve`'s is
linewatch.recipe.RecipeLoader); the control socket (`linewatch bank switch`) and SIGHUP ask
for it. See docs/operations.md, Recipe changeover.

systemd notifications are sent by `sd_notify` below: a datagram to $NOTIFY_SOCKET, the whole
protocol, so no libsystemd binding is needed.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import linewatch
from linewatch.config import RuntimeConfig
from linewatch.runtime.clock import SYSTEM_CLOCK, Clock
from linewatch.runtime.health import HealthServer
from linewatch.runtime.logs import SummaryLogger, configure_logging
from linewatch.runtime.metrics import CameraLabels, Metrics
from linewatch.runtime.pipeline import Pipeline, Processor
from linewatch.runtime.transport import FrameSource, VerdictSink, verdict_sink
from linewatch.wire import Frame, Verdict, WireError

# ---------------------------------------------------------------- systemd notify protocol


def sd_notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1", "WATCHDOG=1", "STOPPING=1") to systemd.

    Uses $NOTIFY_SOCKET (a filesystem path, or "@name" for the abstract namespace). Returns
    False when there is no socket to notify (not run by systemd) or the send failed; never
    raises, since a missing supervisor must not stop the line.
    """
    env = os.environ if env is None else env
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
        return True
    except OSError:
        return False


def watchdog_interval_s(env: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, or None when not enabled.

    $WATCHDOG_PID, when set, must be this process (systemd sets it for the main PID only).
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2 / 1e6 if value > 0 else None


# ---------------------------------------------------------------- bank switches


class SwitchRefused(Exception):
    """A bank that cannot go into service; the message says why, in words for the operator
    (a bank loader raises it for a bad file, a bank built under other settings, ...)."""


@dataclass
class LoadedBank:
    """What a bank loader hands the daemon for a switch."""

    processor: Processor
    path: str  # the bank file it came from (logged, and in the reply)
    warnings: list[str] = field(default_factory=list)  # what could not be applied (restart-only settings)


# loader(bank, config, in_service) -> LoadedBank: `bank` and `config` are the request's file
# paths (None: the loader's defaults), `in_service` the processor serving now (its models may
# be reused). It raises SwitchRefused (or anything else) when the bank cannot go into service.
BankLoader = Callable[[str | None, str | None, Processor], LoadedBank]


@dataclass
class BankSwitch:
    """The outcome of a switch request (the control socket sends it back as JSON)."""

    switched: bool
    bank_id: str  # in service afterwards: the new bank, or the old one when refused
    reason: str | None = None  # why it was refused
    old_bank_id: str | None = None
    bank: str | None = None  # the bank file put in service
    frames_before: int | None = None  # frames received before the cut (over the run): the old bank's
    last_frame_ids: dict[str, int] | None = None  # per camera, the last frame the old bank judges
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- the daemon


class Daemon:
    """Composes Ingest, Pipeline, Publisher, Metrics and the health server.

    config: the `runtime` section. processor: the loaded detector (its bank is loaded, so
    readiness only waits for ingest). log: a structlog logger (default: configured from
    `config.logging` with `configure_logging`).
    summary_interval_s: period of the INFO summary line. drain_timeout_s: how long shutdown
    waits for in-flight frames (default: the frame deadline plus 2 s, after which every
    frame has an answer anyway). bank_loader: what `switch_bank` loads a new bank with
    (None: switches are refused).
    """

    def __init__(self, config: RuntimeConfig, processor: Processor, log: Any = None,
                 summary_interval_s: float = 60.0, drain_timeout_s: float | None = None,
                 clock: Clock = SYSTEM_CLOCK, bank_loader: BankLoader | None = None) -> None:
        self.config = config
        self.bank_loader = bank_loader
        self._switching = threading.Lock()  # one bank switch at a time
        self._reload_requested = False  # set by SIGHUP, acted on by run_until_signal's loop
        self.clock = clock
        # Without a logger from the caller, the daemon sets up logging from its own config.
        self.log = log if log is not None else configure_logging(config.logging)
        self.metrics = Metrics(camera_labels=CameraLabels(config.metrics.max_camera_labels, config.ingest.cameras))
        self._show_calibration(processor)
        self.drain_timeout_s = drain_timeout_s if drain_timeout_s is not None else config.pipeline.deadline_ms / 1000 + 2.0
        overlay = None
        if config.publish.overlay_jpeg:
            from linewatch.overlay import overlay_jpeg as overlay
        # Sinks beside the verdict publisher. The archive and the live page keep pictures, so the
        # pipeline attaches each judged frame's image to its verdict for them (never encoded).
        self.archive: Any = None  # linewatch.runtime.archive.Archive
        self.live: Any = None  # linewatch.runtime.live.LiveView
        self.extra_sinks: dict[str, VerdictSink] = {}  # by name (the `sink` label of linewatch_sink_dropped): mqtt
        if config.archive.enabled:
            from linewatch.runtime.archive import Archive

            self.archive = Archive(config.archive, metrics=self.metrics, log=self.log, clock=clock)
        if config.live.enabled:
            from linewatch.runtime.live import LiveView

            self.live = LiveView(config.live, status=self.live_status, clock=clock)
        if config.mqtt.enabled:
            from linewatch.runtime.mqtt import MqttSink

            self.extra_sinks["mqtt"] = MqttSink(config.mqtt, log=self.log, metrics=self.metrics)
        self.pipeline = Pipeline(processor, config.batch, config.pipeline, self._publish, self.metrics, self.log,
                                 overlay=overlay, clock=clock,
                                 keep_images=self.archive is not None or self.live is not None)
        self.summary = SummaryLogger(self.log, self.pipeline.stats, self.pipeline.take_latencies, summary_interval_s)
        self.health: HealthServer | None = None
        self.ingest: FrameSource | None = None
        self.publisher: VerdictSink | None = None
        self.control: Any = None  # linewatch.runtime.control.ControlServer
        self._listening = False
        self._served = False  # start() completed once
        self._stopping = False
        self._stopped = threading.Event()
        self._signal = threading.Event()
        self._watchdog_thread: threading.Thread | None = None
        self._unhealthy_logged = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start everything; raises (with what to fix) when a socket cannot be opened."""
        # Imported here: ingest pulls in zmq, which the pipeline and its tests do not need.
        from linewatch.runtime.ingest import Ingest

        p, m = self.processor, self.metrics
        m.set_build_info(linewatch.__version__, p.backend)
        m.set_bank_info(p.bank_id, p.backend, p.bank_images)
        m.track_gpu_memory()
        m.ready.set(0)
        try:
            routes = {"/live": self.live.handle} if self.live is not None else {}
            self.health = HealthServer(self.config.metrics, m.registry, self.dead_threads, self.readiness, routes)
        except OSError as e:
            mc = self.config.metrics
            raise RuntimeError(
                f"runtime.metrics: cannot listen on {mc.host}:{mc.port}: {e.strerror or e} "
                "(is another linewatch running? pick another port, or 0 for any)"
            ) from None
        self.health.start()
        try:
            if self.archive is not None:
                self.archive.start()  # before the pipeline: no verdict may pass it by
            for name, sink in self.extra_sinks.items():
                sink.start()
                m.track_queue(name, lambda sink=sink: sink.pending)
            self.pipeline.start()
            publisher = self.publisher = verdict_sink(self.config.publish, self.log, m, self.config.security)
            publisher.start()
            m.track_queue("publish", lambda: publisher.pending)
            self.ingest = Ingest(self.config.ingest, self._on_frame, self._on_error, log=self.log, metrics=m,
                                 clock=self.clock, security=self.config.security)
            self.ingest.start()
            if self.config.control.socket:
                from linewatch.runtime.control import ControlServer

                self.control = ControlServer(self.config.control.socket, self._switch_request, self.log)
                self.control.start()
        except Exception:
            self.stop()  # release what did start (threads, sockets, the HTTP port)
            raise
        self._listening = True
        self._served = True
        self.summary.start()
        m.ready.set(1)
        interval = watchdog_interval_s()
        if interval:
            self._watchdog_thread = threading.Thread(target=self._watchdog_loop, args=(interval,),
                                                     name="lw-watchdog", daemon=True)
            self._watchdog_thread.start()
        sd_notify("READY=1\nSTATUS=inspecting")
        self.log.info("started", backend=p.backend, bank_id=p.bank_id, metrics_port=self.health.port,
                      endpoints=[e.url for e in self.config.ingest.endpoints], publish=self.config.publish.url,
                      watchdog_s=interval)

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
        """Stop ingest, drain the pipeline (every frame answered), close the publisher."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._stopped.set()  # no WATCHDOG=1 after STOPPING=1
        if self._watchdog_thread is not None:
            self._watchdog_thread.join(2.0)
        sd_notify("STOPPING=1")
        self.metrics.ready.set(0)
        t0 = time.monotonic()
        before = self.pipeline.inflight()
        if self.ingest is not None:
            self._close(self.ingest, "ingest")
        self._listening = False
        if self.control is not None:
            self._close(self.control, "control")
        clean = self.pipeline.drain(self.drain_timeout_s)
        self.pipeline.stop()
        if self.publisher is not None:
            self._close(self.publisher, "publisher")
        for name, sink in self.extra_sinks.items():
            self._close(sink, name)
        if self.archive is not None:
            self._close(self.archive, "archive")
        try:
            self.summary.stop()
        except Exception:  # noqa: BLE001
            pass
        if self.health is not None:
            self.health.stop()
        if self._served:  # a start that failed says so in one line (its exception), nothing more
            self.log.info("stopped", drained=clean, inflight_at_stop=before, drain_s=round(time.monotonic() - t0, 3))

    # ------------------------------------------------------------------ checks

    def dead_threads(self) -> list[str]:
        """Threads that should be running but are not (for /healthz)."""
        if self._stopping:
            return []
        dead = self.pipeline.dead_threads()
        if self.summary.thread.ident is not None and not self.summary.thread.is_alive():
            dead.append(self.summary.thread.name)
        for part in (self.ingest, self.publisher, self.archive, *self.extra_sinks.values(), self.control):
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
        """Hand one verdict to every sink (on the pipeline's output thread; each call only queues,
        except the archive's row, which is written before the verdict leaves, see archive.py)."""
        if self.archive is not None:
            self._feed(self.archive.record, verdict, "archive_row")
        if self.live is not None:
            self._feed(self.live.publish, verdict, "live")
        verdict.image = None  # the pictures stay with the sinks that keep them
        self.publisher.publish(verdict)
        for name, sink in self.extra_sinks.items():
            self._feed(sink.publish, verdict, name)

    def _feed(self, publish: Any, verdict: Verdict, sink: str) -> None:
        """A secondary sink that fails loses its copy of the verdict (counted), never the verdict."""
        try:
            publish(verdict)
        except Exception as e:  # noqa: BLE001
            self.metrics.sink_dropped.labels(sink=sink, reason="exception").inc()
            self.log.error("sink_failed", sink=sink, camera=verdict.camera, frame_id=verdict.frame_id, error=repr(e))

    def live_status(self) -> dict[str, Any]:
        """What the live page shows about the daemon itself: the bank and backend in service."""
        p = self.processor
        return {"bank_id": p.bank_id, "backend": p.backend, "bank_images": p.bank_images,
                "ready": self.readiness()[0], "version": linewatch.__version__}

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
        """Put another bank in service while frames flow (a recipe changeover).

        `bank`, `config`: file paths for the bank loader (None: its defaults; both None: what a
        restart would load). The loader loads and checks the bank (it reads, fits the config,
        its threshold the calibration target); the pipeline then takes it if its stages are
        the running ones, and cuts over: frames received before the cut are judged by the old
        bank, frames after it by the new one. On any failure the old bank stays in service and
        the reason is returned and logged (`bank_switch_refused`). One switch at a time: a
        request meanwhile is refused. Slow (it loads a bank, maybe models): never call it on
        the verdict path.
        """
        if not self._switching.acquire(blocking=False):
            return self._refused(bank, "another bank switch is in progress; try again when it is done")
        try:
            return self._switch(bank, config)
        finally:
            self._switching.release()

    def _switch(self, bank: str | None, config: str | None) -> BankSwitch:
        if self._stopping:
            return self._refused(bank, "the daemon is stopping")
        if self.bank_loader is None:
            return self._refused(bank, "this daemon was started without a bank loader; restart it to load a bank")
        old = self.processor
        try:
            loaded = self.bank_loader(bank, config, old)
            cut = self.pipeline.switch_processor(loaded.processor)
        except (SwitchRefused, ValueError) as e:  # ValueError: the pipeline's stage check
            return self._refused(bank, str(e))
        except Exception as e:  # noqa: BLE001 - a bug or the machine (GPU memory): still not the line's end
            return self._refused(bank, f"{type(e).__name__}: {e}", exc_info=e)
        new = loaded.processor
        self._show_bank(old, new)
        self.metrics.bank_switches.labels(result="switched").inc()
        result = BankSwitch(switched=True, bank_id=new.bank_id, old_bank_id=old.bank_id, bank=loaded.path,
                            frames_before=cut.frames_before, last_frame_ids=cut.last_frame_ids,
                            warnings=list(loaded.warnings))
        self.log.info("bank_switched", old_bank_id=old.bank_id, bank_id=new.bank_id, bank=loaded.path,
                      backend=new.backend, frames_before=cut.frames_before, last_frame_ids=cut.last_frame_ids)
        for warning in loaded.warnings:
            self.log.warning("bank_switch_not_applied", bank_id=new.bank_id, warning=warning)
        return result

    def _refused(self, bank: str | None, reason: str, exc_info: BaseException | None = None) -> BankSwitch:
        self.metrics.bank_switches.labels(result="refused").inc()
        self.log.error("bank_switch_refused", bank=bank, bank_id=self.processor.bank_id, reason=reason,
                       exc_info=exc_info)
        return BankSwitch(switched=False, bank_id=self.processor.bank_id, reason=reason, bank=bank)

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

    def _show_calibration(self, processor: Processor) -> None:
        """The scores the processor's bank was calibrated on: the score drift alert's reference."""
        calibration = processor.calibration
        if calibration is None:  # no calibrated bank: the histogram stays empty
            self.metrics.set_calibration((), None)
        else:
            self.metrics.set_calibration(calibration.scores, calibration.threshold)

    def _switch_request(self, bank: str | None, config: str | None) -> dict[str, Any]:
        """The control socket's `switch` command."""
        return self.switch_bank(bank, config).to_dict()

    def _watchdog_loop(self, interval: float) -> None:
        while not self._stopped.wait(interval):
            self.watchdog_check()

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

    def _close(self, part: FrameSource | VerdictSink, name: str) -> None:
        try:
            part.stop()
        except Exception as e:  # noqa: BLE001 - keep shutting down the rest
            self.log.error("close_failed", part=name, error=repr(e))
