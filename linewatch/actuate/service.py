"""`linewatch actuate` at run time: three threads, none of which waits on another's I/O.

    verdict socket thread --inbox--> decision thread (gate.Gate) --outbox--> output thread (the PLC)

The socket thread only receives and decodes (a slow PLC never makes it fall behind, so ZeroMQ
never drops verdicts for it; on the acknowledged channel, `actuate.channel: acked`, it also says
hello, pings and acks each verdict as it hands it on: linewatch.actuate.acked); the decision
thread runs the timing rule and hands each reject to the output at its time; the output thread
pulses the reject output (pulse_ms, stretched when rejects follow each other) and, when the PLC
is unreachable, counts the failure, retries with backoff and recovers by itself: rejects that
fell due meanwhile are counted as missed, logged with their verdict ids, and raise the alarm
output once the PLC is back.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from linewatch import wire
from linewatch.actuate.acked import AckedSubscriber, Delivery
from linewatch.actuate.gate import Decision, Fire, Gate, Timing
from linewatch.actuate.outputs import AddressRefused, Output, OutputError, Unreachable
from linewatch.config import ActuateConfig
from linewatch.wire import WireError

POLL_MS = 50
ACK_LINGER_MS = 500  # at stop, how long queued acks of the acked channel may take to leave
IDLE_S = 0.05  # the decision thread looks at the clock at least this often


class ActuateMetrics:
    """The actuator's own registry, served on actuate.metrics (not the daemon's /metrics)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.verdicts = Counter("linewatch_actuate_verdicts_total", "Verdicts received", ["verdict"], registry=r)
        self.undecodable = Counter("linewatch_actuate_undecodable_total", "Messages that are no verdict", registry=r)
        self.decisions = Counter("linewatch_actuate_decisions_total", "Gate decisions", ["action"], registry=r)
        self.rejects = Counter("linewatch_actuate_rejects_total", "Rejects put on the output (fired)", registry=r)
        self.late = Counter("linewatch_actuate_late_verdicts_total", "Verdicts that arrived after their part's window", registry=r)
        self.watchdog = Counter("linewatch_actuate_watchdog_rejects_total", "Parts rejected for want of a verdict within the budget", registry=r)
        self.lost = Counter("linewatch_actuate_lost_verdicts_total", "Verdicts lost on the way (gaps in seq)", registry=r)
        self.alarms = Counter("linewatch_actuate_alarms_total", "Alarms raised", ["reason"], registry=r)
        self.write_failures = Counter("linewatch_actuate_plc_write_failures_total", "PLC writes or connects that failed", registry=r)
        self.missed = Counter("linewatch_actuate_missed_rejects_total", "Rejects that fell due while the PLC was unreachable", registry=r)
        self.write_seconds = Histogram(
            "linewatch_actuate_plc_write_seconds", "Time of one PLC write", registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0))
        self.fire_lag = Histogram(
            "linewatch_actuate_fire_lag_seconds", "From a reject's due time to its write on the PLC", registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0))
        self.connected = Gauge("linewatch_actuate_plc_connected", "1 while the PLC is reachable", registry=r)


