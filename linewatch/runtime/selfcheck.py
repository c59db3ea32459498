"""The line's self-check: the master-part routine, done by the daemon itself.

At start, after each bank switch and then every `selfcheck.interval_s`, a round runs: each
reference frame (known-good parts, and known-bad ones, linewatch.selfcheck_references) is
encoded as a camera would send it (PNG, our wire format), read by the same reader as ingest's
and submitted to the live pipeline under the reserved camera id `selfcheck.camera`. It is
judged like any frame: admission, its camera's fair share, decode, every detector stage, the
bank in service. One reference is in flight at a time: the next goes in when the previous one
has its verdict, so a round costs the capacity of its references, one after the other, and
never more than one frame's place in a batch.

Each verdict is judged against what the reference is (`judge`):

  wrong_verdict  a good reference failed, or a bad one passed
  drift          a good reference passed, with a score above drift_fraction x the threshold
  not_judged     no pass/fail at all (shed, timeout, error): the line could not judge its
                 master part, so it cannot be trusted with real parts either

A round passes when every reference does. Its result goes to the metrics
(linewatch_selfcheck_failures_total{kind}, _rounds_total{result}, _failing, the last pass and
last round timestamps, each reference's score / threshold), one log line, the live page and
/readyz (with `unready_on_failure`). The daemon routes the reserved camera's verdicts here and
nowhere else (not to the publisher, MQTT or the archive), and the pipeline numbers them apart
from the published ones (PipelineCore's private cameras), so a subscriber sees no gap.

`Schedule`, `judge` and `SelfCheck.poll` read time only from the injected clock; the thread
(`start`) only calls `poll` when something may be due.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from linewatch import wire
from linewatch.config import SelfCheckConfig
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.pipeline.clock import SYSTEM_CLOCK, Clock
from linewatch.wire import Frame, Verdict, WireError

FAILURE_KINDS = ("wrong_verdict", "drift", "not_judged", "no_references")
POLL_S = 1.0  # the thread looks at the schedule at least this often


@dataclass(frozen=True)
class Reference:
    """One reference frame: a name (for logs, metrics and the live page), the verdict it must
    get ("pass": a known-good part, "fail": a known-bad one) and its RGB uint8 image."""

    name: str
    expected: str
    image: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        if self.expected not in ("pass", "fail"):
            raise ValueError(f"reference {self.name}: expected must be pass or fail, not {self.expected!r}")


# a processor (its bank) -> the self-check's references for it; raises ValueError or OSError
# saying what to fix (linewatch.selfcheck_references.load_references)
ReferenceLoader = Callable[[Any], "list[Reference]"]


@dataclass(frozen=True)
class Check:
    """What one reference got in one round. `failure` is None when it got what it should."""

    reference: str
    expected: str
    verdict: str
    score: float | None
    threshold: float | None
    failure: str | None
    detail: str

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def ratio(self) -> float | None:
        """score / threshold, when both are finite numbers and the threshold is positive."""
        if self.score is None or self.threshold is None or not (0 < self.threshold < math.inf):
            return None
        ratio = self.score / self.threshold
        return ratio if math.isfinite(ratio) else None

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "expected": self.expected, "verdict": self.verdict,
                "score": _finite(self.score), "threshold": _finite(self.threshold), "ratio": self.ratio,
                "failure": self.failure, "detail": self.detail}


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def judge(reference: Reference, verdict: Verdict, drift_fraction: float) -> Check:
    """The check of `reference` by the verdict its frame got (see the module docstring)."""
    v, score, threshold = verdict.verdict, verdict.score, verdict.threshold

    def check(failure: str | None, detail: str) -> Check:
        return Check(reference.name, reference.expected, v, score, threshold, failure, detail)

    if v not in ("pass", "fail"):
        return check("not_judged", f"{v}" + (f" ({verdict.reason})" if verdict.reason else ""))
    scored = f"score {_shown(score)}, threshold {_shown(threshold)}"
    if v != reference.expected:
        return check("wrong_verdict", f"{v}, expected {reference.expected}: {scored}")
    if v == "pass" and score is not None and threshold is not None and score > drift_fraction * threshold:
        return check("drift", f"score {_shown(score)} above {drift_fraction:g} x threshold {_shown(threshold)}")
    return check(None, f"{v}: {scored}")


def _shown(x: float | None) -> str:
    return "none" if x is None else f"{x:.4g}"


@dataclass
class Round:
    """One self-check round: its references' checks, in order."""

    number: int
    started: float  # wall clock
    references: int  # how many it checks
    checks: list[Check] = field(default_factory=list)
    finished: float | None = None  # wall clock, once every reference has its check

    @property
    def ok(self) -> bool:
        return self.finished is not None and len(self.checks) == self.references and all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "started": self.started, "finished": self.finished,
                "ok": self.ok if self.finished is not None else None,
                "checks": [c.to_dict() for c in self.checks],
                "failed": [c.reference for c in self.failures()]}


