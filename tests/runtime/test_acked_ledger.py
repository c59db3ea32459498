"""The acknowledged channel's bookkeeping (AckLedger) on a hand-driven clock: per-subscriber
seqs, replay on hello, acks, budget expiry and overflow counted as missed, harmless repeats."""

from __future__ import annotations

import pytest

from linewatch.runtime.sinks.acked_ledger import AckLedger, Missed, UnknownSubscriber

RUN = "run-a"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ledger(clock: Clock, subscribers=("gate1", "gate2"), budget_s: float = 2.0, max_unacked: int = 100,
           absent_after_s: float = 3.0) -> AckLedger:
    return AckLedger(subscribers, budget_s, max_unacked, absent_after_s, RUN, clock)


def sent(sends) -> list[tuple[bytes, str, int, object, bool]]:
    return [(s.peer, s.subscriber, s.seq, s.payload, s.resend) for s in sends]


def test_each_subscriber_numbers_the_verdicts_itself_and_only_peers_get_them():
    clock = Clock()
    book = ledger(clock)
    assert book.add(1000.0, "v0") == ([], [])  # nobody has said hello: both buffer seq 0
    book.hello(b"P1", "gate1", None, None)
    sends, missed = book.add(1000.0, "v1")
    assert sent(sends) == [(b"P1", "gate1", 1, "v1", False)] and missed == []
    assert book.waiting("gate1") == [0, 1] and book.waiting("gate2") == [0, 1]
    book.hello(b"P2", "gate2", None, None)
    sends, _ = book.add(1000.5, "v2")
    assert sent(sends) == [(b"P1", "gate1", 2, "v2", False), (b"P2", "gate2", 2, "v2", False)]


def test_hello_without_a_last_seq_replays_everything_waiting_in_order():
    clock = Clock()
    book = ledger(clock)
    for i in range(3):
        book.add(1000.0 + i * 0.1, f"v{i}")
    welcome = book.hello(b"P1", "gate1", None, None)
    assert sent(welcome.sends) == [(b"P1", "gate1", i, f"v{i}", True) for i in range(3)]
    assert (welcome.missed, welcome.confirmed) == ([], 0)


def test_hello_with_the_last_seq_of_this_run_confirms_up_to_it_and_replays_the_rest():
    clock = Clock()
    book = ledger(clock)
    book.hello(b"P1", "gate1", None, None)
    for i in range(5):
        book.add(1000.0, f"v{i}")
    assert book.ack(b"P1", RUN, 1) == "gate1"  # 0, 2, 3, 4 wait
    welcome = book.hello(b"P9", "gate1", RUN, 3)  # reconnected; says it got up to 3 (its acks of 0, 2, 3 were lost)
    assert welcome.confirmed == 3
    assert sent(welcome.sends) == [(b"P9", "gate1", 4, "v4", True)]
    assert book.waiting("gate1") == [4]
    # the old connection is not the subscriber's any more: its acks change nothing
    assert book.ack(b"P1", RUN, 4) is None and book.waiting("gate1") == [4]
    assert book.ack(b"P9", RUN, 4) == "gate1" and book.waiting("gate1") == []


def test_a_last_seq_of_another_run_counts_for_nothing():
    clock = Clock()
    book = ledger(clock)
    book.add(1000.0, "v0")
    book.add(1000.0, "v1")
    welcome = book.hello(b"P1", "gate1", "an-earlier-daemon", 7)
    assert welcome.confirmed == 0 and [s.seq for s in welcome.sends] == [0, 1]


def test_acks_twice_of_unknown_seqs_other_runs_and_unknown_peers_are_harmless():
    clock = Clock()
    book = ledger(clock)
    book.hello(b"P1", "gate1", None, None)
    book.add(1000.0, "v0")
    book.add(1000.0, "v1")
    assert book.ack(b"P1", RUN, 0) == "gate1"
    assert book.ack(b"P1", RUN, 0) is None  # again
    assert book.ack(b"P1", RUN, 57) is None  # never sent
    assert book.ack(b"P1", "other-run", 1) is None
    assert book.ack(b"PX", RUN, 1) is None  # nobody's peer
    assert book.ack(b"P1", RUN, None) is None
    assert book.waiting("gate1") == [1] and book.waiting("gate2") == [0, 1]


