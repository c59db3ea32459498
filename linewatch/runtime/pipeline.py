"""The stage graph run as a pipeline, and the one-verdict-per-frame bookkeeping around it.

    submit(frame) -> Batcher -> q0 -> [stage 0 thread] -> q1 -> [stage 1 thread] -> ... -> results
                        +-> shed                                                             |
    submit_error(...) -----------------------------> answer(slot, verdict) <-----------------+
    deadline watcher (timeout) --------------------+        |
                                       per-camera reorder buffer (release in arrival order)
                                                            |
                                                output thread -> on_verdict(verdict)

* One thread per stage and bounded queues (`stage_queue_size`) between stages: while batch
  n is in stage 2, batch n+1 is in stage 1. A full queue blocks the stage before it, and in
  the end the batcher, whose pending queue then sheds frames with an explicit `shed` verdict.
* Exactly one verdict per frame: every path (result, timeout, shed, error, shutdown) goes
  through `_answer_locked`, which sets the frame's verdict only if it has none yet; the first
  one wins and a later detector result is discarded and counted as late.
* Deadline clock: `deadline = received_mono + deadline_ms`. The frame's capture_ts comes from
  the sender's wall clock, which is not synchronised with ours (skew of seconds is common on
  a line PC without NTP, and wall clocks step); a deadline on it could fire at once or never.
  `received_mono` is this host's monotonic clock, so the deadline is the budget the daemon
  itself controls. Capture->verdict latency (crossing both clocks) is still reported, in
  `Verdict.latency_s` and `linewatch_capture_to_verdict_seconds`, for end-to-end monitoring.
* Order: verdicts leave in arrival order per camera, i.e. by `received_mono` (ingest's
  decode threads may call submit slightly out of that order; the reorder buffer restores
  it). A verdict waits in its camera's reorder buffer until every earlier frame of that
  camera is answered; deadlines bound that wait, and since deadlines follow the same clock,
  an earlier frame never times out later than a frame behind it.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import structlog

from linewatch.config import BatchConfig, PipelineConfig
from linewatch.detector.result import InspectionResult
from linewatch.runtime.batcher import Batcher
from linewatch.runtime.metrics import Metrics
from linewatch.runtime.types import VERDICT_VALUES, Frame, Verdict


class Processor(Protocol):
    """What the runtime runs: a detector split into stages.

    stages[0] receives a list of RGB uint8 (H, W, 3) images (one batch); each stage's return
    value is the next stage's input; the last stage returns list[InspectionResult], one per
    input image, same order. A stage may raise: every frame of that batch is then answered
    `error` with reason "stage_failed:<name>" and the pipeline keeps going.
    An optional `bank_images: int` attribute is shown in `linewatch_bank_info`.
    """

    backend: str
    bank_id: str
    stages: list[tuple[str, Callable[[Any], Any]]]
    # Optional: check_image(image, name) raising ValueError for a frame it cannot judge; such a
    # frame gets `error` (reason "bad_image") on its own.


SHUTDOWN_REASON = "shutdown"  # unanswered when the daemon stopped (drain ran out of time)
DEADLINE_REASON = "deadline_exceeded"
UNREACHABLE_REASON = "deadline_unreachable"  # shed before work: the result could not come in time


@dataclass(eq=False)
class _Slot:
    """One frame's place in the pipeline, from submit to release."""

    seq: int
    camera: str
    frame_id: int
    capture_ts: float
    received_mono: float
    deadline: float
    part_id: str | None = None
    image: np.ndarray | None = None  # dropped once handed to stage 0
    answered: bool = False  # set once, by the first answer
    verdict: Verdict | None = None  # held only until released (the deadline heap outlives it)


@dataclass(eq=False)
class _Batch:
    slots: list[_Slot]
    data: Any  # input of the next stage
    timings: dict[str, float] = field(default_factory=dict)  # seconds per finished stage


class _Stop(Exception):
    """The pipeline is stopping; the batch in hand is abandoned (its frames get answered)."""


