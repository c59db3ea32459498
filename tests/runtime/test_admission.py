"""Admission on a fake clock: what the core decides before any work (decode included) is spent.

Hand-computed cases for each rule (the measured capacity, the latency bound, the per-camera
share on arrival), then a simulated line whose stages share one CPU (processor sharing: two
busy stages each run at half speed, as decode and the detector do on a small machine), driven
at 3x its capacity and with a flooding camera beside a slow one. Nothing here reads a real
clock, so no result depends on the machine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.pipeline.core import (LATE_QUANTILE, LATENESS_STEP, FairShares, PipelineCore, RunningQuantile, Slot,
                                             StageCost, fair_level)
from tests.runtime.fakes import FakeClock, add, make_core, result


def reasons(core: PipelineCore) -> list[tuple[str, int, str, str | None]]:
    return [(v.camera, v.frame_id, v.verdict, v.reason) for v in core.take_released()]


# ---------------------------------------------------------------- the estimates, by hand


def run_batch(core: PipelineCore, clock: FakeClock, frames: int, seconds: float, camera: str = "probe") -> None:
    """One batch of `frames` frames through the stage graph in `seconds`, with results."""
    for i in range(frames):
        add(core, clock, camera, i)
    clock.advance(core.max_delay_s)
    batch = core.take_batch()
    assert batch is not None and len(batch) == frames
    clock.advance(seconds)
    core.batch_left(judged=batch)
    for slot in batch:
        core.deliver(slot, result(slot))
    core.take_released()


def test_the_service_time_is_fitted_as_a_cost_per_batch_plus_a_cost_per_frame() -> None:
    # Light load: batches of 1 and 2 at 30 ms + 5 ms a frame. Per frame that is 35 ms
    # (28 frames/s); a full batch of 8 takes 70 ms (114 frames/s).
    one_size = StageCost()
    assert not one_size.measured and one_size.seconds(8) == 0.0
    one_size.add(4, 0.04)
    one_size.add(4, 0.04)
    assert one_size.seconds(8) == pytest.approx(0.08)  # one size seen: proportional, the cautious side
    cost = StageCost()
    for frames, seconds in [(1, 0.035), (2, 0.040), (1, 0.035), (2, 0.040)]:
        cost.add(frames, seconds)
    assert cost.seconds(8) == pytest.approx(0.070)


def test_capacity_is_a_full_batch_over_the_measured_service_time_of_one() -> None:
    clock = FakeClock()
    core = make_core(clock, n_stages=2, max_batch=8)
    assert core.capacity_fps() is None  # nothing measured yet
    run_batch(core, clock, 8, 0.08)
    assert core.capacity_fps() == pytest.approx(100.0)


def test_service_time_counts_from_the_previous_batchs_results_when_it_waited_for_them() -> None:
    # A enters at 0 and leaves at 0.1; B enters at 0.01 and leaves at 0.2: the graph served B
    # from 0.1 to 0.2 (0.1 s), not 0.19 s.
    clock = FakeClock()
    core = make_core(clock, n_stages=1, max_batch=2, max_delay_ms=0.0)
    a = [add(core, clock, "a", i) for i in range(2)]
    assert core.take_batch() == a
    clock.advance(0.01)
    b = [add(core, clock, "b", i) for i in range(2)]
    assert core.take_batch() == b
    clock.advance(0.09)
    core.batch_left(judged=a)
    clock.advance(0.1)
    core.batch_left(judged=b)
    assert core.service.seconds(2) == pytest.approx((0.9 * 0.1 + 0.1) / 1.9)  # both 0.1 s


def test_a_batch_is_expected_out_when_the_graph_is_free_plus_its_service_time_and_errors_carry_over() -> None:
    clock = FakeClock()
    core = make_core(clock, n_stages=1, max_batch=4, max_delay_ms=0.0, deadline_ms=10_000.0)
    core.service.add(4, 0.4)  # measured before: 0.4 s a batch of 4
    assert core.expected_latency_s(4) == pytest.approx(0.4)
    first = [add(core, clock, "a", i) for i in range(4)]
    assert core.take_batch() == first  # expected out at 0.4
    assert core.expected_latency_s(4) == pytest.approx(0.8)  # behind it
    second = [add(core, clock, "a", i) for i in range(4, 8)]
    assert core.take_batch() == second  # expected out at 0.8
    clock.advance(0.5)
    core.batch_left(judged=first)  # 0.1 s later than expected: the second is expected at 0.9
    service = core.service.seconds(4)  # now fitted from 0.4 and 0.5
    margin = LATENESS_STEP * service * LATE_QUANTILE  # 0.1 > the margin (0): it moved up one step
    assert core.margin_s == pytest.approx(margin)
    assert core.expected_latency_s(4) == pytest.approx((0.9 - 0.5) + service + margin)


def test_the_margin_settles_where_two_percent_of_batches_leave_later() -> None:
    rng = np.random.default_rng(3)
    late = RunningQuantile(LATE_QUANTILE)
    errors = rng.gamma(2.0, 0.05, 20_000) - 0.05  # skewed: mostly a little early or late, sometimes much later
    for x in errors:
        late.add(x, 0.005)
    assert np.mean(errors[-5000:] > late.value) == pytest.approx(0.02, abs=0.01)


def test_before_a_batch_was_measured_the_latency_is_modelled_from_the_stage_times() -> None:
    core = make_core(FakeClock(), n_stages=1)
    core.stage_finished(0, 0.2)
    assert core.expected_latency_s() == pytest.approx(0.2)
    core.stage_finished(0, 0.4)  # average 0.24, mean deviation 0.2 * 0.2 = 0.04
    assert core.expected_latency_s() == pytest.approx(0.24 + 2 * 0.04)


# ---------------------------------------------------------------- shares on arrival


@pytest.mark.parametrize(("rates", "capacity", "level"), [
    ([10.0, 60.0], 16.0, 8.0),  # both above half: each gets half
    ([2.0, 60.0], 16.0, 14.0),  # the slow one's 2 are met, the flood gets the other 14
    ([2.0, 3.0], 16.0, float("inf")),  # everything fits
    ([], 16.0, float("inf")),
    ([1.0, 5.0, 5.0, 30.0], 12.0, 11.0 / 3),  # 1 is met; the other three share 11
])
def test_the_fair_level_is_max_min(rates, capacity, level) -> None:
    got = fair_level(rates, capacity)
    assert got == pytest.approx(level) if level != float("inf") else got == level
    if got != float("inf"):
        assert sum(min(r, got) for r in rates) == pytest.approx(capacity)


def test_a_camera_above_the_fair_level_gets_the_level_and_one_below_it_everything() -> None:
    # Capacity 16 frames/s: a camera at 60 and one at 10 each get 8 a second; a camera at 4
    # beside one at 60 gets all 4 and the flood the other 12.
    for slow_fps, expected_slow, expected_flood in [(10.0, 8.0, 8.0), (4.0, 4.0, 12.0)]:
        shares, admitted = FairShares(window_s=2.0, burst=8), Counter()
        arrivals = sorted([(k / 60.0, "flood") for k in range(60 * 30)] + [(k / slow_fps, "slow") for k in range(int(slow_fps * 30))])
        for t, camera in arrivals:
            if shares.admit(camera, t, 16.0) and t >= 10.0:  # after the rates have settled
                admitted[camera] += 1
        assert admitted["slow"] / 20.0 == pytest.approx(expected_slow, rel=0.05)
        assert admitted["flood"] / 20.0 == pytest.approx(expected_flood, rel=0.05)



def measured_core(policy: str = "oldest", metrics: Metrics | None = None) -> tuple[PipelineCore, FakeClock]:
    """Service time 0.4 s a batch of 4, deadline 1 s, max_delay 1 s (no batch is due while
    frames arrive at one instant and nothing takes one)."""
    clock = FakeClock()
    core = make_core(clock, n_stages=1, max_batch=4, max_delay_ms=1000.0, deadline_ms=1000.0, shed_policy=policy,
                     metrics=metrics)
    core.service.add(4, 0.4)
    return core, clock


def test_a_camera_keeps_what_its_share_can_judge_in_time_and_sheds_its_own_oldest() -> None:
    # The n-th waiting frame is judged in batch (n - 1) // 4 + 1, at 0.4 s a batch: in time
    # while that is at most 2 batches, so n <= 8.
    metrics = Metrics()
    core, clock = measured_core(metrics=metrics)
    slots = [add(core, clock, "a", i) for i in range(10)]
    assert core.pending == 8
    assert reasons(core) == [("a", 0, "shed", "over_share"), ("a", 1, "shed", "over_share")]
    assert [s.answered for s in slots] == [True] * 2 + [False] * 8
    assert metrics.registry.get_sample_value("linewatch_frames_shed_total", {"camera": "a", "reason": "over_share"}) == 2


def test_with_policy_newest_the_arriving_frame_is_the_one_shed() -> None:
    core, clock = measured_core(policy="newest")
    slots = [add(core, clock, "a", i) for i in range(10)]
    assert core.pending == 8
    assert [s.answered for s in slots] == [False] * 8 + [True] * 2
    assert {(s.verdict.verdict, s.verdict.reason) for s in slots[8:]} == {("shed", "over_share")}
    assert reasons(core) == []  # released only after frames 0..7, in receive order


def test_another_cameras_waiting_frames_count_in_round_robin_and_a_lone_frame_is_never_over_share() -> None:
    # Camera b has one frame waiting: it is served before a's n-th frame (round robin), so
    # a's n-th frame is judged in batch n // 4 + 1: in time while n <= 7. b's lone frame is
    # within any share.
    core, clock = measured_core()
    add(core, clock, "b", 0)
    for i in range(10):
        add(core, clock, "a", i)
    assert reasons(core) == [("a", i, "shed", "over_share") for i in range(3)]
    assert core.pending == 8  # seven of a, one of b


def test_before_the_capacity_is_measured_only_the_memory_bound_sheds() -> None:
    clock = FakeClock()
    core = make_core(clock, n_stages=1, max_batch=8, max_delay_ms=1000.0, max_pending=5)
    for i in range(7):
        add(core, clock, "a", i)
    assert reasons(core) == [("a", 0, "shed", "pending_full"), ("a", 1, "shed", "pending_full")]


# ---------------------------------------------------------------- a simulated line


class SharedCpuLine:
    """Stages run as threads would on one CPU core: every busy stage progresses at
    1 / (number of busy stages) of real speed. Each stage's work for a batch of n frames is
    `cost(stage, n)` CPU-seconds. The core decides; this only moves batches and the clock."""

    def __init__(self, core: PipelineCore, clock: FakeClock, cost: Callable[[int, int], float], n_stages: int) -> None:
        self.core, self.clock, self.cost = core, clock, cost
        self.running: list[tuple[list[Slot], float, float] | None] = [None] * n_stages  # batch, work left, started
        self.queues: list[list[list[Slot]]] = [[] for _ in range(n_stages)]
        self.late = 0

    def step(self, dt: float) -> None:
        core, now = self.core, self.clock.monotonic()
        core.expire()
        last = len(self.running) - 1
        for i in range(last, -1, -1):  # finish stages, pass batches on
            job = self.running[i]
            if job is not None and job[1] <= 1e-12:
                batch = job[0]
                core.stage_finished(i, now - job[2], len(batch))
                self.running[i] = None
                if i == last:
                    core.batch_left(judged=batch)
                    for slot in batch:
                        if slot.answered:
                            self.late += 1
                        core.deliver(slot, result(slot))
                else:
                    self.queues[i + 1].append(batch)
            if self.running[i] is None and self.queues[i]:
                batch = self.queues[i].pop(0)
                self.running[i] = (batch, self.cost(i, len(batch)), now)
        batch = core.take_batch()
        if batch:
            self.queues[0].append(batch)
            if self.running[0] is None:
                self.running[0] = (self.queues[0].pop(0), self.cost(0, len(batch)), now)
        busy = [i for i, job in enumerate(self.running) if job is not None]
        for i in busy:
            batch, left, started = self.running[i]
            self.running[i] = (batch, left - dt / len(busy), started)
        self.clock.advance(dt)


def cost(stage: int, n: int) -> float:
    """Decode 10 ms a frame; the detector 10 ms a batch + 5 ms a frame. A full batch of 8:
    80 + 50 ms of one CPU, so the line judges at most 8 / 0.13 = 61.5 frames/s."""
    return 0.010 * n if stage == 0 else 0.010 + 0.005 * n


CAPACITY = 8 / 0.13


def run_line(rates: dict[str, float], seconds: float, deadline_ms: float = 500.0) -> tuple[list, SharedCpuLine, dict]:
    clock = FakeClock()
    core = make_core(clock, n_stages=2, max_batch=8, max_delay_ms=5.0, max_pending=256, deadline_ms=deadline_ms,
                     max_inside=2)  # the pipeline's depth on a CPU
    line = SharedCpuLine(core, clock, cost, 2)
    dt = 0.0005
    sent: dict[str, int] = Counter()
    next_at = {camera: 0.0 for camera in rates}
    t = 0.0
    while t < seconds + 2.0:  # then 2 s to finish
        for camera, fps in rates.items():
            while t < seconds and next_at[camera] <= t:
                add(core, clock, camera, sent[camera])
                sent[camera] += 1
                next_at[camera] += 1.0 / fps
        line.step(dt)
        t += dt
    core.answer_all_unanswered()
    return core.take_released(), line, dict(sent)


def test_at_three_times_capacity_the_line_judges_at_capacity_and_almost_nothing_late() -> None:
    verdicts, line, sent = run_line({"cam": 3 * CAPACITY}, seconds=10.0)
    assert sorted(v.frame_id for v in verdicts) == list(range(sent["cam"]))  # each exactly once
    judged = sum(v.verdict == "pass" for v in verdicts)
    assert judged >= 0.9 * CAPACITY * 10.0, judged
    assert line.late <= 0.02 * (judged + line.late), (line.late, judged)
    assert all(v.latency_s <= 0.5 + 1e-9 for v in verdicts if v.verdict == "pass")
    shed = Counter(v.reason for v in verdicts if v.verdict == "shed")
    assert shed["over_share"] > shed["deadline_unreachable"] + shed["pending_full"]  # shed on arrival, mostly


def test_a_flooding_camera_is_cut_to_its_share_and_the_other_keeps_its_frames() -> None:
    verdicts, line, sent = run_line({"slow": 10.0, "flood": 4 * CAPACITY}, seconds=10.0)
    by = Counter((v.camera, v.verdict) for v in verdicts)
    assert sum(by.values()) == sum(sent.values())
    assert by[("slow", "pass")] >= 0.9 * sent["slow"], by  # its max-min share is all of its 10 frames/s
    assert by[("flood", "pass")] >= 0.9 * (CAPACITY - 10.0) * 10.0, by  # the rest of the capacity
    over_share = Counter(v.camera for v in verdicts if v.reason == "over_share")
    assert over_share["flood"] >= 0.9 * (sent["flood"] - (CAPACITY - 10.0) * 10.0)  # it pays for its own excess
    assert over_share["slow"] <= 0.05 * sent["slow"]
