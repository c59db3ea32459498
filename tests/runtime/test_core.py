"""PipelineCore on a fake clock: every rule of the bookkeeping, step by step, no threads.

Each test moves the clock by hand, so none depends on how fast or loaded the machine is.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from linewatch.runtime.pipeline.core import PipelineCore, Slot
from linewatch.runtime.ops.metrics import Metrics
from tests.runtime.fakes import FakeClock, add, make_core, result

def released(core: PipelineCore) -> list[tuple[str, int, str, str | None]]:
    return [(v.camera, v.frame_id, v.verdict, v.reason) for v in core.take_released()]


# ---------------------------------------------------------------- answers and order


def test_first_answer_wins_and_a_late_result_is_counted() -> None:
    clock = FakeClock()
    metrics = Metrics()
    core = make_core(clock, max_batch=1, metrics=metrics)
    slot = add(core, clock, "cam0", 1)
    assert core.take_batch() == [slot]
    clock.advance(1.0)  # the deadline (1 s from capture)
    assert core.expire() == 1
    core.deliver(slot, result(slot))  # the detector's answer comes after the timeout
    assert released(core) == [("cam0", 1, "timeout", "deadline_exceeded")]
    assert core.late == 1 and metrics.registry.get_sample_value("linewatch_late_results_total") == 1
    assert core.inflight == 0 and core.idle()


def test_verdicts_leave_in_receive_order_per_camera_and_cameras_do_not_wait_for_each_other() -> None:
    clock = FakeClock()
    core = make_core(clock, max_batch=8)
    a0, a1 = add(core, clock, "a", 0), add(core, clock, "a", 1)
    b0 = add(core, clock, "b", 0)
    core.register_error("a", 2, "bad_shape", clock.time(), clock.monotonic())
    clock.advance(0.010)  # max_delay: the batch is due with 3 of 8
    batch = core.take_batch()
    assert batch == [a0, b0, a1]  # round robin across cameras, each camera in its own order
    core.deliver(a1, result(a1, "fail"))
    core.deliver(b0, result(b0))
    assert released(core) == [("b", 0, "pass", None)]  # a1 waits for a0
    core.deliver(a0, result(a0))
    assert released(core) == [("a", 0, "pass", None), ("a", 1, "fail", None), ("a", 2, "error", "bad_shape")]


def test_a_frame_registered_late_but_received_earlier_goes_first() -> None:
    # Ingest decodes on several threads: receive order, not registration order, is the order.
    clock = FakeClock()
    core = make_core(clock, max_batch=8)
    now = clock.monotonic()
    s1 = add(core, clock, "cam0", 1, received_mono=now)
    s0 = add(core, clock, "cam0", 0, received_mono=now - 0.001)
    core.deliver(s1, result(s1))
    assert released(core) == []
    core.deliver(s0, result(s0))
    assert [fid for _, fid, _, _ in released(core)] == [0, 1]


def test_released_verdicts_do_not_live_on_in_the_deadline_heap() -> None:
    # The heap holds every slot until its deadline; at 2000 frames/s x 2 s of 224x224 heatmaps
    # that would be ~800 MB if it held the verdicts too.
    clock = FakeClock()
    core = make_core(clock, max_batch=8, deadline_ms=60_000)
    refs = []
    for i in range(8):
        add(core, clock, "cam0", i)
    for slot in core.take_batch():
        verdict = result(slot)
        refs.append(weakref.ref(verdict.heatmap))
        core.deliver(slot, verdict)
    del verdict
    assert len(core.take_released()) == 8
    gc.collect()
    assert all(r() is None for r in refs)


# ---------------------------------------------------------------- batches


def test_a_lone_frame_waits_max_delay_for_company_and_not_longer() -> None:
    clock = FakeClock()
    core = make_core(clock, max_batch=8, max_delay_ms=30.0)
    slot = add(core, clock, "cam0", 0)
    assert core.batch_due_at() == pytest.approx(clock.monotonic() + 0.030)
    clock.advance(0.029)
    assert core.take_batch() is None
    clock.advance(0.001)
    assert core.take_batch() == [slot]


def test_a_full_batch_is_due_at_once() -> None:
    clock = FakeClock()
    core = make_core(clock, max_batch=4, max_delay_ms=10_000.0)
    slots = [add(core, clock, "cam0", i) for i in range(5)]
    assert core.take_batch() == slots[:4]
    assert core.take_batch() is None  # the fifth waits for company


def test_at_most_one_batch_per_stage_plus_one_is_inside() -> None:
    clock = FakeClock()
    core = make_core(clock, n_stages=2, max_batch=1, max_delay_ms=0.0)
    for i in range(5):
        add(core, clock, "cam0", i)
    assert [len(core.take_batch()) for _ in range(3)] == [1, 1, 1]
    assert core.take_batch() is None and core.batch_due_at() is None  # waits for a batch to leave
    core.batch_left()
    assert len(core.take_batch()) == 1


def test_a_fast_camera_cannot_take_a_slow_cameras_share() -> None:
    # Fault run: a 60 frames/s camera beside a 10 frames/s one cut the slow one to 4.25
    # judged/s. Here capacity is one batch of 4 per 100 ms (40 frames/s), offered 60 + 10.
    clock = FakeClock()
    core = make_core(clock, max_batch=4, max_delay_ms=5.0, max_pending=16, deadline_ms=10_000.0)
    judged = {"fast": 0, "slow": 0}
    busy_until = None
    inside: list[Slot] = []
    for tick in range(2000):  # 1 ms steps, 2 s
        if tick % 100 == 0:
            add(core, clock, "slow", tick)
        if tick % 17 == 0:  # ~60 frames/s
            add(core, clock, "fast", tick)
        if busy_until is not None and clock.monotonic() >= busy_until:
            for s in inside:
                core.deliver(s, result(s))
                judged[s.camera] += 1
            core.batch_left()
            busy_until = None
        if busy_until is None:
            batch = core.take_batch()
            if batch:
                inside, busy_until = batch, clock.monotonic() + 0.1
        clock.advance(0.001)
    verdicts = core.take_released()
    slow = [v for v in verdicts if v.camera == "slow"]
    assert judged["slow"] >= 19, judged  # every slow frame but at most the one still in flight
    assert {v.verdict for v in slow} == {"pass"}
    assert judged["fast"] > 0 and any(v.verdict == "shed" for v in verdicts if v.camera == "fast")


@pytest.mark.parametrize("policy, shed_ids", [("oldest", [0, 1, 2]), ("newest", [3, 4, 5])])
def test_when_too_many_wait_the_camera_with_most_waiting_gives_one_up(policy: str, shed_ids: list[int]) -> None:
    clock = FakeClock()
    core = make_core(clock, max_batch=100, max_delay_ms=10_000.0, max_pending=4, shed_policy=policy)
    add(core, clock, "quiet", 0)
    for i in range(6):
        add(core, clock, "busy", i)
        clock.advance(0.001)
    assert core.pending == 4
    core.answer_all_unanswered("timeout", "test_end")
    shed = [(cam, fid) for cam, fid, value, reason in released(core) if (value, reason) == ("shed", "pending_full")]
    assert shed == [("busy", i) for i in shed_ids]


def test_frames_that_cannot_make_their_deadline_are_shed_before_work() -> None:
    clock = FakeClock()
    core = make_core(clock, n_stages=2, max_batch=1, max_delay_ms=0.0, deadline_ms=500.0)
    core.stage_finished(0, 0.2)
    core.stage_finished(1, 0.2)  # a batch takes 0.4 s; one already inside adds 0.2 s
    first = add(core, clock, "cam0", 0)
    assert core.take_batch() == [first]
    late = add(core, clock, "cam0", 1, age_s=0.2)  # 0.3 s left < 0.2 + 0.4 expected
    assert core.take_batch() == []
    assert released(core) == []  # it waits behind frame 0 in release order
    core.deliver(first, result(first))
    assert released(core) == [("cam0", 0, "pass", None), ("cam0", 1, "shed", "deadline_unreachable")]
    assert late.answered


# ---------------------------------------------------------------- deadlines from capture


def test_deadline_counts_from_capture_time() -> None:
    # Fault run: a frame captured 10 s before it arrived got `pass` with latency 10.1 s.
    clock = FakeClock()
    core = make_core(clock, max_batch=1, max_delay_ms=0.0, deadline_ms=1000.0)
    slot = add(core, clock, "cam0", 0, age_s=0.4)
    assert slot.deadline == pytest.approx(clock.monotonic() + 0.6)
    clock.advance(0.599)
    assert core.expire() == 0
    clock.advance(0.001)
    assert core.expire() == 1
    assert released(core) == [("cam0", 0, "timeout", "deadline_exceeded")]


def test_a_frame_past_its_deadline_on_arrival_is_answered_at_once_without_work() -> None:
    clock = FakeClock()
    core = make_core(clock, max_batch=1, max_delay_ms=0.0, deadline_ms=1000.0)
    slot = add(core, clock, "cam0", 0, age_s=10.0)
    assert slot.answered and core.pending == 0 and core.take_batch() is None
    [v] = core.take_released()
    assert (v.verdict, v.reason) == ("timeout", "expired_on_arrival")
    assert v.latency_s == pytest.approx(10.0)


def test_a_capture_time_in_the_future_beyond_the_tolerance_is_an_error() -> None:
    # Fault run: a capture time an hour ahead got `pass` with latency -3,600 s.
    clock = FakeClock()
    core = make_core(clock, max_batch=1, max_delay_ms=0.0, deadline_ms=1000.0, skew_ms=500.0)
    add(core, clock, "cam0", 0, age_s=-3600.0)
    assert released(core) == [("cam0", 0, "error", "capture_in_future")]
    within = add(core, clock, "cam0", 1, age_s=-0.4)  # within the tolerance: counts as age 0
    assert within.deadline == pytest.approx(clock.monotonic() + 1.0)
    assert core.take_batch() == [within]


def test_deadline_from_receive_ignores_capture_times() -> None:
    clock = FakeClock()
    core = make_core(clock, max_batch=1, max_delay_ms=0.0, deadline_ms=1000.0, deadline_from="receive")
    old = add(core, clock, "cam0", 0, age_s=10.0)
    future = add(core, clock, "cam0", 1, age_s=-3600.0)
    assert not old.answered and not future.answered
    assert old.deadline == pytest.approx(clock.monotonic() + 1.0)


# ---------------------------------------------------------------- overload and shutdown


def test_under_overload_every_frame_gets_one_verdict_and_capacity_is_used() -> None:
    # Capacity: one batch of <= 4 per 40 ms in the slowest of 3 stages (~100 frames/s).
    # Offered: 400 frames/s for 1.5 s, deadline 300 ms. Without shedding hopeless frames
    # before work, the stages fill with frames that time out while queued.
    clock = FakeClock()
    costs = [0.01, 0.04, 0.01]
    core = make_core(clock, n_stages=3, max_batch=4, max_delay_ms=2.0, max_pending=64, deadline_ms=300.0)
    stages: list[tuple[list[Slot], float] | None] = [None, None, None]
    queues: list[list[list[Slot]]] = [[], [], []]
    sent = 0
    for tick in range(4000):  # 0.5 ms steps, 2 s
        now = clock.monotonic()
        if tick < 3000 and tick % 5 == 0:
            add(core, clock, "cam", sent)
            sent += 1
        core.expire()
        for i in (2, 1, 0):  # finish stages, pass batches on
            if stages[i] is not None and now >= stages[i][1]:
                batch = stages[i][0]
                core.stage_finished(i, costs[i], len(batch))
                stages[i] = None
                if i == 2:
                    for s in batch:
                        core.deliver(s, result(s))
                    core.batch_left()
                else:
                    queues[i + 1].append(batch)
            if stages[i] is None and queues[i]:
                stages[i] = (queues[i].pop(0), now + costs[i])
        batch = core.take_batch()
        if batch:
            queues[0].append(batch)
            if stages[0] is None:
                stages[0] = (queues[0].pop(0), now + costs[0])
        clock.advance(0.0005)
    core.answer_all_unanswered()
    verdicts = core.take_released()
    assert sorted(v.frame_id for v in verdicts) == list(range(sent))  # each exactly once
    judged = sum(v.verdict == "pass" for v in verdicts)
    assert judged >= 0.9 * 100 * 1.5, judged  # most of the ~150 that capacity allows (160 when written)
    assert all(v.latency_s <= 0.3 + 1e-9 for v in verdicts if v.verdict == "pass")


def test_stop_accepting_sheds_new_frames_and_flushes_waiting_ones() -> None:
    clock = FakeClock()
    core = make_core(clock, max_batch=8, max_delay_ms=10_000.0)
    waiting = add(core, clock, "cam0", 0)
    core.stop_accepting()
    assert core.take_batch() == [waiting]  # no 10 s wait for company while draining
    add(core, clock, "cam0", 1)
    core.deliver(waiting, result(waiting))
    assert released(core) == [("cam0", 0, "pass", None), ("cam0", 1, "shed", "shutting_down")]


def test_answer_all_unanswered_reaches_waiting_and_running_frames() -> None:
    clock = FakeClock()
    core = make_core(clock, max_batch=1, max_delay_ms=0.0)
    running = add(core, clock, "cam0", 0)
    assert core.take_batch() == [running]
    add(core, clock, "cam0", 1)
    core.answer_all_unanswered()
    assert released(core) == [("cam0", 0, "timeout", "shutdown"), ("cam0", 1, "timeout", "shutdown")]
    assert core.pending == 0 and core.idle()


def test_metrics_tell_the_same_story_as_the_verdicts() -> None:
    clock = FakeClock()
    metrics = Metrics()
    core = make_core(clock, max_batch=2, max_delay_ms=0.0, max_pending=2, metrics=metrics)
    for i in range(4):
        add(core, clock, "cam0", i)  # two are shed: pending_full
    for slot in core.take_batch():
        core.deliver(slot, result(slot))
    core.register_error("cam0", 9, "too_large", clock.time(), clock.monotonic())
    verdicts = core.take_released()
    get = metrics.registry.get_sample_value
    assert get("linewatch_frames_received_total", {"camera": "cam0"}) == 5
    assert get("linewatch_verdicts_total", {"camera": "cam0", "verdict": "pass"}) == 2
    assert get("linewatch_frames_shed_total", {"camera": "cam0", "reason": "pending_full"}) == 2
    assert get("linewatch_frame_errors_total", {"reason": "too_large"}) == 1
    assert len(verdicts) == 5 and core.stats()["verdicts"] == {"pass": 2, "fail": 0, "error": 1, "timeout": 0, "shed": 2}


def test_only_judged_frames_feed_the_score_histogram() -> None:
    clock = FakeClock()
    metrics = Metrics()
    core = make_core(clock, max_batch=4, max_delay_ms=0.0, max_pending=4, metrics=metrics)
    for i in range(5):
        add(core, clock, "cam0", i)  # pending_full: frame 0 is shed
    judged = {s.frame_id: s for s in core.take_batch()}
    assert sorted(judged) == [1, 2, 3, 4]
    core.deliver(judged[1], result(judged[1]))  # pass, 0.1 / 0.5 = 0.2
    fail = result(judged[2], "fail")
    fail.score = 0.7  # 1.4
    core.deliver(judged[2], fail)
    uncalibrated = result(judged[3])
    uncalibrated.threshold = float("inf")  # an uncalibrated bank: counted as a pass, no ratio
    core.deliver(judged[3], uncalibrated)
    core.answer_simple(judged[4], "error", "stage_failed:only")
    core.register_error("cam0", 9, "too_large", clock.time(), clock.monotonic())
    assert [v.verdict for v in core.take_released()] == ["shed", "pass", "fail", "pass", "error", "error"]
    get = metrics.registry.get_sample_value
    assert get("linewatch_score_ratio_count", {"camera": "cam0", "verdict": "pass"}) == 1
    assert get("linewatch_score_ratio_bucket", {"camera": "cam0", "verdict": "pass", "le": "0.2"}) == 1
    assert get("linewatch_score_ratio_count", {"camera": "cam0", "verdict": "fail"}) == 1
    assert get("linewatch_score_ratio_bucket", {"camera": "cam0", "verdict": "fail", "le": "1.25"}) == 0
    assert get("linewatch_score_ratio_bucket", {"camera": "cam0", "verdict": "fail", "le": "1.5"}) == 1
    assert get("linewatch_verdicts_total", {"camera": "cam0", "verdict": "pass"}) == 2
