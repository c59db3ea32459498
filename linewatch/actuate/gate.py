"""The reject gate's timing rule, as pure bookkeeping on an injected clock (no sockets, no threads).

Per camera, a part reaches the ejector `travel_s` after its capture and stays within reach for
`window_s`. For each verdict the gate decides once per part:

- a rejecting verdict (fail; error / timeout / shed unless let through) schedules a reject that
  fires at capture_ts + travel_s (`tick()` hands it out when the clock gets there);
- a verdict that arrives after its part's window (capture_ts + travel_s + window_s) is counted
  `late`; if it rejects, the part is handled fail-safe: a reject at once (the next possible slot,
  `late="reject_next"`) or an alarm (`late="alarm"`);
- a part seen without a verdict (`part_seen`, or a frame id skipped in a camera's verdicts)
  is rejected when its budget runs out (the budget watchdog, docs/actuators.md);
- a verdict whose id was seen already changes nothing, nor does a verdict for a part the
  watchdog rejected already (it is late). Parts are not deduplicated by part_id or frame id:
  those repeat (a sender's part ids that wrap, a replay loop, a camera restarted at frame 0), and
  ignoring a `fail` because an earlier part had its id would let a bad part through;
- a gap in the verdicts' `seq` (verdicts lost on the way) raises an alarm.

Every decision carries the verdict id it came from (None for the watchdog's). The clock is
epoch seconds (time.time), the clock of capture_ts.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
import time

from linewatch.wire import Verdict

REMEMBERED = 100_000  # verdict ids and decided parts kept to ignore repeats; older ones are forgotten
LATE_POLICIES = ("reject_next", "alarm")
LETTABLE = ("error", "timeout", "shed")  # verdict values that may be configured to let a part through


@dataclass(frozen=True)
class Timing:
    """One camera's geometry in time, in seconds."""

    travel_s: float
    window_s: float
    budget_s: float | None = None  # None: travel_s
    consecutive_frame_ids: bool = True  # a frame id skipped in the verdicts is a part without a verdict

    @property
    def budget(self) -> float:
        return self.travel_s if self.budget_s is None else self.budget_s


@dataclass(frozen=True)
class Decision:
    """What the gate did about one part (or, for an alarm, about the stream).

    action: "reject" (a reject is scheduled at `fire_at`, or fires at once), "pass", "alarm"
    (no reject: a late part under late="alarm", a seq gap), "ignored" (a repeat, an unknown camera).
    """

    action: str
    reason: str  # fail, error:<reason>, timeout, shed, pass, no_verdict, late, seq_gap, duplicate, ...
    camera: str
    part: str | None
    verdict_id: str | None
    decided_at: float
    fire_at: float | None = None
    late: bool = False
    detail: str = ""


@dataclass(frozen=True, order=True)
class Fire:
    """A reject to put on the output now (handed out by `Gate.tick()`)."""

    at: float
    camera: str = field(compare=False)
    part: str | None = field(compare=False)
    verdict_id: str | None = field(compare=False)
    reason: str = field(compare=False)


def part_key(verdict: Verdict) -> str:
    """A part's identity: part_id when the sender sets one, else camera/frame_id."""
    if verdict.part_id:
        return str(verdict.part_id)
    return f"{verdict.camera}/{verdict.frame_id}"


@dataclass
class _Seen:
    camera: str
    capture_ts: float
    deadline: float  # capture_ts + budget
    remember: bool = True


