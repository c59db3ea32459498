"""Batcher: batch sizes, the max-delay promise, and shedding with an answer for every item."""

from __future__ import annotations

import threading
import time

import pytest

from linewatch.runtime.batcher import Batcher


class Sink:
    """Records batches; can be made to block (a busy first stage)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.times: list[float] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, batch: list[int]) -> None:
        self.entered.set()
        assert self.gate.wait(5.0), "sink gate never opened"
        self.batches.append(batch)
        self.times.append(time.monotonic())

    def items(self) -> list[int]:
        return [x for b in self.batches for x in b]


def wait_until(cond, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.002)
    return cond()


def test_lone_item_leaves_after_max_delay_not_before() -> None:
    sink = Sink()
    b = Batcher(8, 50.0, 64, "oldest", sink, lambda item, reason: None)
    b.start()
    try:
        t0 = time.monotonic()
        b.add(1)
        assert wait_until(lambda: sink.batches, 2.0)
        waited = sink.times[0] - t0
        assert sink.batches == [[1]]
        assert 0.045 <= waited < 0.2, waited
    finally:
        b.stop()


def test_full_batch_leaves_immediately_and_order_is_kept() -> None:
    sink = Sink()
    b = Batcher(4, 1000.0, 64, "oldest", sink, lambda item, reason: None)
    b.start()
    try:
        t0 = time.monotonic()
        for i in range(8):
            b.add(i)
        assert wait_until(lambda: len(sink.items()) == 8, 2.0)
        assert sink.times[-1] - t0 < 0.5  # far below the 1 s max delay
        assert sink.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    finally:
        b.stop()


@pytest.mark.parametrize("policy", ["oldest", "newest"])
def test_full_pending_queue_sheds_by_policy_and_loses_nothing(policy: str) -> None:
    sink = Sink()
    shed: list[tuple[int, str]] = []
    b = Batcher(2, 0.0, 4, policy, sink, lambda item, reason: shed.append((item, reason)))
    b.start()
    try:
        sink.gate.clear()  # the consumer is busy
        b.add(0)
        assert sink.entered.wait(2.0)  # item 0 is held by the blocked sink
        for i in range(1, 9):  # 4 fit in pending, 4 must be shed
            b.add(i)
        assert b.depth() == 4
        if policy == "oldest":
            assert [x for x, _ in shed] == [1, 2, 3, 4]
        else:
            assert [x for x, _ in shed] == [5, 6, 7, 8]
        assert all(r == "pending_full" for _, r in shed)
        sink.gate.set()
        assert wait_until(lambda: len(sink.items()) + len(shed) == 9, 2.0)
        assert sorted(sink.items() + [x for x, _ in shed]) == list(range(9))
        assert all(len(batch) <= 2 for batch in sink.batches)
    finally:
        sink.gate.set()
        b.stop()


def test_stop_returns_what_never_reached_the_sink_and_later_adds_are_shed() -> None:
    sink = Sink()
    shed: list[tuple[int, str]] = []
    b = Batcher(4, 10_000.0, 64, "oldest", sink, lambda item, reason: shed.append((item, reason)))
    b.start()
    b.add(1)
    b.add(2)
    left = b.stop(timeout_s=2.0)
    assert left == [1, 2] and not sink.batches
    assert b.add(3) is False
    assert shed == [(3, "shutting_down")]
    assert not b.thread.is_alive()


def test_flush_sends_pending_without_waiting() -> None:
    sink = Sink()
    b = Batcher(8, 10_000.0, 64, "oldest", sink, lambda item, reason: None)
    b.start()
    try:
        b.add(1)
        time.sleep(0.02)
        assert not sink.batches
        b.flush()
        assert wait_until(lambda: sink.batches == [[1]], 2.0)
        assert wait_until(b.idle, 2.0)
    finally:
        b.stop()


def test_sink_exception_answers_the_batch_and_keeps_running() -> None:
    shed: list[tuple[int, str]] = []
    got: list[list[int]] = []

    def sink(batch: list[int]) -> None:
        if 1 in batch:
            raise RuntimeError("bug")
        got.append(batch)

    b = Batcher(1, 0.0, 8, "oldest", sink, lambda item, reason: shed.append((item, reason)))
    b.start()
    try:
        b.add(1)
        b.add(2)
        assert wait_until(lambda: got == [[2]], 2.0)
        assert shed == [(1, "internal_error")]
        assert b.thread.is_alive()
    finally:
        b.stop()
