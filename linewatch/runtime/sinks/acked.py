"""The acknowledged verdict channel as a sink (`runtime.acked`): a ZeroMQ ROUTER, one thread.

Each verdict goes to every configured subscriber under its own sequence number; a subscriber (a
DEALER: `linewatch actuate` with `actuate.channel: acked`) says hello with its name and the last
seq it got, acks each verdict, and pings once a second. The bookkeeping (who got what, what to
send again, what was missed) is linewatch.runtime.sinks.acked_ledger.AckLedger; this module owns
the socket around it. Messages: docs/wire-format.md, "Acknowledged verdicts".

`publish()` only queues (bounded: `queue_size`; a verdict that finds the queue full is counted in
linewatch_sink_dropped_total{sink="acked", reason="queue_full"}) and wakes the thread through a
pipe; the thread never blocks on a subscriber: sends are non-blocking (ROUTER_MANDATORY tells a
gone subscriber from a full one), and what cannot be sent waits in the ledger for the
subscriber's next hello or its budget. Memory is bounded by queue_size plus max_unacked verdicts
per subscriber (the encoded verdict is shared by every subscriber's buffer).
"""

from __future__ import annotations

import errno
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
import zmq

from linewatch import wire
from linewatch.config import AckedConfig, SecurityConfig
from linewatch.runtime.ops.logs import RateLimiter
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.sinks import Adapter, SinkContext
from linewatch.runtime.sinks.acked_ledger import AckLedger, Missed, Send, UnknownSubscriber
from linewatch.runtime.sinks.outcome import Outcome
from linewatch.runtime.transport.security import CurveServer, SecurityError
from linewatch.wire import Verdict, WireError

POLL_S = 0.05  # the thread looks at the clock (budgets) at least this often
MAX_READS = 1000  # subscribers' messages read per round, between two looks at the verdict queue