def _cuda_torch() -> Any | None:
    """torch, when the detector has imported it and CUDA is available; else None.

    Looked up in sys.modules rather than imported: a processor that never imported torch puts
    nothing on a GPU, and importing torch here would cost seconds on CPU-only hosts.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch
    return None


def _record_stream(obj: Any, torch: Any, stream: Any) -> None:
    """Tell the CUDA caching allocator that tensors in `obj` are used on `stream`.

    Tensors made on another stage's stream and freed while this stage's kernels still read
    them could otherwise be handed out again to the producer's stream too early.
    """
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _record_stream(x, torch, stream)
    elif isinstance(obj, dict):
        for x in obj.values():
            _record_stream(x, torch, stream)


class Pipeline:
    """Frames in, exactly one verdict per frame out (in arrival order per camera).

    on_verdict(verdict) is called on a single output thread, in order; it should not block
    for long (a slow publisher delays all verdicts, but loses none).
    """

    def __init__(
        self,
        processor: Processor,
        batch: BatchConfig,
        pipeline: PipelineConfig,
        on_verdict: Callable[[Verdict], None],
        metrics: Metrics | None = None,
        log: Any = None,
        stall_s: float | None = None,
        overlay: Callable[[np.ndarray, InspectionResult], bytes] | None = None,
    ) -> None:
        """`overlay`, when given, renders the JPEG attached to each pass/fail verdict from the
        frame's image and its result; the frame's image is then held until its result."""
        if not processor.stages:
            raise ValueError("the processor has no stages")
        self.processor = processor
        self.metrics = metrics if metrics is not None else Metrics()
        self.log = log if log is not None else structlog.get_logger("linewatch.pipeline")
        self._on_verdict = on_verdict
        self._overlay = overlay
        # Moving average of each stage's time per batch. Under overload, a frame that would miss
        # its deadline anyway is shed before any work is spent on it; otherwise the stages stay
        # busy with frames that time out in their queues and throughput collapses.
        self._stage_time_s = [0.0] * len(processor.stages)
        self._stages = list(processor.stages)
        self._deadline_s = pipeline.deadline_ms / 1000.0
        # A stage call or a publish taking this long means the pipeline is stuck (watchdog).
        self.stall_s = stall_s if stall_s is not None else max(10.0, 5 * self._deadline_s)

        self._lock = threading.Lock()
        self._deadline_cond = threading.Condition(self._lock)  # new earliest deadline / stop
        self._out_cond = threading.Condition(self._lock)  # verdicts to publish / stop
        self._idle_cond = threading.Condition(self._lock)  # something got published
        self._seq = itertools.count()
        self._cameras: dict[str, deque[_Slot]] = {}  # reorder buffers: unreleased slots in arrival order
        self._deadlines: list[tuple[float, int, _Slot]] = []  # heap
        self._out: deque[Verdict] = deque()
        self._publishing_since: float | None = None
        self._inflight = 0  # submitted, not yet handed to the output thread
        self._accepting = True
        self._stop = threading.Event()
        self._started = False
        self._stopped = False

        # Statistics for the periodic log summary (cumulative, under _lock).
        self._received = 0
        self._counts = {v: 0 for v in VERDICT_VALUES}
        self._late = 0
        self._latencies: deque[float] = deque(maxlen=100_000)  # received -> release, seconds

        self._queues: list[queue.Queue[_Batch]] = [queue.Queue(pipeline.stage_queue_size) for _ in self._stages]
        self._busy_since: list[float | None] = [None] * len(self._stages)
        # At most one batch per stage plus one waiting is inside the stage graph: enough to keep
        # every stage busy, and no deeper, so a batch's latency stays near the sum of the stage
        # times. Further frames wait in the batcher, where hopeless ones are shed cheaply.
        self._batch_permits = threading.BoundedSemaphore(len(self._stages) + 1)
        self._batches_inside = 0  # batches holding a permit (under _lock)
        self._fail_log: dict[str, tuple[float, int]] = {}  # stage -> (last logged, suppressed)
        self._batcher: Batcher[_Slot] = Batcher(
            batch.max_batch, batch.max_delay_ms, pipeline.max_pending_frames, pipeline.shed_policy,
            sink=self._feed, on_shed=self._shed, name="lw-batcher",
        )
        self._threads: list[threading.Thread] = [self._batcher.thread]
        for i, (name, _) in enumerate(self._stages):
            self._threads.append(threading.Thread(target=self._stage_loop, args=(i,), name=f"lw-stage-{name}", daemon=True))
        self._threads.append(threading.Thread(target=self._deadline_loop, name="lw-deadline", daemon=True))
        self._threads.append(threading.Thread(target=self._output_loop, name="lw-output", daemon=True))

        m = self.metrics
        m.track_queue("pending", self._batcher.depth)
        for (name, _), q in zip(self._stages, self._queues):
            m.track_queue(f"stage:{name}", q.qsize)
        m.track_queue("output", lambda: len(self._out))
        m.inflight_frames.set_function(lambda: self._inflight)

    # ================================================================== public API

    def start(self) -> None:
        """Start the batcher, one thread per stage, the deadline watcher and the output thread."""
        if self._started:
            return
        self._started = True
        for t in self._threads:
            if t is self._batcher.thread:
                self._batcher.start()
            else:
                t.start()

    def submit(self, frame: Frame) -> None:
        """Take one decoded frame; it will get exactly one verdict. Never blocks on the detector."""
        slot = self._register(frame.camera, frame.frame_id, frame.capture_ts, frame.received_mono,
                              frame.part_id, frame.received_ts)
        if not self._accepting:
            self._answer(slot, self._simple(slot, "shed", "shutting_down"))
            return
        check = getattr(self.processor, "check_image", None)
        if check is not None:
            # a frame the detector cannot judge (another camera size, say) is answered alone,
            # instead of failing the batch it would have joined
            try:
                check(frame.image, f"{frame.camera} #{frame.frame_id}")
            except ValueError as e:
                self.log.debug("bad_image", camera=frame.camera, frame_id=frame.frame_id, error=str(e))
                self._answer(slot, self._simple(slot, "error", "bad_image"))
                return
        slot.image = frame.image
        self._batcher.add(slot)

    def submit_error(self, camera: str, frame_id: int, reason: str, received_mono: float,
                     capture_ts: float, part_id: str | None = None) -> None:
        """Answer a frame that could not be decoded with `error` (reason as given), in order."""
        slot = self._register(camera, frame_id, capture_ts, received_mono, part_id, time.time())
        self._answer(slot, self._simple(slot, "error", reason))

    def drain(self, timeout_s: float) -> bool:
        """Stop accepting frames and finish the ones in flight, waiting at most `timeout_s`.

        Frames submitted from now on are answered `shed` (reason "shutting_down"). Frames still
        unanswered when the time is up are answered `timeout` (reason "shutdown"). Returns True
        when everything finished normally. Every frame has been handed to on_verdict on return
        (unless the publisher itself hangs).
        """
        with self._lock:
            self._accepting = False
        self._batcher.flush()
        end = time.monotonic() + max(0.0, timeout_s)
        clean = self._wait_idle(end)
        if not clean:
            self._answer_all_unanswered()
            self._wait_idle(time.monotonic() + 2.0)
        return clean

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop all threads. Anything still unanswered is answered `timeout` ("shutdown") first."""
        if self._stopped:
            return
        with self._lock:
            self._accepting = False
        if self._started:
            self._answer_all_unanswered()
            self._wait_idle(time.monotonic() + timeout_s)
        self._stop.set()
        with self._lock:
            self._deadline_cond.notify_all()
            self._out_cond.notify_all()
        left = self._batcher.stop(timeout_s)
        for slot in left:  # already answered above; answered again is a no-op
            self._shed(slot, "shutting_down")
        end = time.monotonic() + timeout_s
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, end - time.monotonic()))
        self._stopped = True

    @property
    def accepting(self) -> bool:
        """False once drain() or stop() began."""
        return self._accepting

    def inflight(self) -> int:
        """Frames submitted and not yet handed to the output thread."""
        return self._inflight

    def threads(self) -> list[threading.Thread]:
        """The pipeline's threads (batcher, stages, deadline watcher, output)."""
        return list(self._threads)

    def dead_threads(self) -> list[str]:
        """Names of pipeline threads that have died while the pipeline runs."""
        if not self._started or self._stop.is_set():
            return []
        return [t.name for t in self._threads if not t.is_alive()]

    def healthy(self) -> tuple[bool, str]:
        """(ok, why): threads alive, no stage call or publish stuck longer than `stall_s`."""
        dead = self.dead_threads()
        if dead:
            return False, "dead threads: " + ", ".join(dead)
        now = time.monotonic()
        for (name, _), since in zip(self._stages, list(self._busy_since)):
            if since is not None and now - since > self.stall_s:
                return False, f"stage {name} stuck for {now - since:.1f} s"
        since = self._publishing_since
        if since is not None and now - since > self.stall_s:
            return False, f"publishing stuck for {now - since:.1f} s"
        return True, "ok"

    def stats(self) -> dict[str, Any]:
        """Cumulative counts: received, verdicts by value, late results, in flight."""
        with self._lock:
            return {"received": self._received, "verdicts": dict(self._counts),
                    "late_results": self._late, "inflight": self._inflight}

    def take_latencies(self) -> list[float]:
        """Received -> release latencies (seconds) since the last call; clears them."""
        with self._lock:
            out = list(self._latencies)
            self._latencies.clear()
        return out

    # ================================================================== answering

    def _register(self, camera: str, frame_id: int, capture_ts: float, received_mono: float,
                  part_id: str | None, received_ts: float) -> _Slot:
        with self._lock:
            slot = _Slot(next(self._seq), camera, frame_id, capture_ts, received_mono,
                         received_mono + self._deadline_s, part_id)
            buf = self._cameras.get(camera)
            if buf is None:
                buf = self._cameras[camera] = deque()
            # Ingest decodes on several threads, so frames can be submitted slightly out of
            # receive order: insert by received_mono (scanning back from the tail, where it
            # almost always belongs). A frame older than one already released cannot go
            # before it any more; it then goes first among the unreleased ones.
            i = len(buf)
            while i > 0 and buf[i - 1].received_mono > received_mono:
                i -= 1
            buf.insert(i, slot)
            self._inflight += 1
            self._received += 1
            heapq.heappush(self._deadlines, (slot.deadline, slot.seq, slot))
            if self._deadlines[0][2] is slot:
                self._deadline_cond.notify()
        self.metrics.frames_received.labels(camera=self.metrics.camera_label(camera)).inc()
        self.metrics.last_frame_timestamp.set(received_ts)
        self.log.debug("frame", camera=camera, frame_id=frame_id)
        return slot

    @staticmethod
    def _simple(slot: _Slot, value: str, reason: str) -> Verdict:
        return Verdict(camera=slot.camera, frame_id=slot.frame_id, verdict=value,
                       capture_ts=slot.capture_ts, part_id=slot.part_id, reason=reason)

    def _answer(self, slot: _Slot, verdict: Verdict) -> bool:
        with self._lock:
            return self._answer_locked(slot, verdict)

    def _answer_locked(self, slot: _Slot, verdict: Verdict) -> bool:
        """The single place a frame gets its verdict: the first answer wins. Returns whether it won."""
        if slot.answered:
            return False
        slot.answered = True
        slot.verdict = verdict
        slot.image = None
        self._release_locked(slot.camera)
        return True

    def _release_locked(self, camera: str) -> None:
        """Hand this camera's answered verdicts to the output thread, oldest first, up to the first gap."""
        buf = self._cameras.get(camera)
        if buf is None:
            return
        now_mono, now_wall = time.monotonic(), time.time()
        m = self.metrics
        label = m.camera_label(camera)
        released = False
        while buf and buf[0].answered:
            slot = buf.popleft()
            v = slot.verdict
            slot.verdict = None  # a heatmap must not live on in the deadline heap
            v.latency_s = now_wall - slot.capture_ts
            self._out.append(v)
            self._inflight -= 1
            self._counts[v.verdict] += 1
            self._latencies.append(now_mono - slot.received_mono)
            released = True
            m.verdicts.labels(camera=label, verdict=v.verdict).inc()
            m.capture_to_verdict.labels(camera=label).observe(max(0.0, v.latency_s))
            if v.verdict == "timeout":
                m.frames_timed_out.labels(camera=label).inc()
            elif v.verdict == "shed":
                m.frames_shed.labels(reason=v.reason or "").inc()
            elif v.verdict == "error":
                m.frame_errors.labels(reason=v.reason or "").inc()
            self.log.debug("verdict", camera=camera, frame_id=v.frame_id, verdict=v.verdict,
                           reason=v.reason, score=v.score)
        if not buf:
            del self._cameras[camera]
        if released:
            self._out_cond.notify()

    def _shed(self, slot: _Slot, reason: str) -> None:
        self._answer(slot, self._simple(slot, "shed", reason))

    def _answer_all_unanswered(self) -> None:
        with self._lock:
            for buf in list(self._cameras.values()):
                for slot in list(buf):
                    if not slot.answered:
                        self._answer_locked(slot, self._simple(slot, "timeout", SHUTDOWN_REASON))

    def _wait_idle(self, end: float) -> bool:
        """Wait until nothing is in flight and everything is published, or until `end`."""
        with self._lock:
            while self._inflight or self._out or self._publishing_since is not None:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._idle_cond.wait(min(left, 0.1))
            return True

    # ================================================================== threads

    def _feed(self, slots: list[_Slot]) -> None:
        """Batcher sink: hand a batch to stage 0 (blocks while its queue is full)."""
        while not self._batch_permits.acquire(timeout=0.2):
            if self._stop.is_set():
                for s in slots:
                    self._answer(s, self._simple(s, "timeout", SHUTDOWN_REASON))
                return
        with self._lock:
            self._batches_inside += 1
        live = [s for s in slots if not s.answered]  # skip frames that timed out while waiting
        expected, now = self._expected_latency_s(), time.monotonic()
        for s in live:
            if s.deadline <= now:
                self._answer(s, self._simple(s, "timeout", DEADLINE_REASON))
            elif s.deadline - now < expected:
                self._shed(s, UNREACHABLE_REASON)
        live = [s for s in live if not s.answered]
        if not live:
            self._release_permit()
            return
        images = [s.image for s in live]
        if self._overlay is None:
            for s in live:
                s.image = None
        self.metrics.batch_size.observe(len(live))
        try:
            self._put(0, _Batch(live, images))
        except _Stop:
            self._release_permit()
            for s in live:
                self._answer(s, self._simple(s, "timeout", SHUTDOWN_REASON))

    def _put(self, i: int, batch: _Batch) -> None:
        while True:
            if self._stop.is_set():
                raise _Stop
            try:
                self._queues[i].put(batch, timeout=0.2)
                return
            except queue.Full:
                continue

    def _stage_loop(self, i: int) -> None:
        name, fn = self._stages[i]
        last = i == len(self._stages) - 1
        torch = _cuda_torch()
        stream = torch.cuda.Stream() if torch is not None else None
        q = self._queues[i]
        while not self._stop.is_set():
            try:
                batch = q.get(timeout=0.2)
            except queue.Empty:
                continue
            if all(s.answered for s in batch.slots):
                self._release_permit()
                continue  # every frame already timed out: do not spend the detector on it
            t0 = time.perf_counter()
            self._busy_since[i] = time.monotonic()
            try:
                if stream is not None:
                    _record_stream(batch.data, torch, stream)
                    with torch.cuda.stream(stream):
                        out = fn(batch.data)
                    # The next stage runs on its own stream: its input must be complete.
                    stream.synchronize()
                else:
                    out = fn(batch.data)
                if last:
                    self._check_results(out, len(batch.slots))
            except Exception as e:  # noqa: BLE001 - a stage failure must not stop the line
                self._busy_since[i] = None
                self._release_permit()
                self._stage_failed(name, batch, e)
                continue
            dt = time.perf_counter() - t0
            self._busy_since[i] = None
            self.metrics.stage_seconds.labels(stage=name).observe(dt)
            old = self._stage_time_s[i]
            self._stage_time_s[i] = dt if old == 0.0 else 0.8 * old + 0.2 * dt
            batch.timings[name] = dt
            batch.data = out
            if last:
                self._release_permit()
                self._deliver(batch)
            else:
                try:
                    self._put(i + 1, batch)
                except _Stop:
                    self._release_permit()
                    return
            batch = out = None  # do not keep the last batch's images/maps alive while idle

    @staticmethod
    def _check_results(out: Any, n: int) -> None:
        if not isinstance(out, (list, tuple)) or len(out) != n:
            got = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
            raise TypeError(f"last stage must return {n} InspectionResults, got {got}")

    def _stage_failed(self, name: str, batch: _Batch, e: Exception) -> None:
        reason = f"stage_failed:{name}"
        for s in batch.slots:
            self._answer(s, self._simple(s, "error", reason))
        # One log line per stage per 10 s at most: a bad input stream must not flood journald.
        now = time.monotonic()
        last, suppressed = self._fail_log.get(name, (-1e9, 0))
        if now - last >= 10.0:
            self.log.error("stage_failed", stage=name, frames=len(batch.slots), error=repr(e),
                           suppressed=suppressed, exc_info=e)
            self._fail_log[name] = (now, 0)
        else:
            self._fail_log[name] = (last, suppressed + 1)

    def _release_permit(self) -> None:
        with self._lock:
            self._batches_inside -= 1
        self._batch_permits.release()

    def _expected_latency_s(self) -> float:
        """Time a batch entering stage 0 now would take to its result: the batches queued
        ahead of it wait for the slowest stage, then it passes every stage."""
        with self._lock:
            ahead = self._batches_inside - 1  # the caller already holds its own permit
        return max(0, ahead) * max(self._stage_time_s) + sum(self._stage_time_s)

    def _deliver(self, batch: _Batch) -> None:
        p = self.processor
        late = 0
        with self._lock:
            for slot, r in zip(batch.slots, batch.data):
                if slot.answered:
                    late += 1
                    continue
                verdict = self._from_result(slot, r, batch.timings, p)
                if self._overlay is not None and slot.image is not None and verdict.verdict in ("pass", "fail"):
                    try:
                        verdict.overlay_jpeg = self._overlay(slot.image, r)
                    except Exception as e:  # a picture must never cost the verdict
                        self.log.warning("overlay_failed", error=repr(e))
                slot.image = None
                self._answer_locked(slot, verdict)
            self._late += late
        if late:
            self.metrics.late_results.inc(late)

    @staticmethod
    def _from_result(slot: _Slot, r: InspectionResult, timings: dict[str, float], p: Processor) -> Verdict:
        if not isinstance(r, InspectionResult) or r.verdict not in ("pass", "fail"):
            return Verdict(camera=slot.camera, frame_id=slot.frame_id, verdict="error", capture_ts=slot.capture_ts,
                           part_id=slot.part_id, reason="invalid_result", backend=p.backend, bank_id=p.bank_id)
        return Verdict(
            camera=slot.camera, frame_id=slot.frame_id, verdict=r.verdict, capture_ts=slot.capture_ts,
            part_id=slot.part_id, score=float(r.score), threshold=float(r.threshold), objects=list(r.objects),
            backend=r.backend or p.backend, bank_id=p.bank_id, heatmap=r.heatmap,
            # The detector's own (finer) timings, then the runtime's wall time per stage.
            timings={**r.timings, **timings},
        )

    def _deadline_loop(self) -> None:
        with self._lock:
            while not self._stop.is_set():
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    slot = heapq.heappop(self._deadlines)[2]
                    if not slot.answered:
                        self._answer_locked(slot, self._simple(slot, "timeout", DEADLINE_REASON))
                wait = self._deadlines[0][0] - now if self._deadlines else 0.5
                self._deadline_cond.wait(min(wait, 0.5))

    def _output_loop(self) -> None:
        last_err = -1e9
        while True:
            with self._lock:
                while not self._out and not self._stop.is_set():
                    self._out_cond.wait(0.5)
                if not self._out:
                    return  # stopping and nothing left
                items = list(self._out)
                self._out.clear()
                self._publishing_since = time.monotonic()
            for v in items:
                try:
                    self._on_verdict(v)
                except Exception as e:  # noqa: BLE001 - keep publishing the others
                    if time.monotonic() - last_err > 10.0:
                        last_err = time.monotonic()
                        self.log.error("publish_failed", camera=v.camera, frame_id=v.frame_id, error=repr(e))
            items = v = None  # do not keep the last verdicts (heatmaps) alive while idle
            with self._lock:
                self._publishing_since = None
                self._idle_cond.notify_all()
