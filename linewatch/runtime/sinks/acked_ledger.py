"""The acknowledged verdict channel's bookkeeping, on an injected clock (no sockets, no threads).

Each configured subscriber (an actuator, by name) gets every verdict under a sequence number of
its own (0, 1, 2, ... per subscriber and daemon run). A verdict stays in the subscriber's replay
buffer until the subscriber acknowledges it or until it is of no use any more: `capture_ts +
budget_s` on the clock (epoch seconds, the clock of capture_ts). A verdict that leaves the buffer
unacknowledged is *missed* by that subscriber: `expired` (its budget ran out) or `overflow` (the
buffer held `max_unacked` already and the oldest gave way).

A subscriber is known by its peer (the ROUTER's routing id of its connection) from its hello on.
The hello says the last seq it got in this run (or nothing: a subscriber that restarted); the
ledger takes everything up to that seq as received and hands back, in order, what is left that
is still within budget, to be sent again. Verdicts added while a subscriber has no peer wait in
its buffer. Duplicate acks, acks of unknown seqs, of another run or from an unknown peer change
nothing.

Every call returns what the caller must do (`Send`s) and what happened (`Missed`, acked names);
the ledger keeps no metrics and does no I/O. Its memory is bounded: at most `max_unacked`
verdicts per subscriber, and an expiry heap of at most twice that.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


class UnknownSubscriber(ValueError):
    """A hello from a name that is not configured (runtime.acked.subscribers)."""


@dataclass(frozen=True)
class Send:
    """Send `payload` under `seq` to `peer` (the subscriber's connection)."""

    peer: bytes
    subscriber: str
    seq: int
    payload: Any
    resend: bool = False


@dataclass(frozen=True)
class Missed:
    """A verdict `subscriber` never acknowledged: `expired` or `overflow`."""

    subscriber: str
    seq: int
    reason: str


@dataclass(frozen=True)
class Welcome:
    """What a hello did: what to send again, in order; what was missed meanwhile; how many
    verdicts the hello's last seq confirmed as received."""

    subscriber: str
    sends: list[Send]
    missed: list[Missed]
    confirmed: int


@dataclass
class _Entry:
    seq: int
    expires_at: float
    payload: Any


@dataclass
class _Subscriber:
    name: str
    next_seq: int = 0
    unacked: OrderedDict[int, _Entry] = field(default_factory=OrderedDict)  # seq order
    expiry: list[tuple[float, int]] = field(default_factory=list)  # heap of (expires_at, seq); stale ones skipped
    peer: bytes | None = None
    last_heard: float | None = None


class AckLedger:
    """Sequence numbers, replay buffers and acknowledgements for the configured subscribers."""

    def __init__(self, subscribers: Iterable[str], budget_s: float, max_unacked: int, absent_after_s: float,
                 run: str, clock: Callable[[], float]) -> None:
        names = list(subscribers)
        if len(set(names)) != len(names):
            raise ValueError(f"subscriber names repeat: {names}")
        if budget_s <= 0 or max_unacked < 1 or absent_after_s <= 0:
            raise ValueError("budget_s and absent_after_s must be > 0, max_unacked >= 1")
        self.run = run
        self.budget_s = budget_s
        self.max_unacked = max_unacked
        self.absent_after_s = absent_after_s
        self.clock = clock
        self._subs = {name: _Subscriber(name) for name in names}

    @property
    def subscribers(self) -> list[str]:
        return list(self._subs)

    # ------------------------------------------------------------ verdicts in

    def add(self, capture_ts: float, payload: Any) -> tuple[list[Send], list[Missed]]:
        """One verdict for every subscriber: a seq each, into each buffer, and sent at once to
        those with a peer. A verdict already past its budget is missed by all, never sent."""
        now = self.clock()
        expires_at = capture_ts + self.budget_s
        sends: list[Send] = []
        missed: list[Missed] = []
        for sub in self._subs.values():
            seq = sub.next_seq
            sub.next_seq += 1
            if expires_at <= now:
                missed.append(Missed(sub.name, seq, "expired"))
                continue
            sub.unacked[seq] = _Entry(seq, expires_at, payload)
            heapq.heappush(sub.expiry, (expires_at, seq))
            if len(sub.expiry) > 2 * self.max_unacked:  # acked ones linger in the heap: keep it bounded
                sub.expiry = [(e.expires_at, e.seq) for e in sub.unacked.values()]
                heapq.heapify(sub.expiry)
            if len(sub.unacked) > self.max_unacked:
                oldest, _ = sub.unacked.popitem(last=False)
                missed.append(Missed(sub.name, oldest, "overflow"))
            if sub.peer is not None:
                sends.append(Send(sub.peer, sub.name, seq, payload))
        return sends, missed

    # ------------------------------------------------------------ subscribers' messages

    def hello(self, peer: bytes, subscriber: str, run: str | None, last_seq: int | None) -> Welcome:
        """`subscriber` (re)connected as `peer`, having got everything up to `last_seq` of
        `run` (None: nothing, or a run of an earlier daemon). Raises UnknownSubscriber."""
        sub = self._subs.get(subscriber)
        if sub is None:
            raise UnknownSubscriber(f"unknown subscriber {subscriber!r}; runtime.acked.subscribers: "
                                    f"{', '.join(self._subs) or '(none)'}")
        missed = self.expire()
        for other in self._subs.values():  # a peer is one subscriber's at a time
            if other is not sub and other.peer == peer:
                other.peer = None
        sub.peer = peer
        sub.last_heard = self.clock()
        confirmed = 0
        if run == self.run and last_seq is not None:
            while sub.unacked and next(iter(sub.unacked)) <= last_seq:
                sub.unacked.popitem(last=False)
                confirmed += 1
        sends = [Send(peer, sub.name, e.seq, e.payload, resend=True) for e in sub.unacked.values()]
        return Welcome(sub.name, sends, missed, confirmed)

    def ack(self, peer: bytes, run: str | None, seq: int | None) -> str | None:
        """The subscriber at `peer` got `seq`: the name whose verdict left the buffer, or None
        when nothing did (an unknown peer, another run, a seq not waiting: harmless)."""
        sub = self._heard(peer)
        if sub is None or run != self.run or seq is None or sub.unacked.pop(seq, None) is None:
            return None
        return sub.name

    def heard(self, peer: bytes) -> str | None:
        """A ping: the name of the subscriber at `peer`, or None (it must say hello first)."""
        sub = self._heard(peer)
        return None if sub is None else sub.name

    def unreachable(self, peer: bytes) -> None:
        """Sending to `peer` failed for good (its connection is gone): its verdicts wait for its next hello."""
        for sub in self._subs.values():
            if sub.peer == peer:
                sub.peer = None

    # ------------------------------------------------------------ time

    def expire(self) -> list[Missed]:
        """Take every unacknowledged verdict past its budget out of the buffers: missed."""
        now = self.clock()
        missed = []
        for sub in self._subs.values():
            while sub.expiry and sub.expiry[0][0] <= now:
                _, seq = heapq.heappop(sub.expiry)
                if sub.unacked.pop(seq, None) is not None:
                    missed.append(Missed(sub.name, seq, "expired"))
        return missed

    def next_expiry(self) -> float | None:
        """The earliest time `expire()` may have something to do; None: nothing waits."""
        times = [sub.expiry[0][0] for sub in self._subs.values() if sub.expiry]
        return min(times) if times else None

    # ------------------------------------------------------------ state

    def connected(self, subscriber: str) -> bool:
        """Whether `subscriber` has a peer that was heard from within absent_after_s."""
        sub = self._subs[subscriber]
        return sub.peer is not None and sub.last_heard is not None and self.clock() - sub.last_heard < self.absent_after_s

    def unacked(self, subscriber: str) -> int:
        return len(self._subs[subscriber].unacked)

    def waiting(self, subscriber: str) -> list[int]:
        """The seqs in `subscriber`'s buffer, in order."""
        return list(self._subs[subscriber].unacked)

    def _heard(self, peer: bytes) -> _Subscriber | None:
        for sub in self._subs.values():
            if sub.peer == peer:
                sub.last_heard = self.clock()
                return sub
        return None