class AckedChannel:
    """The ROUTER socket and its thread around an AckLedger. start() binds (errors raise there)."""

    def __init__(self, config: AckedConfig, log: Any = None, metrics: Metrics | None = None,
                 security: SecurityConfig | None = None, clock: Callable[[], float] = time.time,
                 run: str | None = None) -> None:
        self._config = config
        self._log = log if log is not None else structlog.get_logger("linewatch.acked")
        self._metrics = metrics if metrics is not None else Metrics()
        self._security = security if security is not None and security.enabled else None
        self._clock = clock
        self.ledger = AckLedger(config.subscribers, config.budget_ms / 1000, config.max_unacked,
                                config.absent_after_ms / 1000, run or secrets.token_hex(8), clock)
        self._queue: queue.Queue[Verdict] = queue.Queue(maxsize=config.queue_size)
        self._closed = False
        self._stopping = threading.Event()
        self._changed = threading.Condition()  # notified after each round of the thread
        self._rounds = 0
        self._limits = RateLimiter(10.0)
        self._thread = threading.Thread(target=self._loop, name="acked", daemon=True)
        self._curve: CurveServer | None = None
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._linger_until = 0.0
        self.bound_url = ""

    # ------------------------------------------------------------ the sink's side

    def start(self) -> None:
        """Bind the ROUTER (RuntimeError naming the URL when it cannot) and start the thread."""
        self._context = zmq.Context()
        sock = self._socket = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone subscriber raises instead of vanishing
        sock.setsockopt(zmq.SNDHWM, self._config.send_hwm)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if self._security is not None:
                self._curve = CurveServer.from_config(self._context, self._security, "acked", self._metrics, self._log)
                self._curve.secure(sock)
            sock.bind(self._config.url)
        except (zmq.ZMQError, SecurityError) as e:
            sock.close(linger=0)
            if self._curve is not None:
                self._curve.stop()
            self._context.term()
            if isinstance(e, SecurityError):
                raise
            raise RuntimeError(f"runtime.acked: cannot bind {self._config.url}: {e}") from e
        self.bound_url = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        for name in self.ledger.subscribers:
            self._metrics.acked_connected.labels(subscriber=name).set_function(
                lambda name=name: float(self.ledger.connected(name)))
            self._metrics.acked_unacked.labels(subscriber=name).set_function(
                lambda name=name: float(self.ledger.unacked(name)))
        if self._curve is not None:
            self._curve.start()
        self._thread.start()
        self._log.info("acked_channel_listening", url=self.bound_url, subscribers=self.ledger.subscribers)

    def publish(self, verdict: Verdict) -> None:
        """Queue one verdict for every subscriber; never blocks (a full queue drops and counts it)."""
        if self._closed:
            raise RuntimeError(f"acked publish after close: {verdict.camera} #{verdict.frame_id} {verdict.verdict}")
        try:
            self._queue.put_nowait(verdict)
        except queue.Full:
            self._metrics.sink_dropped.labels(sink="acked", reason="queue_full").inc()
            self._log_limited("queue_full", "acked_queue_full", camera=verdict.camera, frame_id=verdict.frame_id,
                              queue_size=self._config.queue_size)
            return
        self._wake()

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def dead_threads(self) -> list[str]:
        if self._thread.ident is None or self._closed:
            return []
        return [] if self._thread.is_alive() else [self._thread.name]

    def stats(self) -> dict[str, Any]:
        return {name: {"connected": self.ledger.connected(name), "unacked": self.ledger.unacked(name)}
                for name in self.ledger.subscribers}

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `predicate()` holds after a round of the channel's thread (tests, diagnostics)."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout_s)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Send what is queued (within `timeout_s`), then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.ident is not None:
            self._linger_until = time.monotonic() + timeout_s
            self._stopping.set()
            self._wake()
            self._thread.join(timeout_s + 1.0)
            if self._curve is not None:
                self._curve.stop()
            if not self._thread.is_alive():
                self._context.term()
        left = self._queue.qsize()
        if left:
            self._log.error("acked_verdicts_not_sent_before_close", count=left)
        if not self._thread.is_alive():  # (a thread that hung keeps its pipe)
            os.close(self._wake_read)
            os.close(self._wake_write)

    # ------------------------------------------------------------ the thread

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"!")
        except BlockingIOError:  # the pipe is full: a wake-up is pending anyway
            pass

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        try:
            while True:
                wait = POLL_S
                expiry = self.ledger.next_expiry()
                if expiry is not None:
                    wait = min(wait, max(0.0, expiry - self._clock()))
                events = dict(poller.poll(wait * 1000))
                if self._wake_read in events:
                    self._drain_wake()
                self._take_verdicts()
                if self._socket in events:
                    self._read_messages()
                self._record_missed(self.ledger.expire())
                with self._changed:
                    self._rounds += 1
                    self._changed.notify_all()
                if self._stopping.is_set() and self._queue.empty():
                    break
        finally:
            linger_ms = max(0, int((self._linger_until - time.monotonic()) * 1000))
            self._socket.close(linger=linger_ms)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _take_verdicts(self) -> None:
        while True:
            try:
                verdict = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                payload = wire.encode_verdict(verdict)  # attachments stay on the PUB socket
            except Exception as e:  # noqa: BLE001 - a verdict that cannot be encoded loses this copy only
                self._metrics.sink_dropped.labels(sink="acked", reason="exception").inc()
                self._log.error("acked_verdict_not_encoded", camera=verdict.camera, frame_id=verdict.frame_id, error=repr(e))
                continue
            sends, missed = self.ledger.add(verdict.capture_ts, payload)
            self._record_missed(missed)
            self._send_verdicts(sends)

    def _read_messages(self) -> None:
        for _ in range(MAX_READS):  # a flood of messages never starves the verdicts
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            peer, parts = frames[0], frames[1:]
            try:
                message = wire.decode_acked(parts, wire.ACKED_TO_DAEMON)
            except WireError as e:
                self._log_limited("bad_message", "acked_bad_message", reason=e.reason, detail=e.detail)
                continue
            if message.kind == "hello":
                self._hello(peer, message)
            elif message.kind == "ack":
                name = self.ledger.ack(peer, message.str_or_none("run"), message.int_or_none("seq"))
                if name is not None:
                    self._metrics.acked_acked.labels(subscriber=name).inc()
                elif self.ledger.heard(peer) is None:
                    self._send(peer, wire.encode_acked("hello_needed"))
            elif self.ledger.heard(peer) is None:  # a ping from a connection that never said hello
                self._send(peer, wire.encode_acked("hello_needed"))

    def _hello(self, peer: bytes, message: wire.AckedMessage) -> None:
        name = message.str_or_none("subscriber") or ""
        try:
            welcome = self.ledger.hello(peer, name, message.str_or_none("run"), message.int_or_none("last_seq"))
        except UnknownSubscriber as e:
            self._metrics.acked_refused.inc()
            self._log_limited(f"refused:{name[:64]}", "acked_subscriber_refused", subscriber=name[:64],
                              configured=self.ledger.subscribers,
                              detail="a hello from a name not in runtime.acked.subscribers: add it there, or fix the "
                                     "subscriber's actuate.subscriber")
            self._send(peer, wire.encode_acked("refused", {"reason": "unknown_subscriber", "detail": str(e)}))
            return
        self._record_missed(welcome.missed)
        if welcome.confirmed:
            self._metrics.acked_acked.labels(subscriber=welcome.subscriber).inc(welcome.confirmed)
        self._log.info("acked_subscriber_hello", subscriber=welcome.subscriber, last_seq=message.int_or_none("last_seq"),
                       confirmed=welcome.confirmed, resending=len(welcome.sends))
        if self._send(peer, wire.encode_acked("welcome", {"subscriber": welcome.subscriber, "run": self.ledger.run,
                                                          "resending": len(welcome.sends)})):
            self._send_verdicts(welcome.sends)

    def _send_verdicts(self, sends: list[Send]) -> None:
        failed: set[bytes] = set()  # after one send to a peer fails, none of the rest go to it (order)
        for send in sends:
            if send.peer in failed:
                continue
            header = {"run": self.ledger.run, "seq": send.seq, "subscriber": send.subscriber}
            if self._send(send.peer, wire.encode_acked("verdict", header, send.payload)):
                self._metrics.acked_sent.labels(subscriber=send.subscriber).inc()
                if send.resend:
                    self._metrics.acked_resent.labels(subscriber=send.subscriber).inc()
            else:
                failed.add(send.peer)

    def _send(self, peer: bytes, parts: list[bytes]) -> bool:
        """One message to `peer`, never blocking; False when it was not sent (it stays in the
        ledger: sent again at the subscriber's next hello, or missed when its budget ends)."""
        try:
            self._socket.send_multipart([peer, *parts], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:  # the subscriber's queue is full (send_hwm)
            # nothing more goes to it until its next hello (its next ping is answered hello_needed),
            # so what it gets stays in order and the last seq of that hello means what it says
            self._log_limited("full", "acked_subscriber_queue_full", send_hwm=self._config.send_hwm)
            self.ledger.unreachable(peer)
            return False
        except zmq.ZMQError as e:
            if e.errno != errno.EHOSTUNREACH:
                raise
            self.ledger.unreachable(peer)  # its connection is gone: it says hello again when it is back
            return False

    def _record_missed(self, missed: list[Missed]) -> None:
        for m in missed:
            self._metrics.acked_missed.labels(subscriber=m.subscriber, reason=m.reason).inc()
            self._log_limited(f"missed:{m.subscriber}:{m.reason}", "acked_verdict_missed", subscriber=m.subscriber,
                              seq=m.seq, reason=m.reason)

    def _log_limited(self, key: str, event: str, **fields: Any) -> None:
        held_back = self._limits.allow(key, time.monotonic())
        if held_back is not None:
            self._log.error(event, not_logged_since_last=held_back, **fields)


class AckedSink(Adapter):
    name = "acked"

    def publish(self, outcome: Outcome) -> None:
        self.target.publish(outcome.verdict)


def build(context: SinkContext) -> AckedSink | None:
    c = context.config
    if not c.acked.enabled:
        return None
    return AckedSink(AckedChannel(c.acked, context.log, context.metrics, c.security, clock=context.clock.time))
