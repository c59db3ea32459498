"""PerKeyOrder: results finished in any order are released per key in arrival (ticket) order."""

from __future__ import annotations

import random
import threading

from linewatch.runtime.pipeline.ordering import PerKeyOrder


def test_reverse_finish_releases_in_ticket_order():
    order, out = PerKeyOrder(), []
    tickets = [order.ticket("cam") for _ in range(4)]
    assert tickets == [0, 1, 2, 3]
    for t in reversed(tickets[1:]):
        order.finish("cam", t, lambda t=t: out.append(t))
    assert out == []  # all wait for ticket 0
    assert order.outstanding() == 4
    order.finish("cam", 0, lambda: out.append(0))
    assert out == [0, 1, 2, 3] and order.outstanding() == 0


def test_keys_do_not_wait_for_each_other_and_state_is_forgotten():
    order, out = PerKeyOrder(), []
    a0, b0 = order.ticket("a"), order.ticket("b")
    order.finish("b", b0, lambda: out.append("b0"))
    assert out == ["b0"]  # "a" still outstanding does not hold "b" back
    order.finish("a", a0, lambda: out.append("a0"))
    assert out == ["b0", "a0"]
    assert order._next_ticket == {} and order._ready == {}  # nothing outstanding: keys forgotten
    assert order.ticket("a") == 0


def test_a_failing_release_is_reported_and_does_not_stop_the_ones_after_it():
    failures = []
    order, out = PerKeyOrder(on_failure=lambda: failures.append(True)), []
    t0, t1 = order.ticket("cam"), order.ticket("cam")
    order.finish("cam", t1, lambda: out.append(1))

    def boom():
        raise RuntimeError("callback bug")

    order.finish("cam", t0, boom)
    assert out == [1] and order.outstanding() == 0 and failures == [True]


def test_many_threads_finishing_at_random_keep_every_key_in_order():
    order = PerKeyOrder()
    out: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    jobs = [(key, order.ticket(key)) for key in random.Random(0).choices("abc", k=600)]
    shuffled = jobs[:]
    random.Random(1).shuffle(shuffled)
    chunks = [shuffled[i::4] for i in range(4)]

    def work(chunk):
        for key, t in chunk:
            order.finish(key, t, lambda key=key, t=t: out[key].append(t))

    threads = [threading.Thread(target=work, args=(c,)) for c in chunks]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    for key, released in out.items():
        assert released == list(range(len(released)))
    assert sum(len(v) for v in out.values()) == 600 and order.outstanding() == 0
