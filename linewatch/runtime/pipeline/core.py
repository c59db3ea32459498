"""The pipeline's bookkeeping, apart from its threads: every decision, none of the waiting.

`PipelineCore` decides, for every frame, which verdict it gets and when that verdict may
leave. It holds no thread, lock or socket and reads time only from the `Clock` it is given,
so a test drives it step by step on a fake clock. `linewatch.runtime.pipeline.runner.Pipeline` runs
it: one lock around every call, threads that wait for what the core says is due.

What it keeps:

* **Slots.** One per frame, from `register` to release. `answer` is the single place a frame
  gets its verdict, and the first answer wins: a later one (a detector result after the
  frame timed out, say) is discarded and counted as late. Exactly one verdict per frame.
* **Release order.** Verdicts leave in receive order per camera (a reorder buffer per camera:
  a verdict waits until every earlier frame of its camera is answered), numbered 0, 1, 2, ...
  in release order with a random id of this run (`run_id`, `seq`): the verdict id
  "<run_id>-<seq>" is unique across restarts, and a subscriber that sees a gap in `seq` knows
  it lost that many verdicts. The daemon's own frames (`private_cameras`: the self-check's
  reserved camera) are numbered apart, "<run_id>.<camera>-<seq>": they are never published, and
  the published sequence has no gap where they went.
* **Deadlines, from capture.** `deadline_ms` is the capture->verdict budget, the time until the
  part reaches the reject gate. A frame's deadline on this host's monotonic clock is
  `received_mono + deadline - age`, with `age = received_ts - capture_ts` (how old it was when
  it arrived, by the two wall clocks). A frame already past its deadline on arrival is
  answered `timeout` (`expired_on_arrival`) at once, without work; a capture time more than
  `clock_skew_tolerance_ms` in the future is answered `error` (`capture_in_future`): the
  sender's clock is wrong, and no deadline can be trusted. A capture time in the future
  within the tolerance counts as age 0. `deadline_from: receive` ignores capture times (for
  lines whose camera PCs have no synchronised clock): the budget then starts at receive.
* **Waiting frames, fairly, before any work.** Frames wait per camera for a batch, not yet
  decoded (the pipeline's first stage decodes the frames a batch admits). A batch takes frames
  round-robin across the cameras that have some waiting (oldest first), so a camera sending
  six times as fast as another cannot take the other's place: each camera gets its max-min
  fair share of the capacity.
* **The stage graph as one server, measured.** Its service time per batch is measured for
  every batch that leaves with results: from entering the graph (or from the previous batch's
  results, if later) to its results, fitted as a + b x batch size on the recent batches
  (`StageCost`). Decode is a stage, so decoding and the CPU it takes from the detector are in
  it; on a GPU, where the stages overlap, the time between results is the slowest stage's.
  The capacity is a full batch over its service time. Each batch entering the graph is
  expected out when the graph is free (the batch ahead out, as expected) plus its service
  time, plus a margin: the running 98th percentile of how late batches left against that
  expectation. A batch leaving late (or early) moves the expectations of those behind it.
* **Fair shares on arrival, sized from the measured capacity.** Each camera's arrival rate is
  counted (over about RATE_WINDOW_S), and the capacity is shared max-min among the cameras'
  rates (`fair_level`: a camera sending less than the level gets all it sends, the others
  the level each). A token bucket per camera fills at that level (`FairShares`); a frame
  arriving without a token is answered `shed` (`over_share`) at once, before decode. The
  frames a flooding camera keeps are spread evenly over time, like the other cameras'.
* **Queue time on arrival.** A frame arriving for camera c,
  which then has n >= 2 frames waiting, would be judged after about sum over cameras of
  min(waiting, n) frames (round robin), in full batches; when those batches, starting when
  the graph is free, end after its deadline, camera c waits for more than its share can
  judge in time: one of its
  own frames (its oldest, or the arriving one with `shed_policy: newest`) is answered `shed`
  (`over_share`) at once, before decode. A flooding camera pays for its own excess; the others
  keep their share. When more than `max_pending_frames` wait (a memory bound), the camera with
  the most waiting loses one the same way (`pending_full`).
* **Batches inside the stage graph.** At most `max_batches_inside` (the pipeline sets it: one
  per stage plus one where the stages overlap, on a GPU; 2 on a CPU, whose stages share the
  cores: one batch decoding beside one in the detector, and deeper only adds latency).
  A batch is due when it is full, when its oldest frame has waited `max_delay_ms`, or at once
  while draining. When a batch enters, frames past their deadline get `timeout` and frames
  that cannot have a result before it is expected out are answered `shed`
  (`deadline_unreachable`) before any work (decode included) is spent on them; until a
  batch's service time has been measured, that expectation is modelled from the stage times.
* **The processor in service.** Each frame is judged by the processor (detector) in service
  when it was registered; `switch_processor` puts another in service (a recipe changeover)
  and says where the cut fell. Ingest registers each camera's frames in the order they came
  off the socket, so per camera the frames before the cut are exactly the earlier ones. A
  batch never mixes processors: it takes the frames of one (the longest-waiting frame's).
  A slot lets go of its processor when its verdict is released, so an old processor lives
  only as long as frames it judges (and the batches holding it) do.
"""