class OutputWorker:
    """The output thread: pulses the reject output and raises alarms, reconnecting as needed."""

    def __init__(self, output: Output, pulse_s: float, retry_max_s: float, metrics: ActuateMetrics, log: Any,
                 clock: Callable[[], float] = time.time) -> None:
        self.output = output
        self.pulse_s = pulse_s
        self.retry_max_s = retry_max_s
        self.metrics = metrics
        self.log = log
        self.clock = clock
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.connected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="actuate-output", daemon=True)
        self._on_until: float | None = None  # the reject output should be on until then (monotonic)
        self._is_on = False
        self._alarm: str | None = None  # an alarm to raise
        self._missed: list[Fire] = []
        self._backoff = 0.05
        self._retry_at = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self.inbox.put(None)
        self._thread.join(timeout_s)
        self.output.close()

    def fire(self, fire: Fire) -> None:
        self.inbox.put(("fire", fire))

    def alarm(self, detail: str) -> None:
        self.inbox.put(("alarm", detail))

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            wait = IDLE_S
            if self._on_until is not None:
                wait = min(wait, max(0.0, self._on_until - now))
            if not self.connected:
                wait = min(wait, max(0.0, self._retry_at - now))
            try:
                item = self.inbox.get(timeout=wait)
            except queue.Empty:
                item = None
            while item is not None:
                self._take(item)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            self._apply()
        if self._is_on and self.connected:  # stopping: leave the reject output off
            self._guard(lambda: self.output.set_reject(False, None))

    def _take(self, item: tuple[str, Any]) -> None:
        kind, value = item
        if kind == "fire":
            if not self.connected:
                self._miss(value)
            else:
                self._write_on(value)
        elif kind == "alarm":
            self._alarm = value

    def _write_on(self, fire: Fire) -> None:
        if self._guard(lambda: self.output.set_reject(True, fire)):
            # the pulse (stretched by rejects that follow) is for parts whose reject reached the PLC;
            # a missed one does not turn the output on later, when its part has gone by
            self._on_until = max(self._on_until or 0.0, time.monotonic() + self.pulse_s)
            self._is_on = True
            self.metrics.rejects.inc()
            self.metrics.fire_lag.observe(max(0.0, self.clock() - fire.at))
        else:
            self._miss(fire)

    def _miss(self, fire: Fire) -> None:
        """A reject that could not be put on the PLC: its part passes. Counted, logged with its
        verdict id, and the alarm output is raised once the PLC answers again."""
        self._missed.append(fire)
        self.metrics.missed.inc()
        self.log.error("reject_missed_plc_unreachable", camera=fire.camera, part=fire.part,
                       verdict_id=fire.verdict_id, reason=fire.reason)

    def _apply(self) -> None:
        now = time.monotonic()
        if not self.connected:
            if now < self._retry_at:
                return
            try:
                self.output.connect()
            except Unreachable as e:
                self._failed(e)
                return
            except AddressRefused as e:  # refused after a reconnect: keep trying, loudly
                self._failed(e)
                return
            self.connected = True
            self._backoff = 0.05
            self.metrics.connected.set(1)
            self.log.info("plc_connected", output=self.output.name)
            self._is_on = False  # connect() writes the reject output off
            if self._missed:
                ids = [f.verdict_id for f in self._missed]
                self._alarm = f"{len(self._missed)} reject(s) fell due while the PLC was unreachable: verdict ids {ids}"
                self._missed = []
            if self._on_until is not None and now < self._on_until:
                self._guard(lambda: self.output.set_reject(True, None)) and setattr(self, "_is_on", True)
        if self._alarm is not None and self.connected:
            detail = self._alarm
            if self._guard(lambda: self.output.set_alarm(detail)):
                self._alarm = None
        if self._on_until is not None and now >= self._on_until and self.connected:
            if not self._is_on or self._guard(lambda: self.output.set_reject(False, None)):
                self._on_until = None
                self._is_on = False

    def _guard(self, write: Callable[[], None]) -> bool:
        """One write, timed; a failure is counted and drops the connection (retried with backoff)."""
        start = time.perf_counter()
        try:
            write()
        except OutputError as e:
            self._failed(e)
            return False
        self.metrics.write_seconds.observe(time.perf_counter() - start)
        return True

    def _failed(self, error: Exception) -> None:
        self.metrics.write_failures.inc()
        if self.connected:
            self.log.error("plc_unreachable", output=self.output.name, error=str(error))
        else:
            self.log.warning("plc_connect_failed", output=self.output.name, error=str(error),
                             retry_in_s=round(self._backoff, 3))
        self.connected = False
        self.metrics.connected.set(0)
        self.output.close()
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self.retry_max_s, self._backoff * 2)


def timings(config: ActuateConfig) -> dict[str, Timing]:
    return {camera: Timing(travel_s=t.travel_ms / 1000, window_s=t.window_ms / 1000, budget_s=t.budget / 1000,
                           consecutive_frame_ids=t.consecutive_frame_ids)
            for camera, t in config.cameras.items()}