class Schedule:
    """When a round is due, on the monotonic clock: at once (at start, or after `now()`), then
    `interval_s` after the start of the previous round."""

    def __init__(self, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self.next_at: float | None = None  # None: due at once

    def due(self, now: float) -> bool:
        return self.next_at is None or now >= self.next_at

    def started(self, now: float) -> None:
        """A round starts at `now`: the next is due interval_s later."""
        self.next_at = now + self.interval_s

    def now(self) -> None:
        """Make a round due at once (a new bank went into service)."""
        self.next_at = None

    def seconds_until_due(self, now: float) -> float:
        return 0.0 if self.next_at is None else max(0.0, self.next_at - now)


class SelfCheck:
    """Runs the rounds: `poll` starts a due round and puts its references through `submit`,
    one at a time; `on_verdict` takes the reserved camera's verdicts (the pipeline's output
    thread). `references`: the reference frames, or the error that kept them from loading
    (`set_references`). `limits`: ingest's image limits (the frames are read as ingest reads)."""

    def __init__(self, config: SelfCheckConfig, submit: Callable[[Frame], None], metrics: Metrics, log: Any,
                 clock: Clock = SYSTEM_CLOCK, limits: wire.ImageLimits | None = None,
                 loader: ReferenceLoader | None = None) -> None:
        self._loader = loader
        self.config = config
        self.camera = config.camera
        self._submit = submit
        self._metrics = metrics
        self._log = log
        self._clock = clock
        self._limits = limits if limits is not None else wire.ImageLimits(2**31, 2**31, 2**40)
        self.schedule = Schedule(config.interval_s)
        self._lock = threading.Lock()
        self._references: list[Reference] = []
        self._references_error: str | None = "no references set"
        self._rounds = itertools.count(1)
        self._frame_ids = itertools.count()
        self._round: Round | None = None  # the round running
        self._round_references: list[Reference] = []
        self._waiting: tuple[int, Reference] | None = None  # the frame in flight: (frame id, reference)
        self._answer: tuple[Reference, Verdict] | None = None  # its verdict, not judged yet
        self.last: Round | None = None  # the last finished round
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lw-selfcheck", daemon=True)
        m = metrics
        m.selfcheck_interval.set(config.interval_s)
        for kind in FAILURE_KINDS:  # every series exists from the start (at 0), for increase() and rate()
            m.selfcheck_failures.labels(kind=kind)
        for result in ("pass", "fail"):
            m.selfcheck_rounds.labels(result=result)

    # ------------------------------------------------------------------ references

    def use_bank(self, processor: Any, at_start: bool) -> None:
        """Load the references for `processor`'s bank with the loader. At start a failure raises
        RuntimeError saying what to fix (the daemon does not start); at a bank switch it is logged
        and the rounds report `no_references` until a bank with references comes."""
        try:
            if self._loader is None:
                raise RuntimeError("selfcheck.enabled, but this daemon was given no way to load references")
            try:
                references = self._loader(processor)
            except (ValueError, OSError) as e:
                raise RuntimeError(str(e)) from None
        except RuntimeError as e:
            if at_start:
                raise
            self._log.error("selfcheck_references_failed", bank_id=processor.bank_id, error=str(e))
            self.set_references(None, error=str(e))
            return
        self.set_references(references)

    def set_references(self, references: list[Reference] | None, error: str | None = None) -> None:
        """The references of the bank in service (or why there are none); the next round uses
        them, and is due at once. A round running finishes with the ones it started with."""
        with self._lock:
            self._references = list(references or [])
            self._references_error = error if error is not None else (None if self._references else "no references")
            self.schedule.now()
        self._wake.set()

    # ------------------------------------------------------------------ the rounds

    def poll(self) -> bool:
        """Start a round when one is due; judge the verdict that came back and put the next
        reference in (or finish the round). Returns whether a round is running."""
        with self._lock:
            if self._round is None:
                now = self._clock.monotonic()
                if not self.schedule.due(now):
                    return False
                self.schedule.started(now)
                self._round_references = list(self._references)
                self._round = Round(next(self._rounds), self._clock.time(), len(self._round_references))
                if self._references_error is not None:
                    self._round.references = 1
                    self._round.checks.append(Check("(references)", "pass", "none", None, None, "no_references",
                                                    self._references_error))
            if self._waiting is not None:
                return True  # its verdict has not come back yet
            if self._answer is not None:
                reference, verdict = self._answer
                self._answer = None
                self._round.checks.append(judge(reference, verdict, self.config.drift_fraction))
            i = len(self._round.checks)
            if i >= self._round.references:
                self._finish()
                return False
            reference = self._round_references[i]
            frame_id = next(self._frame_ids)
            self._waiting = (frame_id, reference)
            number = self._round.number
        # outside the lock: the verdict may come back (on the output thread) before submit returns
        try:
            frame = self._frame(reference, frame_id, number)
            self._submit(frame)
        except Exception as e:  # noqa: BLE001 - a frame that cannot go in is that reference's failure
            with self._lock:
                if self._waiting is not None and self._waiting[0] == frame_id:
                    self._waiting = None
                    self._round.checks.append(Check(reference.name, reference.expected, "none", None, None,
                                                    "not_judged", f"could not submit its frame: {e}"))
            self._wake.set()
        return True

    def _frame(self, reference: Reference, frame_id: int, round_number: int) -> Frame:
        """The reference as a camera sends it (PNG, lossless), read as ingest reads it."""
        now_wall, now_mono = self._clock.time(), self._clock.monotonic()
        parts = wire.encode_frame(self.camera, frame_id, reference.image, capture_ts=now_wall, encoding="png",
                                  part_id=f"selfcheck-{round_number}-{reference.name}")
        try:
            return wire.read_frame(parts, self._limits, now_wall, now_mono)
        except WireError as e:
            raise ValueError(f"{e.reason}: {e.detail}") from None

    def on_verdict(self, verdict: Verdict) -> None:
        """A verdict of the reserved camera (on the pipeline's output thread: only keeps it)."""
        with self._lock:
            if self._waiting is None or verdict.frame_id != self._waiting[0]:
                unexpected = True
            else:
                self._answer = (self._waiting[1], verdict)
                self._waiting = None
                unexpected = False
        if unexpected:
            self._log.warning("selfcheck_unexpected_verdict", camera=verdict.camera, frame_id=verdict.frame_id,
                              verdict=verdict.verdict)
            return
        self._wake.set()

    def _finish(self) -> None:
        """The running round is complete (lock held): metrics, log, `last`."""
        r, m = self._round, self._metrics
        assert r is not None
        r.finished = self._clock.time()
        self._round, self._round_references, self.last = None, [], r
        for check in r.failures():
            m.selfcheck_failures.labels(kind=check.failure).inc()
        for check in r.checks:
            if check.ratio is not None:
                m.selfcheck_score_ratio.labels(reference=check.reference).set(check.ratio)
        m.selfcheck_rounds.labels(result="pass" if r.ok else "fail").inc()
        m.selfcheck_failing.set(0 if r.ok else 1)
        m.selfcheck_last_timestamp.set(r.finished)
        if r.ok:
            m.selfcheck_last_ok_timestamp.set(r.finished)
            self._log.info("selfcheck_passed", round=r.number, references=len(r.checks),
                           seconds=round(r.finished - r.started, 3))
        else:
            self._log.error("selfcheck_failed", round=r.number, references=len(r.checks),
                            failed={c.reference: f"{c.failure}: {c.detail}" for c in r.failures()})

    # ------------------------------------------------------------------ what others read

    @property
    def failing(self) -> bool:
        """Whether the last finished round failed."""
        last = self.last
        return last is not None and not last.ok

    def state(self) -> dict[str, Any]:
        """For the live page and /readyz: the last round, the one running, when the next is due."""
        with self._lock:
            running = self._round.to_dict() if self._round is not None else None
            last = self.last.to_dict() if self.last is not None else None
            next_in = None if running is not None else self.schedule.seconds_until_due(self._clock.monotonic())
        return {"camera": self.camera, "interval_s": self.config.interval_s, "running": running, "last": last,
                "next_in_s": next_in}

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(5.0)

    def dead_threads(self) -> list[str]:
        if self._thread.ident is None or self._stop.is_set() or self._thread.is_alive():
            return []
        return [self._thread.name]

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before poll: a verdict that comes back meanwhile wakes the wait below
            try:
                running = self.poll()
            except Exception as e:  # noqa: BLE001 - the self-check must not die of one bad round
                self._log.error("selfcheck_poll_failed", error=repr(e))
                running = False
            wait = POLL_S if running else min(POLL_S, self.schedule.seconds_until_due(self._clock.monotonic()))
            self._wake.wait(wait)