from __future__ import annotations

import heapq
import itertools
import math
import secrets
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from linewatch.config import BatchConfig, PipelineConfig
from linewatch.runtime.pipeline.clock import Clock
from linewatch.runtime.ops.metrics import Metrics
from linewatch.wire import VERDICT_VALUES, Verdict

SHUTDOWN_REASON = "shutdown"  # timeout: unanswered when the daemon stopped (drain ran out of time)
DEADLINE_REASON = "deadline_exceeded"  # timeout: no result before the deadline
EXPIRED_ON_ARRIVAL = "expired_on_arrival"  # timeout: past its deadline when it arrived
FUTURE_CAPTURE = "capture_in_future"  # error: capture time beyond the clock-skew tolerance
UNREACHABLE_REASON = "deadline_unreachable"  # shed before work: the result could not come in time
OVER_SHARE = "over_share"  # shed on arrival: its camera waits for more than its share can judge in time
LATE_QUANTILE = 0.98  # expected leaving times are counted high by this quantile of how late batches left
LATENESS_STEP = 0.05  # its estimate moves by at most this share of a full batch's service time per batch
RATE_WINDOW_S = 2.0  # cameras' arrival rates are counted over about this long
MAX_TRACKED_CAMERAS = 1024  # cameras whose rates are kept (beyond, the quiet ones are forgotten)
PENDING_FULL = "pending_full"  # shed: too many frames waiting for a batch
SHUTTING_DOWN = "shutting_down"  # shed: arrived while the daemon was stopping


@dataclass(eq=False)
class Slot:
    """One frame's place in the pipeline, from register to release."""

    seq: int
    camera: str
    frame_id: int
    capture_ts: float
    received_mono: float
    deadline: float
    part_id: str | None = None
    frame: Any = None  # what the first stage takes (a Frame, not decoded yet), held while it waits
    image: np.ndarray | None = None  # the decoded image, held when an overlay or a sink needs it
    enqueued: float = 0.0  # monotonic time it started waiting for a batch
    entered: float = 0.0  # monotonic time its batch entered the stage graph
    answered: bool = False  # set once, by the first answer
    verdict: Verdict | None = None  # held only until released (the deadline heap outlives it)
    processor: Any = None  # what judges it: the one in service at register; held only until released


