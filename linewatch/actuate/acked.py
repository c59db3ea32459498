"""The actuator's side of the acknowledged verdict channel (`actuate.channel: acked`).

One DEALER, owned by the actuator's socket thread, which calls `beat()` on every turn of its
loop and `receive()` for every message; this object says hello (with the last seq it got in the
daemon's channel run, or nothing after a restart), pings once a second, says hello again when the
daemon asks for it (a daemon that restarted, a connection that was replaced), and acks each
verdict once it is handed to the decision thread (`handed`). Sends never block: a message that
cannot go now (no connection) is dropped, and the next hello's last seq covers a lost ack.
Messages: docs/wire-format.md, "Acknowledged verdicts".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from linewatch import wire
from linewatch.wire import Verdict, WireError

RETRY_S = 0.05  # a hello or ping that found no connection is tried again this soon


@dataclass(frozen=True)
class Delivery:
    """A verdict from the channel, with what its ack needs."""

    verdict: Verdict
    run: str | None
    seq: int | None


class AckedSubscriber:
    """Hello, pings and acks on one DEALER socket (the caller's thread only)."""

    def __init__(self, sock: zmq.Socket, name: str, log: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.sock = sock
        self.name = name
        self.log = log
        self.clock = clock
        self.run: str | None = None  # the daemon's channel run we are in
        self.last_seq: int | None = None  # the highest seq of `run` handed on
        self.welcomed = False
        self.refused = False
        self._next_beat = 0.0

    @staticmethod
    def prepare(sock: zmq.Socket) -> None:
        """Socket options before connect: send only on a finished connection (never queue a
        hello for a daemon that is not there yet)."""
        sock.setsockopt(zmq.IMMEDIATE, 1)

    def beat(self) -> None:
        """Once a second: a ping, or a hello while not welcomed (sooner while there is no
        connection to send it on: a hello goes out as soon as the daemon is there)."""
        if self.clock() < self._next_beat:
            return
        if self.welcomed:
            sent = self._send("ping", {})
            self._next_beat = self.clock() + (wire.ACKED_HEARTBEAT_S if sent else RETRY_S)
        else:
            self.hello()

    def hello(self) -> None:
        sent = self._send("hello", {"subscriber": self.name, "run": self.run, "last_seq": self.last_seq})
        self._next_beat = self.clock() + (wire.ACKED_HEARTBEAT_S if sent else RETRY_S)

    def receive(self, parts: list[bytes]) -> Delivery | None:
        """One message from the daemon: the verdict it carries, or None (a control message).
        Raises WireError for a message that is not understood (a verdict's ack is sent anyway:
        sending it again would not help)."""
        message = wire.decode_acked(parts, wire.ACKED_TO_SUBSCRIBER)
        if message.kind == "verdict":
            run, seq = message.str_or_none("run"), message.int_or_none("seq")
            try:
                verdict = wire.decode_verdict(message.rest)
            except WireError:
                self.handed(run, seq)
                raise
            return Delivery(verdict, run, seq)
        if message.kind == "welcome":
            run = message.str_or_none("run")
            if run != self.run:  # a daemon run we have not seen: our last seq meant nothing to it
                self.run, self.last_seq = run, None
            self.welcomed, self.refused = True, False
            self.log.info("acked_welcome", subscriber=self.name, run=run, resending=message.header.get("resending"))
        elif message.kind == "refused":
            self.welcomed = False
            if not self.refused:  # one line per refusal, not one a second
                self.refused = True
                self.log.error("acked_refused", subscriber=self.name, reason=message.header.get("reason"),
                               detail=message.header.get("detail"))
        elif message.kind == "hello_needed":
            self.welcomed = False
            self.hello()
        return None

    def handed(self, run: str | None, seq: int | None) -> None:
        """The verdict `seq` of `run` is with the decision thread: ack it."""
        if seq is None:
            return
        self._send("ack", {"run": run, "seq": seq})
        if run is not None and run == self.run and (self.last_seq is None or seq > self.last_seq):
            self.last_seq = seq

    def _send(self, kind: str, header: dict[str, Any]) -> bool:
        try:
            self.sock.send_multipart(wire.encode_acked(kind, header), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:  # no connection now: the next beat tries again
            return False