class Gate:
    """The decisions; call `on_verdict` for each verdict and `tick()` often (or at `next_wakeup()`)."""

    def __init__(
        self,
        cameras: Mapping[str, Timing],
        let_through: Collection[str] = (),
        late: str = "reject_next",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if late not in LATE_POLICIES:
            raise ValueError(f"late must be one of {LATE_POLICIES}, got {late!r}")
        bad = set(let_through) - set(LETTABLE)
        if bad:
            raise ValueError(f"let_through may hold {LETTABLE} only, got {sorted(bad)}")
        self.cameras = dict(cameras)
        self.let_through = {"pass", *let_through}
        self.late_policy = late
        self.clock = clock
        self._schedule: list[tuple[float, int, Fire]] = []
        self._order = itertools.count()
        self._seen: dict[str, _Seen] = {}  # part key -> seen without a verdict yet
        self._watchdogged: OrderedDict[str, None] = OrderedDict()  # part_seen keys the watchdog rejected
        self._ids: OrderedDict[str, None] = OrderedDict()  # verdict ids handled
        self._last_frame: dict[str, tuple[int, float]] = {}  # camera -> (frame_id, capture_ts) of its last verdict
        self._run: str | None = None
        self._next_seq = 0
        self.counts: dict[str, int] = {k: 0 for k in (
            "verdicts", "rejects", "passes", "late", "watchdog_rejects", "duplicates", "lost", "alarms",
            "unknown_camera")}

    # ------------------------------------------------------------ input

    def part_seen(self, camera: str, key: str, capture_ts: float, remember: bool = True) -> None:
        """The trigger saw a part: its verdict (part_id == key, or camera/frame_id == key) is due
        within the camera's budget. `remember`: if the watchdog rejects it, its verdict is
        ignored when it comes (keys must then be unique: a PLC's part tracking)."""
        timing = self.cameras.get(camera)
        if timing is None or key in self._seen or key in self._watchdogged:
            return
        self._seen[key] = _Seen(camera, capture_ts, capture_ts + timing.budget, remember)

    def on_verdict(self, verdict: Verdict) -> list[Decision]:
        """Decide the verdict's part; returns the decisions made (alarms first)."""
        now = self.clock()
        out: list[Decision] = []
        vid = verdict.id
        if vid is not None and vid in self._ids:
            self.counts["duplicates"] += 1
            return [Decision("ignored", "duplicate", verdict.camera, part_key(verdict), vid, now)]
        if vid is not None:
            self._remember(self._ids, vid, None)
        self.counts["verdicts"] += 1
        out += self._count_lost(verdict, now)
        timing = self.cameras.get(verdict.camera)
        key = part_key(verdict)
        if timing is None:
            self.counts["unknown_camera"] += 1
            return out + [Decision("ignored", "unknown_camera", verdict.camera, key, vid, now)]
        if timing.consecutive_frame_ids:
            self._skipped_frames(verdict)
        keys = {key, f"{verdict.camera}/{verdict.frame_id}"}
        rejected = keys & self._watchdogged.keys()
        if rejected:  # the watchdog rejected this part already: the verdict is late and changes nothing
            for k in rejected:
                del self._watchdogged[k]
            self.counts["late"] += 1
            return out + [Decision("ignored", "already_decided", verdict.camera, key, vid, now, late=True,
                                   detail=f"part {key} was rejected by the watchdog before its verdict came")]
        for k in keys:
            self._seen.pop(k, None)
        fire_at = verdict.capture_ts + timing.travel_s
        window_end = fire_at + timing.window_s
        late = now > window_end
        if late:
            self.counts["late"] += 1
        if verdict.verdict in self.let_through:
            self.counts["passes"] += 1
            return out + [Decision("pass", verdict.verdict, verdict.camera, key, vid, now, late=late)]
        reason = verdict.verdict if not verdict.reason else f"{verdict.verdict}:{verdict.reason}"
        return out + [self._reject(verdict.camera, key, vid, reason, fire_at, window_end, now)]

    # ------------------------------------------------------------ time

    def tick(self) -> tuple[list[Decision], list[Fire]]:
        """The watchdog's decisions (a seen part whose budget ran out without a verdict is
        rejected), and every reject whose time has come, oldest first, to put on the output now."""
        now = self.clock()
        decisions = []
        for key, seen in list(self._seen.items()):
            if now >= seen.deadline:
                del self._seen[key]
                timing = self.cameras[seen.camera]
                fire_at = seen.capture_ts + timing.travel_s
                self.counts["watchdog_rejects"] += 1
                if seen.remember:
                    self._remember(self._watchdogged, key, None)
                decisions.append(self._reject(seen.camera, key, None, "no_verdict", fire_at,
                                              fire_at + timing.window_s, now))
        fires = []
        while self._schedule and self._schedule[0][0] <= now:
            fires.append(heapq.heappop(self._schedule)[2])
        return decisions, fires

    def next_wakeup(self) -> float | None:
        """The earliest time `tick()` has something to do (a fire or a budget running out); None: nothing pending."""
        times = [self._schedule[0][0]] if self._schedule else []
        times += [s.deadline for s in self._seen.values()]
        return min(times) if times else None

    @property
    def pending(self) -> int:
        return len(self._schedule)

    # ------------------------------------------------------------ inside

    def _reject(self, camera: str, key: str, vid: str | None, reason: str, fire_at: float, window_end: float,
                now: float) -> Decision:
        if now <= window_end:  # on time: at fire_at, or at once when that is now within the window
            at = max(fire_at, now)
            self._push(Fire(at, camera, key, vid, reason))
            self.counts["rejects"] += 1
            return Decision("reject", reason, camera, key, vid, now, fire_at=at)
        detail = f"window ended {now - window_end:.3f} s before the decision"
        if self.late_policy == "reject_next":
            self._push(Fire(now, camera, key, vid, f"late:{reason}"))
            self.counts["rejects"] += 1
            return Decision("reject", f"late:{reason}", camera, key, vid, now, fire_at=now, late=True, detail=detail)
        self.counts["alarms"] += 1
        return Decision("alarm", f"late:{reason}", camera, key, vid, now, late=True, detail=detail)

    def _push(self, fire: Fire) -> None:
        heapq.heappush(self._schedule, (fire.at, next(self._order), fire))

    @staticmethod
    def _remember(store: OrderedDict, key: str, value) -> None:
        store[key] = value
        if len(store) > REMEMBERED:
            store.popitem(last=False)

    def _skipped_frames(self, verdict: Verdict) -> None:
        """Frame ids a camera skipped between two verdicts are parts without a verdict (the
        camera captured them; the daemon answers every frame it gets, in order per camera):
        seen, at capture times between their neighbours', for the budget watchdog."""
        last = self._last_frame.get(verdict.camera)
        if last is not None and verdict.frame_id == last[0]:
            return
        self._last_frame[verdict.camera] = (verdict.frame_id, verdict.capture_ts)
        if last is None or verdict.frame_id < last[0]:  # the first, or the camera restarted: count afresh
            return
        last_id, last_ts = last
        skipped = verdict.frame_id - last_id - 1
        if skipped <= 0:
            return
        step = (verdict.capture_ts - last_ts) / (skipped + 1)
        for i in range(1, min(skipped, 10_000) + 1):
            # not remembered: in-order release means its verdict never comes, and frame ids repeat
            self.part_seen(verdict.camera, f"{verdict.camera}/{last_id + i}", last_ts + i * step, remember=False)

    def _count_lost(self, verdict: Verdict, now: float) -> list[Decision]:
        """Verdicts are numbered per daemon run (run_id, seq): a gap means verdicts were lost."""
        run, seq = verdict.run_id, verdict.seq
        if run is None or seq is None:
            return []
        if run != self._run:  # the first verdict seen, or the daemon restarted
            self._run, self._next_seq = run, seq + 1
            return []
        missing = seq - self._next_seq
        self._next_seq = max(self._next_seq, seq + 1)
        if missing <= 0:
            return []
        self.counts["lost"] += missing
        self.counts["alarms"] += 1
        return [Decision("alarm", "seq_gap", verdict.camera, None, verdict.id, now,
                         detail=f"{missing} verdict(s) lost before this one")]