class StageCost:
    """One stage's time for a batch of n frames, a + b * n, fitted (least squares) on its recent
    batches: each batch's weight decays by `decay` per later batch (about 1 / (1 - decay)
    batches remembered). A per-frame time from small batches would count the per-batch
    overhead once per frame and under-read the capacity (at light load every batch is small);
    the fit separates the two. While every remembered batch had the same size, the time per
    frame is proportional (the overhead is counted per frame, the cautious side)."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self._w = self._n = self._t = self._nn = self._nt = 0.0  # decayed sums: 1, n, t, n^2, n t

    def add(self, frames: int, seconds: float) -> None:
        d, n = self.decay, float(frames)
        self._w, self._n, self._t = d * self._w + 1.0, d * self._n + n, d * self._t + seconds
        self._nn, self._nt = d * self._nn + n * n, d * self._nt + n * seconds

    @property
    def measured(self) -> bool:
        return self._w > 0

    def seconds(self, frames: int) -> float:
        """The expected time for a batch of `frames` frames (0.0 before any was measured)."""
        if not self._w:
            return 0.0
        mean_n, mean_t = self._n / self._w, self._t / self._w
        var_n = self._nn / self._w - mean_n * mean_n
        if var_n > 1e-6 * mean_n * mean_n:
            slope = (self._nt / self._w - mean_n * mean_t) / var_n
            intercept = mean_t - slope * mean_n
            if slope >= 0 and intercept >= 0:
                return intercept + slope * frames
        return mean_t / mean_n * frames


class RunningQuantile:
    """A running estimate of the q-quantile of a stream (stochastic approximation): each value
    above the estimate moves it up by step x q, each other value down by step x (1 - q), so it
    settles where a share 1 - q of the values lie above it. `step` is given per update (the
    scale of the values may change)."""

    def __init__(self, q: float) -> None:
        self.q = q
        self.value = 0.0

    def add(self, x: float, step: float) -> None:
        self.value += step * (self.q if x > self.value else self.q - 1.0)


def fair_level(rates: list[float], capacity: float) -> float:
    """The max-min fair level of `capacity` among demands `rates`: the L with
    sum(min(rate, L)) == capacity (each demand below L is met, the others get L each);
    infinity when every demand fits."""
    remaining, ordered = capacity, sorted(rates)
    for i, rate in enumerate(ordered):
        level = remaining / (len(ordered) - i)
        if rate > level:
            return level
        remaining -= rate
    return math.inf


class FairShares:
    """Each camera's arrival rate (a count decayed over `window_s`, over `window_s`) and a token
    bucket that fills at the max-min fair level of the capacity among the cameras' rates, up to
    `burst` tokens. A camera sending below the level always finds a token; one sending above
    it gets a token for the level's rate of its frames, spread evenly over time."""

    def __init__(self, window_s: float, burst: float) -> None:
        self.window_s = window_s
        self.burst = burst
        self._cameras: dict[str, list[float]] = {}  # camera -> [decayed count, tokens, last arrival]

    def rate(self, camera: str, now: float) -> float:
        state = self._cameras.get(camera)
        return 0.0 if state is None else state[0] * math.exp(-(now - state[2]) / self.window_s) / self.window_s

    def admit(self, camera: str, now: float, capacity: float) -> bool:
        """Count a frame of `camera` arriving at `now`; whether it is within the camera's share."""
        state = self._cameras.get(camera)
        if state is None:
            if len(self._cameras) >= MAX_TRACKED_CAMERAS:  # many ids (no allow-list): forget the quiet ones
                self._cameras = {c: s for c, s in self._cameras.items() if self.rate(c, now) * self.window_s > 0.5}
            state = self._cameras[camera] = [0.0, self.burst, now]
        level = fair_level([self.rate(c, now) for c in self._cameras], capacity)
        elapsed = now - state[2]
        state[0] = state[0] * math.exp(-elapsed / self.window_s) + 1.0
        state[1] = self.burst if math.isinf(level) else min(self.burst, state[1] + level * elapsed)
        state[2] = now
        if state[1] >= 1.0:
            state[1] -= 1.0
            return True
        return False


@dataclass(frozen=True)
class Cut:
    """Where a processor switch fell: the frames registered before it stay with the old one."""

    frames_before: int  # frames registered before the switch, over the run and every camera
    # per camera, the id of the last frame registered before the switch (cameras beyond the
    # metrics' camera-label limit are left out, as they share a label there)
    last_frame_ids: dict[str, int]