class Actuator:
    """The three threads around one Gate."""

    def __init__(self, config: ActuateConfig, output: Output, log: Any, metrics: ActuateMetrics | None = None,
                 clock: Callable[[], float] = time.time, curve: Any = None) -> None:
        self.config = config
        self.log = log
        self.clock = clock
        self.curve = curve
        self.metrics = metrics or ActuateMetrics()
        self.gate = Gate(timings(config), let_through=config.let_through, late=config.late, clock=clock)
        self.worker = OutputWorker(output, config.pulse_ms / 1000, config.retry_max_ms / 1000, self.metrics, log, clock)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.received = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._receive, name="actuate-socket", daemon=True),
                         threading.Thread(target=self._decide, name="actuate-decide", daemon=True)]
        self._connected = threading.Event()
        self._socket_error: BaseException | None = None

    def check_output(self) -> None:
        """Connect once before starting: an address the PLC refuses raises AddressRefused here
        (a configuration error); an unreachable PLC is logged and left to the output thread."""
        try:
            self.worker.output.connect()
        except Unreachable as e:
            self.log.warning("plc_unreachable_at_start", output=self.worker.output.name, error=str(e))
            return
        self.worker.connected = True
        self.metrics.connected.set(1)

    def start(self) -> None:
        self.worker.start()
        for t in self._threads:
            t.start()
        self._connected.wait(5.0)
        if self._socket_error is not None:
            raise RuntimeError(f"actuate.verdicts: cannot {self.config.mode} {self.config.verdicts}: {self._socket_error}")

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(None)
        for t in self._threads:
            t.join(5.0)
        self.worker.stop()

    # ------------------------------------------------------------ threads

    def _receive(self) -> None:
        context = zmq.Context()
        acked = self.config.channel == "acked"
        sock = context.socket(zmq.DEALER if acked else zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        channel = AckedSubscriber(sock, self.config.subscriber or "", self.log) if acked else None
        try:
            if self.curve is not None:
                self.curve.apply(sock)
            if channel is not None:
                channel.prepare(sock)
            else:
                sock.setsockopt(zmq.SUBSCRIBE, b"")  # every camera: the seq gap count needs every verdict
            if self.config.mode == "bind":
                sock.bind(self.config.verdicts)
            else:
                sock.connect(self.config.verdicts)
        except zmq.ZMQError as e:
            self._socket_error = e
            sock.close(0)
            context.term()
            self._connected.set()
            return
        self._connected.set()
        try:
            while not self._stop.is_set():
                if channel is not None:
                    channel.beat()
                if not sock.poll(POLL_MS):
                    continue
                parts = sock.recv_multipart(copy=True)
                try:
                    delivery = channel.receive(parts) if channel is not None else Delivery(wire.decode_verdict(parts), None, None)
                except WireError as e:
                    self.metrics.undecodable.inc()
                    self.log.warning("undecodable_verdict", reason=e.reason, detail=e.detail)
                    continue
                if delivery is None:  # a control message of the acked channel
                    continue
                self.received += 1
                self.inbox.put(delivery.verdict)
                if channel is not None:
                    channel.handed(delivery.run, delivery.seq)  # with the decision thread now: ack it
        finally:
            # the acks already queued go out (bounded): a verdict whose ack is lost comes again
            # after a restart and is decided again (harmless while it is within its part's window)
            sock.close(ACK_LINGER_MS if channel is not None else 0)
            context.term()

    def _decide(self) -> None:
        while not self._stop.is_set():
            wake = self.gate.next_wakeup()
            wait = IDLE_S if wake is None else min(IDLE_S, max(0.0, wake - self.clock()))
            try:
                item = self.inbox.get(timeout=wait)
            except queue.Empty:
                item = None
            while item is not None:
                self.metrics.verdicts.labels(item.verdict).inc()
                for decision in self.gate.on_verdict(item):
                    self._record(decision)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            decisions, fires = self.gate.tick()
            for decision in decisions:
                self._record(decision)
            for fire in fires:
                self.worker.fire(fire)

    def _record(self, d: Decision) -> None:
        """Log the decision with its verdict id, count it, and raise the alarm output for alarms."""
        self.metrics.decisions.labels(d.action).inc()
        if d.late and "no_verdict" not in d.reason:  # a late verdict (not a watchdog reject decided too late)
            self.metrics.late.inc()
        fields = dict(camera=d.camera, part=d.part, verdict_id=d.verdict_id, reason=d.reason)
        if d.detail:
            fields["detail"] = d.detail
        if d.action == "reject":
            if d.reason == "no_verdict":
                self.metrics.watchdog.inc()
            self.log.info("reject_decided", fire_at=d.fire_at, late=d.late, **fields)
        elif d.action == "alarm":
            if d.reason == "seq_gap":
                self.metrics.lost.inc(int(d.detail.split(" ", 1)[0]) if d.detail[:1].isdigit() else 1)
            self.metrics.alarms.labels(d.reason.split(":", 1)[0]).inc()
            self.log.error("alarm", **fields)
            self.worker.alarm(f"{d.reason} {d.verdict_id}: {d.detail}")
        elif d.action == "pass":
            self.log.debug("pass", late=d.late, **fields)
        else:
            self.log.debug("ignored", **fields)
