"""The reject gate's timing rule on a fake clock: on time, late, no verdict, duplicate, seq gap."""

from __future__ import annotations

import pytest

from linewatch.actuate.gate import Fire, Gate, Timing
from linewatch.wire import Verdict


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def verdict(frame_id: int, value: str = "fail", capture_ts: float = 1000.0, seq: int | None = None,
            camera: str = "cam0", run: str = "r1", reason: str | None = None, part_id: str | None = None) -> Verdict:
    return Verdict(camera=camera, frame_id=frame_id, verdict=value, capture_ts=capture_ts, reason=reason,
                   part_id=part_id, run_id=run, seq=frame_id if seq is None else seq)


def gate(clock: Clock, **kwargs) -> Gate:
    # a part takes 0.5 s from the camera to the ejector and is within its reach for 0.1 s after that
    return Gate({"cam0": Timing(travel_s=0.5, window_s=0.1, budget_s=0.3)}, clock=clock, **kwargs)


def test_a_fail_on_time_fires_at_capture_plus_travel():
    clock = Clock(1000.2)
    g = gate(clock)
    [d] = g.on_verdict(verdict(0, "fail", capture_ts=1000.0))
    assert (d.action, d.reason, d.verdict_id, d.fire_at, d.late) == ("reject", "fail", "r1-0", 1000.5, False)
    assert g.tick() == ([], [])
    assert g.next_wakeup() == 1000.5
    clock.now = 1000.5
    assert g.tick() == ([], [Fire(1000.5, "cam0", "cam0/0", "r1-0", "fail")])
    assert g.tick() == ([], [])  # fired once
    assert g.counts["rejects"] == 1 and g.counts["late"] == 0


def test_pass_fires_nothing_and_unverified_values_reject_unless_let_through():
    clock = Clock(1000.1)
    g = gate(clock)
    assert [d.action for d in g.on_verdict(verdict(0, "pass"))] == ["pass"]
    decisions = [g.on_verdict(verdict(i, v, reason="r"))[0] for i, v in enumerate(("error", "timeout", "shed"), 1)]
    assert [(d.action, d.reason) for d in decisions] == [("reject", "error:r"), ("reject", "timeout:r"), ("reject", "shed:r")]
    lenient = gate(clock, let_through=["timeout"])
    assert [d.action for d in lenient.on_verdict(verdict(0, "timeout"))] == ["pass"]
    assert [d.action for d in lenient.on_verdict(verdict(1, "shed"))] == ["reject"]
    with pytest.raises(ValueError):
        gate(clock, let_through=["fail"])


def test_a_verdict_within_the_window_fires_at_once():
    clock = Clock(1000.55)  # past capture + travel, before the window's end (1000.6)
    g = gate(clock)
    [d] = g.on_verdict(verdict(0, "fail"))
    assert (d.action, d.fire_at, d.late) == ("reject", 1000.55, False)
    assert g.tick()[1] == [Fire(1000.55, "cam0", "cam0/0", "r1-0", "fail")]


def test_a_late_fail_rejects_at_the_next_slot_or_raises_the_alarm():
    clock = Clock(1000.7)  # the window ended at 1000.6
    g = gate(clock)
    [d] = g.on_verdict(verdict(0, "fail"))
    assert (d.action, d.reason, d.fire_at, d.late, d.verdict_id) == ("reject", "late:fail", 1000.7, True, "r1-0")
    assert g.tick()[1] == [Fire(1000.7, "cam0", "cam0/0", "r1-0", "late:fail")]
    assert g.counts["late"] == 1

    alarmed = gate(clock, late="alarm")
    [d] = alarmed.on_verdict(verdict(0, "fail"))
    assert (d.action, d.reason, d.late, d.verdict_id) == ("alarm", "late:fail", True, "r1-0")
    assert alarmed.tick() == ([], [])  # nothing fires: the part has gone
    assert alarmed.counts["late"] == 1 and alarmed.counts["alarms"] == 1


def test_a_late_pass_is_counted_and_lets_the_part_go():
    clock = Clock(1001.0)
    g = gate(clock)
    [d] = g.on_verdict(verdict(0, "pass"))
    assert (d.action, d.late) == ("pass", True)
    assert g.counts["late"] == 1 and g.tick() == ([], [])