class PipelineCore:
    """The bookkeeping of `Pipeline`; not thread-safe (the caller holds one lock around it).

    Every verdict it decides ends, in release order, in `take_released()`.
    """

    def __init__(self, batch: BatchConfig, pipeline: PipelineConfig, n_stages: int, clock: Clock,
                 metrics: Metrics | None = None, run_id: str | None = None, processor: Any = None,
                 max_batches_inside: int | None = None, private_cameras: frozenset[str] = frozenset()) -> None:
        """`processor`: the processor in service (opaque here; each slot carries the one that
        judges it). `max_batches_inside`: batches inside the stage graph at once (default:
        pipeline.max_batches_inside, else one per stage plus one). `private_cameras`: cameras
        whose verdicts are the daemon's own (never published): numbered apart."""
        if n_stages < 1:
            raise ValueError("the pipeline needs at least one stage")
        self.clock = clock
        self.processor = processor
        # Verdict ids "<run_id>-<seq>": unique across restarts of this daemon and of senders,
        # whose frame ids may start again at 0.
        self.run_id = run_id if run_id is not None else secrets.token_hex(6)
        self._verdict_seq = itertools.count()
        self._private_seqs = {camera: itertools.count() for camera in private_cameras}
        self.metrics = metrics if metrics is not None else Metrics()
        self.max_batch = batch.max_batch
        self.max_delay_s = batch.max_delay_ms / 1000.0
        self.max_pending = pipeline.max_pending_frames
        self.shed_policy = pipeline.shed_policy
        self.deadline_s = pipeline.deadline_ms / 1000.0
        self.deadline_from = pipeline.deadline_from
        self.skew_tolerance_s = pipeline.clock_skew_tolerance_ms / 1000.0
        self.max_batches_inside = max_batches_inside or pipeline.max_batches_inside or n_stages + 1
        self.stage_time_s = [0.0] * n_stages  # moving average per batch
        self.stage_deviation_s = [0.0] * n_stages  # moving mean absolute deviation from it
        # The stage graph seen as one server: its service time per batch (from entering the
        # graph, or the previous batch's results if later, to this batch's results), fitted as
        # a + b * frames; when the latest batch inside is expected out; how far off that was.
        self.service = StageCost()
        self._expected_out: deque[float] = deque()  # per batch inside, oldest first: when expected out
        self._last_done = float("-inf")  # when the last batch left with results
        self._shares = FairShares(RATE_WINDOW_S, burst=self.max_batch)  # per camera rate and token bucket
        # how late batches leave against what was expected: its 98th percentile is the margin
        self.lateness = RunningQuantile(LATE_QUANTILE)

        self._seq = itertools.count()
        self._cameras: dict[str, deque[Slot]] = {}  # reorder buffers: unreleased slots, receive order
        self._deadlines: list[tuple[float, int, Slot]] = []  # heap
        self._pending: dict[str, deque[Slot]] = {}  # waiting for a batch, per camera, oldest first
        self._pending_count = 0
        self._out: deque[Verdict] = deque()
        self.batches_inside = 0
        self.accepting = True  # once False: new frames are shed, waiting ones go out at once (drain)
        self.inflight = 0  # registered, not yet released

        # cumulative statistics (periodic log summary)
        self.received = 0
        self.counts = {v: 0 for v in VERDICT_VALUES}
        self.late = 0
        self.latencies: deque[float] = deque(maxlen=100_000)  # received -> release, seconds
        self.last_frame_ids: dict[str, int] = {}  # per labelled camera: the last frame registered

    # ================================================================== frames in

    def register(self, camera: str, frame_id: int, capture_ts: float, received_ts: float, received_mono: float,
                 part_id: str | None = None) -> Slot:
        """A frame to judge. Returns its slot, already answered when it cannot be judged at all
        (capture time in the future, past its deadline on arrival)."""
        age = 0.0
        future = False
        if self.deadline_from == "capture":
            age = received_ts - capture_ts
            future = -age > self.skew_tolerance_s
            age = max(0.0, age)
        slot = self._new_slot(camera, frame_id, capture_ts, received_mono, received_mono + self.deadline_s - age, part_id)
        if future:
            self.answer_simple(slot, "error", FUTURE_CAPTURE)
        elif age >= self.deadline_s:
            self.answer_simple(slot, "timeout", EXPIRED_ON_ARRIVAL)
        return slot

    def register_error(self, camera: str, frame_id: int, reason: str, capture_ts: float, received_mono: float,
                       part_id: str | None = None) -> None:
        """A frame that could not be decoded: answered `error` with `reason`, in its place."""
        slot = self._new_slot(camera, frame_id, capture_ts, received_mono, received_mono, part_id)
        self.answer_simple(slot, "error", reason)

    def _new_slot(self, camera: str, frame_id: int, capture_ts: float, received_mono: float, deadline: float,
                  part_id: str | None) -> Slot:
        slot = Slot(next(self._seq), camera, frame_id, capture_ts, received_mono, deadline, part_id,
                    processor=self.processor)
        buf = self._cameras.get(camera)
        if buf is None:
            buf = self._cameras[camera] = deque()
        # Ingest decodes on several threads, so frames can be registered slightly out of
        # receive order: insert by received_mono (scanning back from the tail, where it almost
        # always belongs). A frame older than one already released cannot go before it any
        # more; it then goes first among the unreleased ones.
        i = len(buf)
        while i > 0 and buf[i - 1].received_mono > received_mono:
            i -= 1
        buf.insert(i, slot)
        self.inflight += 1
        self.received += 1
        heapq.heappush(self._deadlines, (deadline, slot.seq, slot))
        label = self.metrics.camera_label(camera)
        self.metrics.frames_received.labels(camera=label).inc()
        if label == camera and frame_id >= 0:  # bounded like the labels: a sender cycling ids cannot grow it
            self.last_frame_ids[camera] = frame_id
        return slot

    def switch_processor(self, processor: Any) -> Cut:
        """Put `processor` in service: frames registered from now on are judged by it, those
        registered before by the one they were registered under. Returns where the cut fell."""
        cut = Cut(frames_before=self.received, last_frame_ids=dict(self.last_frame_ids))
        self.processor = processor
        return cut

    def enqueue(self, slot: Slot, frame: Any) -> None:
        """Let a registered, unanswered frame wait for a batch; `frame` is what the first stage
        takes (held until then). Sheds a frame of this camera when it waits for more than its
        share can judge in time, or of the camera with the most waiting when too many wait."""
        if slot.answered:
            return
        if not self.accepting:
            self.answer_simple(slot, "shed", SHUTTING_DOWN)
            return
        slot.enqueued = now = self.clock.monotonic()
        capacity = self.capacity_fps()
        if not self._shares.admit(slot.camera, now, capacity if capacity is not None else math.inf):
            self.answer_simple(slot, "shed", OVER_SHARE)
            return
        slot.frame = frame
        queue = self._pending.setdefault(slot.camera, deque())
        queue.append(slot)
        self._pending_count += 1
        while queue and self._over_share(queue):
            self._shed_one(slot.camera, OVER_SHARE)
        if self._pending_count > self.max_pending:
            # the camera with the most frames waiting gives one up (ties: the longest waiting)
            camera = max(self._pending, key=lambda c: (len(self._pending[c]), -self._pending[c][0].enqueued))
            self._shed_one(camera, PENDING_FULL)

    def _over_share(self, queue: deque[Slot]) -> bool:
        """Whether the newest frame of this camera's `queue` cannot be judged before its deadline
        when served in round robin with the other cameras' waiting frames, in full batches at
        the measured service time. False before a batch has been measured, and for a camera
        with one frame waiting."""
        n = len(queue)
        if not self.service.measured or n < 2:  # a camera with one frame waiting is within any share
            return False
        before = sum(min(len(q), n) for q in self._pending.values()) - 1  # served before it (round robin)
        batches = before // self.max_batch + 1  # its own batch included
        done = self._graph_free_at() + batches * self.service.seconds(self.max_batch) + self.margin_s
        return done > queue[-1].deadline

    def _shed_one(self, camera: str, reason: str) -> None:
        """Answer one of `camera`'s waiting frames `shed`: its oldest, or its newest with
        shed_policy newest."""
        queue = self._pending[camera]
        victim = queue.pop() if self.shed_policy == "newest" else queue.popleft()
        self._forget_pending(camera)
        self._pending_count -= 1
        self.answer_simple(victim, "shed", reason)

    @property
    def pending(self) -> int:
        """Frames waiting for a batch."""
        return self._pending_count

    # ================================================================== batches

    def batch_due_at(self) -> float | None:
        """Monotonic time at which `take_batch` will return a batch, if nothing else changes;
        None when it waits for something else (a frame, a batch leaving the stage graph)."""
        if not self._pending_count or self.batches_inside >= self.max_batches_inside:
            return None
        if self._pending_count >= self.max_batch or not self.accepting:
            return self.clock.monotonic()
        return min(q[0].enqueued for q in self._pending.values()) + self.max_delay_s

    def take_batch(self) -> list[Slot] | None:
        """The next batch, if one is due now: the frames to hand to stage 0 (in `slot.frame`).
        Frames past their deadline or unable to make it are answered here and left out, and
        their places filled from the frames still waiting; the list is empty when none was
        left (nothing entered the stage graph). None: no batch is due."""
        due = self.batch_due_at()
        if due is None or due > self.clock.monotonic():
            return None
        now = self.clock.monotonic()
        expected = self.expected_latency_s(min(self.max_batch, self._pending_count))
        processor = self._longest_waiting_processor()
        live: list[Slot] = []
        while len(live) < self.max_batch and self._pending_count:
            picked = self._pick(self.max_batch - len(live), processor)
            if not picked:  # the frames still waiting are another processor's: the next batch's
                break
            for slot in picked:
                # frames that cannot be judged in time are answered here, and their places
                # go to the next waiting frames
                if slot.deadline <= now:
                    self.answer_simple(slot, "timeout", DEADLINE_REASON)
                elif slot.deadline - now < expected:
                    self.answer_simple(slot, "shed", UNREACHABLE_REASON)
                else:
                    live.append(slot)
        if live:
            done = (self._graph_free_at() + self.service.seconds(len(live)) if self.service.measured
                    else now + self.expected_latency_s(len(live)))
            for slot in live:
                slot.entered = now
            self._expected_out.append(done)
            self.batches_inside += 1
            self.metrics.batch_size.observe(len(live))
        return live

    def _longest_waiting_processor(self) -> Any:
        """The processor of the frame that has waited longest for a batch (answered frames,
        which take_batch drops, aside): the next batch is that processor's."""
        oldest = min((q[0] for q in self._pending.values() if not q[0].answered), key=lambda s: s.enqueued,
                     default=None)
        return oldest.processor if oldest is not None else None

    def _pick(self, n: int, processor: Any) -> list[Slot]:
        """Take up to n waiting frames of `processor` (and answered ones, which take_batch
        drops): round robin across cameras, longest-waiting camera first. A camera whose next
        frame is another processor's gives none: its frames wait for that processor's batch."""
        picked: list[Slot] = []
        cameras = sorted(self._pending, key=lambda c: self._pending[c][0].enqueued)
        while len(picked) < n and cameras:
            for camera in list(cameras):
                queue = self._pending[camera]
                if not queue[0].answered and queue[0].processor is not processor:
                    cameras.remove(camera)
                    continue
                picked.append(queue.popleft())
                if not queue:
                    self._forget_pending(camera)
                    cameras.remove(camera)
                if len(picked) == n:
                    break
        self._pending_count -= len(picked)
        return picked

    def _forget_pending(self, camera: str) -> None:
        if not self._pending[camera]:
            del self._pending[camera]

    @property
    def margin_s(self) -> float:
        """How much later than expected a batch may leave: the running 98th percentile of how
        late batches left (>= 0), so about 2 % of batches leave after their margin."""
        return max(0.0, self.lateness.value)

    def _graph_free_at(self) -> float:
        """When the stage graph can start on another batch: now, or when the latest batch
        inside is expected out (the graph seen as one server)."""
        now = self.clock.monotonic()
        return max(now, self._expected_out[-1]) if self._expected_out else now

    def _stage_bounds(self) -> list[float]:
        """Each stage's time per batch, counted high: moving average + 2 mean deviations."""
        return [t + 2.0 * d for t, d in zip(self.stage_time_s, self.stage_deviation_s)]

    def expected_latency_s(self, frames: int | None = None) -> float:
        """Time from now until a batch of `frames` frames (default: a full one) entering the
        stage graph now would have its results, counted high: it starts when the graph is
        free (the batches inside out, as expected), then takes the measured service time,
        plus twice the moving mean error of those expectations. Before any batch was
        measured, modelled from the stage times: the batches inside wait for the slowest
        stage, then it passes every stage."""
        now = self.clock.monotonic()
        if self.service.measured:
            n = self.max_batch if frames is None else max(1, frames)
            return self._graph_free_at() - now + self.service.seconds(n) + self.margin_s
        bounds = self._stage_bounds()
        return self.batches_inside * max(bounds) + sum(bounds)

    def capacity_fps(self) -> float | None:
        """Frames per second the stage graph judges at most: a full batch over its measured
        service time for a full batch. None before a batch has been measured."""
        seconds = self.service.seconds(self.max_batch)
        return self.max_batch / seconds if seconds > 0 else None

    def stage_finished(self, stage: int, seconds: float, frames: int = 1) -> None:
        """Record one stage's time for one batch (the model of `expected_latency_s` until a
        batch's service time has been measured; stage metrics)."""
        old = self.stage_time_s[stage]
        if old == 0.0:
            self.stage_time_s[stage] = seconds
            return
        self.stage_deviation_s[stage] = 0.8 * self.stage_deviation_s[stage] + 0.2 * abs(seconds - old)
        self.stage_time_s[stage] = 0.8 * old + 0.2 * seconds

    def batch_left(self, judged: list[Slot] | None = None) -> None:
        """A batch that `take_batch` returned has left the stage graph (finished, failed or
        abandoned; batches leave in the order they entered). `judged`: its frames, when it left
        with their results: its service time (from entering, or from the previous batch's
        results if later, to now) is measured, and how far its expected leaving time was off;
        the batches still inside are expected that much later (or earlier) too."""
        self.batches_inside -= 1
        expected = self._expected_out.popleft() if self._expected_out else None
        if not judged or expected is None:
            return
        now = self.clock.monotonic()
        self.service.add(len(judged), now - max(judged[0].entered, self._last_done))
        self._last_done = now
        error = now - expected
        self.lateness.add(error, LATENESS_STEP * self.service.seconds(self.max_batch))
        for i in range(len(self._expected_out)):
            self._expected_out[i] += error

    def deliver(self, slot: Slot, verdict: Verdict) -> None:
        """A detector result for `slot`; counted as late when the frame was already answered."""
        if not self.answer(slot, verdict):
            self.late += 1
            self.metrics.late_results.inc()

    # ================================================================== answers

    @staticmethod
    def _simple(slot: Slot, value: str, reason: str) -> Verdict:
        return Verdict(camera=slot.camera, frame_id=slot.frame_id, verdict=value,
                       capture_ts=slot.capture_ts, part_id=slot.part_id, reason=reason)

    def answer(self, slot: Slot, verdict: Verdict) -> bool:
        """The single place a frame gets its verdict: the first answer wins. Returns whether it won."""
        if slot.answered:
            return False
        slot.answered = True
        slot.verdict = verdict
        slot.frame = slot.image = None
        self._release(slot.camera)
        return True

    def answer_simple(self, slot: Slot, value: str, reason: str) -> bool:
        """Answer with a verdict that carries only a value and a reason (error/timeout/shed)."""
        return self.answer(slot, self._simple(slot, value, reason))

    def _release(self, camera: str) -> None:
        """Hand this camera's answered verdicts on, oldest first, up to the first unanswered frame."""
        buf = self._cameras.get(camera)
        if buf is None:
            return
        now_mono, now_wall = self.clock.monotonic(), self.clock.time()
        m = self.metrics
        label = m.camera_label(camera)
        while buf and buf[0].answered:
            slot = buf.popleft()
            v = slot.verdict
            assert v is not None
            slot.verdict = None  # a heatmap must not live on in the deadline heap
            slot.processor = None  # nor an old processor (a bank on the GPU) after a switch
            v.latency_s = now_wall - slot.capture_ts
            private = self._private_seqs.get(camera)
            if private is None:
                v.run_id, v.seq = self.run_id, next(self._verdict_seq)
            else:
                v.run_id, v.seq = f"{self.run_id}.{camera}", next(private)
            self._out.append(v)
            self.inflight -= 1
            self.counts[v.verdict] += 1
            self.latencies.append(now_mono - slot.received_mono)
            m.verdicts.labels(camera=label, verdict=v.verdict).inc()
            m.capture_to_verdict.labels(camera=label).observe(max(0.0, v.latency_s))
            if v.verdict in ("pass", "fail"):
                m.observe_score(label, v.verdict, v.score, v.threshold)
            elif v.verdict == "timeout":
                m.frames_timed_out.labels(camera=label).inc()
            elif v.verdict == "shed":
                m.frames_shed.labels(camera=label, reason=v.reason or "").inc()
            elif v.verdict == "error":
                m.frame_errors.labels(reason=v.reason or "").inc()
        if not buf:
            del self._cameras[camera]

    def take_released(self) -> list[Verdict]:
        """Verdicts ready to publish, in release order; clears them."""
        out = list(self._out)
        self._out.clear()
        return out

    @property
    def has_released(self) -> bool:
        return bool(self._out)

    @property
    def released_waiting(self) -> int:
        """Verdicts released and not yet taken by the output thread."""
        return len(self._out)

    # ================================================================== deadlines

    def next_deadline(self) -> float | None:
        """The earliest deadline of a frame that may still be unanswered."""
        while self._deadlines and self._deadlines[0][2].answered:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def expire(self) -> int:
        """Answer `timeout` every frame whose deadline has passed. Returns how many."""
        now = self.clock.monotonic()
        n = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            slot = heapq.heappop(self._deadlines)[2]
            if self.answer_simple(slot, "timeout", DEADLINE_REASON):
                n += 1
        return n

    # ================================================================== shutdown

    def stop_accepting(self) -> None:
        """Frames registered from now on are answered `shed` (shutting_down); waiting ones go
        out at once instead of waiting for company."""
        self.accepting = False

    def answer_all_unanswered(self, value: str = "timeout", reason: str = SHUTDOWN_REASON) -> None:
        """Answer every frame that has no verdict yet (the pipeline stops)."""
        for camera in list(self._pending):
            for slot in self._pending.pop(camera):
                self.answer_simple(slot, value, reason)
        self._pending_count = 0
        for buf in list(self._cameras.values()):
            for slot in list(buf):
                if not slot.answered:
                    self.answer_simple(slot, value, reason)

    def idle(self) -> bool:
        """Nothing in flight and nothing waiting to be published."""
        return not self.inflight and not self._out

    def stats(self) -> dict[str, Any]:
        """Cumulative counts: received, verdicts by value, late results, in flight."""
        return {"received": self.received, "verdicts": dict(self.counts), "late_results": self.late,
                "inflight": self.inflight}