def test_unacked_verdicts_past_capture_plus_budget_are_missed_and_never_resent():
    clock = Clock(1000.0)
    book = ledger(clock, budget_s=2.0)
    book.add(999.0, "v0")  # useful until 1001.0
    book.add(1000.5, "v1")  # until 1002.5
    book.hello(b"P1", "gate1", None, None)
    book.ack(b"P1", RUN, 0)
    assert book.next_expiry() == 1001.0
    clock.now = 1000.999
    assert book.expire() == []
    clock.now = 1001.0
    # gate1 acked seq 0; gate2 did not: missed by gate2 alone
    assert book.expire() == [Missed("gate2", 0, "expired")]
    clock.now = 1002.5
    assert book.expire() == [Missed("gate1", 1, "expired"), Missed("gate2", 1, "expired")]
    assert book.next_expiry() is None
    welcome = book.hello(b"P2", "gate2", None, None)
    assert welcome.sends == [] and welcome.missed == []


def test_a_hello_drops_what_ran_out_of_budget_before_replaying():
    clock = Clock(1000.0)
    book = ledger(clock, budget_s=2.0)
    book.add(999.0, "old")  # until 1001.0
    book.add(1000.0, "new")  # until 1002.0
    clock.now = 1001.5
    welcome = book.hello(b"P1", "gate1", None, None)
    assert [(s.seq, s.payload) for s in welcome.sends] == [(1, "new")]
    assert welcome.missed == [Missed("gate1", 0, "expired"), Missed("gate2", 0, "expired")]


def test_a_verdict_already_past_its_budget_is_missed_at_once_by_everyone():
    clock = Clock(1000.0)
    book = ledger(clock, budget_s=2.0)
    book.hello(b"P1", "gate1", None, None)
    sends, missed = book.add(998.0, "too-old")  # 998 + 2 = 1000 <= now
    assert sends == [] and missed == [Missed("gate1", 0, "expired"), Missed("gate2", 0, "expired")]
    sends, _ = book.add(1000.0, "fresh")
    assert [s.seq for s in sends] == [1]  # the seq was used: the subscriber sees the gap


def test_a_full_buffer_gives_up_its_oldest_as_overflow():
    clock = Clock()
    book = ledger(clock, subscribers=("gate1",), max_unacked=2)
    book.add(1000.0, "v0")
    book.add(1000.0, "v1")
    _, missed = book.add(1000.0, "v2")
    assert missed == [Missed("gate1", 0, "overflow")] and book.waiting("gate1") == [1, 2]
    clock.now = 1002.0  # the overflowed one is not missed a second time when its budget ends
    assert book.expire() == [Missed("gate1", 1, "expired"), Missed("gate1", 2, "expired")]


def test_unknown_names_are_refused_and_change_nothing():
    clock = Clock()
    book = ledger(clock)
    book.add(1000.0, "v0")
    with pytest.raises(UnknownSubscriber, match="'gate3'.*gate1, gate2"):
        book.hello(b"P3", "gate3", None, None)
    assert book.heard(b"P3") is None
    assert book.waiting("gate1") == [0] and book.waiting("gate2") == [0]


def test_connected_while_heard_within_absent_after_and_until_unreachable():
    clock = Clock(1000.0)
    book = ledger(clock, absent_after_s=3.0)
    assert not book.connected("gate1")
    book.hello(b"P1", "gate1", None, None)
    assert book.connected("gate1")
    clock.now = 1002.9
    assert book.heard(b"P1") == "gate1"  # a ping
    clock.now = 1005.8
    assert book.connected("gate1")
    clock.now = 1005.9  # 3 s since the ping
    assert not book.connected("gate1")
    book.hello(b"P2", "gate1", None, None)
    book.unreachable(b"P2")
    assert not book.connected("gate1")
    sends, _ = book.add(1005.9, "v")
    assert sends == [] and book.waiting("gate1") == [0]  # it waits for the next hello


def test_one_peer_is_one_subscriber():
    clock = Clock()
    book = ledger(clock)
    book.hello(b"P1", "gate1", None, None)
    book.hello(b"P1", "gate2", None, None)  # the same connection now says it is gate2
    sends, _ = book.add(1000.0, "v0")
    assert sent(sends) == [(b"P1", "gate2", 0, "v0", False)]


def test_repeated_names_are_a_configuration_error():
    with pytest.raises(ValueError, match="repeat"):
        AckLedger(["a", "a"], 1.0, 10, 3.0, RUN, Clock())


def test_the_expiry_heap_stays_bounded_while_every_verdict_is_acked():
    clock = Clock()
    book = ledger(clock, subscribers=("gate1",), max_unacked=4, budget_s=3600.0)
    book.hello(b"P1", "gate1", None, None)
    for i in range(1000):
        book.add(1000.0, f"v{i}")
        assert book.ack(b"P1", RUN, i) == "gate1"
    assert book.waiting("gate1") == []
    assert len(book._subs["gate1"].expiry) <= 2 * 4 + 1  # not 1000 stale entries
    book.add(1000.0, "last")
    clock.now = 4600.0
    assert book.expire() == [Missed("gate1", 1000, "expired")]