def test_no_verdict_within_the_budget_rejects():
    clock = Clock(1000.0)
    g = gate(clock)
    g.part_seen("cam0", "A-1", capture_ts=1000.0)
    assert g.next_wakeup() == pytest.approx(1000.3)
    clock.now = 1000.29
    assert g.tick() == ([], [])
    clock.now = 1000.3
    decisions, fires = g.tick()
    assert [(d.action, d.reason, d.part, d.verdict_id, d.fire_at) for d in decisions] == [
        ("reject", "no_verdict", "A-1", None, 1000.5)]
    assert fires == []
    clock.now = 1000.5
    assert g.tick() == ([], [Fire(1000.5, "cam0", "A-1", None, "no_verdict")])
    # its verdict, after the watchdog decided: late, changes nothing
    [d] = g.on_verdict(verdict(7, "pass", part_id="A-1"))
    assert (d.action, d.reason, d.late) == ("ignored", "already_decided", True)
    assert g.counts["watchdog_rejects"] == 1 and g.counts["late"] == 1
    assert g.tick() == ([], [])


def test_a_verdict_within_the_budget_stops_the_watchdog():
    clock = Clock(1000.0)
    g = gate(clock)
    g.part_seen("cam0", "A-1", capture_ts=1000.0)
    clock.now = 1000.1
    assert [d.action for d in g.on_verdict(verdict(0, "pass", part_id="A-1"))] == ["pass"]
    clock.now = 1001.0
    assert g.tick() == ([], [])


def test_a_skipped_frame_id_is_a_part_without_a_verdict():
    clock = Clock(1000.0)
    g = gate(clock)
    g.on_verdict(verdict(10, "pass", capture_ts=1000.0, seq=0))
    g.on_verdict(verdict(13, "pass", capture_ts=1000.3, seq=1))  # frames 11 and 12 never answered
    clock.now = 1000.2  # their budgets end at 1000.1 + 0.3 and 1000.2 + 0.3
    assert g.tick() == ([], [])
    clock.now = 1000.5
    decisions, _ = g.tick()
    assert [(d.part, d.reason, d.fire_at) for d in decisions] == [
        ("cam0/11", "no_verdict", pytest.approx(1000.6)), ("cam0/12", "no_verdict", pytest.approx(1000.7))]


def test_duplicates_are_ignored():
    clock = Clock(1000.1)
    g = gate(clock)
    g.on_verdict(verdict(0, "fail"))
    [d] = g.on_verdict(verdict(0, "fail"))  # the same verdict id again
    assert (d.action, d.reason, d.verdict_id) == ("ignored", "duplicate", "r1-0")
    clock.now = 1000.5
    assert len(g.tick()[1]) == 1
    assert g.counts["duplicates"] == 1 and g.counts["rejects"] == 1


def test_a_repeated_part_id_or_frame_id_is_decided_again():
    """Part ids wrap and frame ids restart (a replay loop, a camera restarted): a fail for a part
    whose id an earlier part had must still reject."""
    clock = Clock(1000.1)
    g = gate(clock)
    assert [d.action for d in g.on_verdict(verdict(0, "pass", part_id="000", seq=0))] == ["pass"]
    assert [d.action for d in g.on_verdict(verdict(1, "fail", part_id="000", seq=1))] == ["reject"]
    assert [d.action for d in g.on_verdict(verdict(0, "fail", run="r2", seq=0))] == ["reject"]  # frame 0 again


def test_a_seq_gap_raises_an_alarm_with_the_verdict_id():
    clock = Clock(1000.1)
    g = gate(clock)
    g.on_verdict(verdict(0, "pass", seq=0))
    decisions = g.on_verdict(verdict(1, "pass", seq=3))  # seq 1 and 2 lost
    assert [(d.action, d.reason, d.verdict_id) for d in decisions] == [("alarm", "seq_gap", "r1-3"), ("pass", "pass", "r1-3")]
    assert "2 verdict(s) lost" in decisions[0].detail
    assert g.counts["lost"] == 2
    # a new daemon run starts counting afresh
    assert [d.action for d in g.on_verdict(verdict(2, "pass", run="r2", seq=0))] == ["pass"]


def test_verdicts_of_other_cameras_are_ignored():
    g = gate(Clock(1000.1))
    [d] = g.on_verdict(verdict(0, "fail", camera="cam9"))
    assert (d.action, d.reason) == ("ignored", "unknown_camera")
    assert g.tick() == ([], []) and g.counts["unknown_camera"] == 1
