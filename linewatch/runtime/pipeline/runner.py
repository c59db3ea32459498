"""The stage graph run as a pipeline: threads that wait for what `PipelineCore` says is due.

    submit(frame) -> core (register, admit, wait per camera) -> [intake] -> q0 -> [decode] -> q1 -> [stage 0] -> ...
    submit_error(...) ------------------------------------------------+                                        |
    [deadline watcher] (timeout) -> core.answer <--------------------+----- results --------------------------+
                                          |
                     release in receive order per camera (core)
                                          |
                              [output thread] -> on_verdict(verdict)

Every decision (which verdict, when it may leave, which frame is shed, when a batch is due,
deadlines from capture time) is made by `linewatch.runtime.pipeline.core.PipelineCore`, whose
docstring states the rules; this module only runs it: one lock around every core call, and
one thread each for intake (batches into stage 0), every stage, the deadline watcher and the
output. Detector stages, overlay rendering and `on_verdict` run outside the lock, so a slow
JPEG encode or a stuck stage never stalls another camera's bookkeeping.

* Frames arrive read but not decoded (linewatch.runtime.transport.ingest): the first stage,
  "decode", decodes a batch's frames on `decode_workers` threads, so only admitted frames are
  decoded, and the decode time (with the CPU it takes from the detector) is measured like
  every stage's and counted in the core's capacity and latency estimates. A frame that fails
  to decode is answered `error` alone (its wire reason) and leaves the batch.
* One thread per stage with queues between them; the core admits at most one batch per
  stage plus one into the graph, so the queues never hold more than that.
* A stage may raise: its batch is answered `error` (stage_failed:<name>) and the pipeline
  keeps going (one log line per stage per 10 s at most).
* With CUDA, each stage runs on its own stream (see issue #8 for what is left there).
* Recipe changeover: `switch_processor` puts another processor (bank) in service while frames
  flow. Each frame is judged by the processor in service when it was submitted: a batch
  carries its frames' processor (the core never mixes two in one batch) and every stage runs
  that processor's stage function, so frames before the cut get the old bank and frames after
  it the new one, in unchanged verdict order.
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
import structlog

from linewatch.config import BatchConfig, PipelineConfig
from linewatch.detector.result import InspectionResult
from linewatch.runtime.pipeline.clock import SYSTEM_CLOCK, Clock
from linewatch.runtime.pipeline.core import SHUTDOWN_REASON, Cut, PipelineCore, Slot
from linewatch.runtime.ops.logs import RateLimiter
from linewatch.runtime.ops.metrics import Metrics
from linewatch.images import DEFAULT_SAMPLE_WINDOW
from linewatch.wire import Frame, Verdict, WireError

if TYPE_CHECKING:  # scipy, which calibration imports, is not needed to run a pipeline
    from linewatch.detector.calibration import Calibration

POLL_S = 0.2  # how quickly a waiting thread notices stop() when nothing else wakes it
DECODE_STAGE = "decode"  # the runtime's own first stage: the admitted frames' images decoded
REFUSED_LOG_INTERVAL_S = 10.0  # at most one "frame refused" line per reason per interval


class Processor(Protocol):
    """What the runtime runs: a detector split into stages, judging against one bank.

    stages[0] receives a list of uint8 images, RGB (H, W, 3) or grey (H, W) (one batch); each
    stage's return value is the next stage's input; the last stage returns list[InspectionResult], one per
    input image, same order. A stage may raise: every frame of that batch is then answered
    `error` with reason "stage_failed:<name>" and the pipeline keeps going.
    frame_size is the (height, width) of the frames it judges (its bank's good images; None:
    any): a frame declaring another size is answered `error` (bad_image) before it is decoded.
    colour_mode ("colour", "mono"; None: either) is whether it judges colour or grey frames: a
    grey frame on a colour bank is answered `error` (grey_image), a colour frame on a mono bank
    `error` (colour_image), before decoding, from what the frame declares.
    sample_window is the [low, high] 16-bit frames are scaled through when they are decoded
    (`images.DEFAULT_SAMPLE_WINDOW`: the full range).
    device is where its stages run; its str() ("cpu", "cuda", "cuda:0") sets how many batches
    are inside the stage graph at once unless `pipeline.max_batches_inside` says.
    bank_id, backend and bank_images (good images in the bank) are shown in
    `linewatch_bank_info`, /readyz and the live page; the calibration's scores and threshold
    fill `linewatch_calibration_score_ratio`, the reference of the score drift alert (None: a
    processor without a calibrated bank leaves it empty).
    """

    backend: str
    bank_id: str
    bank_images: int
    frame_size: tuple[int, int] | None
    colour_mode: str | None
    sample_window: tuple[int, int]
    device: object
    calibration: Calibration | None
    stages: list[tuple[str, Callable[[Any], Any]]]

    def check_image(self, image: np.ndarray, name: str) -> None:
        """Raise ValueError for an image it cannot judge (another size than the bank's, say):
        that frame gets `error` (reason "bad_image") on its own, checked when it arrives."""


def _cuda_torch() -> Any | None:
    """torch, when the detector has imported it and CUDA is available; else None.

    Looked up in sys.modules rather than imported: a processor that never imported torch puts
    nothing on a GPU, and importing torch here would cost seconds on CPU-only hosts.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch
    return None


def _default_depth(processor: Processor, n_stages: int) -> int:
    """Batches inside the stage graph at once, unless configured: one per stage plus one where
    the stages run on a GPU (each busy with its own batch), 2 on a CPU (the stages share its
    cores: one batch decoding beside one in the detector; deeper only makes every batch wait)."""
    device = str(processor.device)
    return n_stages + 1 if device.startswith("cuda") else 2


def _record_stream(obj: Any, torch: Any, stream: Any) -> None:
    """Tell the CUDA caching allocator that tensors in `obj` are used on `stream`.

    Tensors made on another stage's stream and freed while this stage's kernels still read
    them could otherwise be handed out again to the producer's stream too early. Stage data
    is the detector's `Batch` dataclass (holding `Encoded`, `MatchResult`, ...), so fields of
    dataclasses are walked as well as lists, tuples and dicts.
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
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _record_stream(getattr(obj, f.name), torch, stream)


def _decode_one(frame: Any, window: tuple[int, int] = DEFAULT_SAMPLE_WINDOW) -> np.ndarray | WireError:
    """One frame's image, RGB or grey (a Frame decoded, 16-bit samples through `window`, or an
    image as it is), or why it has none."""
    if not isinstance(frame, Frame):
        return frame  # already an image (a caller that submits decoded images to the core)
    try:
        return frame.decoded(window)
    except WireError as e:
        return e
    except Exception as e:  # noqa: BLE001 - a decoder bug must not become a lost frame
        return WireError("decode_failed", frame.camera, frame.frame_id, f"{type(e).__name__}: {e}")


class _Stop(Exception):
    """The pipeline is stopping; the batch in hand is abandoned (its frames get answered)."""


class _Batch:
    __slots__ = ("slots", "data", "timings", "processor", "stage_fns")

    def __init__(self, slots: list[Slot], data: Any, processor: Processor) -> None:
        self.slots = slots
        self.data = data  # input of the next stage
        self.timings: dict[str, float] = {}  # seconds per finished stage
        self.processor = processor  # judges every frame of the batch (the one they were submitted under)
        self.stage_fns = [None, *(fn for _, fn in processor.stages)]  # stage 0 (decode) is the pipeline's


class Pipeline:
    """Frames in, exactly one verdict per frame out (in receive order per camera).

    on_verdict(verdict) is called on a single output thread, in order; it should not block
    for long (a slow publisher delays all verdicts, but loses none). `clock` is read for
    every deadline, delay and stage time (tests pass a fake one).
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
        clock: Clock = SYSTEM_CLOCK,
        keep_images: bool = False,
        decode_workers: int = 2,
        private_cameras: frozenset[str] = frozenset(),
    ) -> None:
        """`overlay`, when given, renders the JPEG attached to each pass/fail verdict from the
        frame's image and its result; the frame's image is then held until its result.
        `keep_images`: attach the frame's image to each pass/fail verdict (`Verdict.image`, never
        encoded) for the sinks that keep pictures; the image is then held until its result too.
        `decode_workers`: threads decoding a batch's frames (the first stage).
        `private_cameras`: the daemon's own cameras (the self-check's): judged like any other,
        their verdicts numbered apart (PipelineCore) and their frames not counted as the line's
        last frame (linewatch_last_frame_timestamp_seconds)."""
        if not processor.stages:
            raise ValueError("the processor has no stages")
        if any(name == DECODE_STAGE for name, _ in processor.stages):
            raise ValueError(f"a processor stage may not be called {DECODE_STAGE!r} (the pipeline's own first stage)")
        self.metrics = metrics if metrics is not None else Metrics()
        self.log = log if log is not None else structlog.get_logger("linewatch.pipeline")
        self.clock = clock
        self._on_verdict = on_verdict
        self._overlay = overlay
        self._keep_images = keep_images or overlay is not None
        self._processor_stages = [name for name, _ in processor.stages]  # every processor in service has these
        self._stage_names = [DECODE_STAGE, *self._processor_stages]
        self._decoders = ThreadPoolExecutor(max(1, decode_workers), thread_name_prefix="lw-decode")
        self._refused_log = RateLimiter(REFUSED_LOG_INTERVAL_S)  # one "frame refused" line per reason per 10 s
        self.core = PipelineCore(batch, pipeline, len(self._stage_names), clock, self.metrics, processor=processor,
                                 max_batches_inside=pipeline.max_batches_inside or _default_depth(processor, len(self._stage_names)),
                                 private_cameras=private_cameras)
        self._private_cameras = private_cameras
        # A stage call or a publish taking this long means the pipeline is stuck (watchdog).
        self.stall_s = stall_s if stall_s is not None else max(10.0, 5 * pipeline.deadline_ms / 1000.0)

        self._lock = threading.Lock()
        self._intake_cond = threading.Condition(self._lock)  # a batch may be due / stop
        self._deadline_cond = threading.Condition(self._lock)  # an earlier deadline / stop
        self._out_cond = threading.Condition(self._lock)  # verdicts to publish / stop
        self._idle_cond = threading.Condition(self._lock)  # something got published
        self._watched_deadline: float | None = None  # what the deadline thread sleeps towards
        self._publishing_since: float | None = None
        self._stop = threading.Event()
        self._started = False
        self._stopped = False

        # None on a queue: stop()'s wake-up for the stage waiting on it
        self._queues: list[queue.Queue[_Batch | None]] = [queue.Queue(pipeline.stage_queue_size) for _ in self._stage_names]
        self._busy_since: list[float | None] = [None] * len(self._stage_names)
        self._fail_log = RateLimiter(10.0)  # one stage_failed line per stage per 10 s
        self._threads: list[threading.Thread] = [threading.Thread(target=self._intake_loop, name="lw-intake", daemon=True)]
        for i, name in enumerate(self._stage_names):
            self._threads.append(threading.Thread(target=self._stage_loop, args=(i,), name=f"lw-stage-{name}", daemon=True))
        self._threads.append(threading.Thread(target=self._deadline_loop, name="lw-deadline", daemon=True))
        self._threads.append(threading.Thread(target=self._output_loop, name="lw-output", daemon=True))

        m = self.metrics
        m.track_queue("pending", lambda: self.core.pending)
        for name, q in zip(self._stage_names, self._queues):
            m.track_queue(f"stage:{name}", q.qsize)
        m.track_queue("output", lambda: self.core.released_waiting)
        m.inflight_frames.set_function(lambda: self.core.inflight)
        m.capacity.set_function(lambda: self.core.capacity_fps() or 0.0)

    # ================================================================== public API

    def start(self) -> None:
        """Start intake, one thread per stage, the deadline watcher and the output thread."""
        if self._started:
            return
        self._started = True
        for t in self._threads:
            t.start()

    def submit(self, frame: Frame) -> None:
        """Take one frame (decoded, or read with its bytes in `frame.encoded`); it will get
        exactly one verdict. Never blocks on the detector or on decoding."""
        with self._lock:
            slot = self.core.register(frame.camera, frame.frame_id, frame.capture_ts, frame.received_ts,
                                      frame.received_mono, frame.part_id)
            # A frame its processor cannot judge (another size than the bank's, say) is answered
            # alone, before decoding, instead of failing the batch it would have joined. Checked
            # under the lock, by the processor register tied it to (a size comparison).
            problem = self._unjudgeable(slot.processor, frame)
            if problem is not None and self.core.accepting:
                self.core.answer_simple(slot, "error", problem[0])
            else:
                self.core.enqueue(slot, frame)  # no-op when register answered it already
            self._changed()
        if problem is not None:
            self._log_refused(problem[0], frame.camera, frame.frame_id, problem[1])
        if frame.camera not in self._private_cameras:
            self.metrics.last_frame_timestamp.set(frame.received_ts)

    @staticmethod
    def _unjudgeable(processor: Processor | None, frame: Frame) -> tuple[str, str] | None:
        """Why `processor` cannot judge the frame, as (reason, detail): grey on a colour bank
        (grey_image), colour on a mono bank (colour_image), another size than the bank's
        (bad_image), all from what the frame declares; or (a decoded frame) its check_image
        refuses the image (bad_image). None when it can."""
        if processor is None:
            return None
        mode = processor.colour_mode
        grey = frame.is_grey
        if mode is not None and grey is not None and grey != (mode == "mono"):
            if grey:
                return "grey_image", (f"arrived {frame.describe()}: a grey frame, the bank judges colour frames "
                                      "(a camera set to a mono pixel format?)")
            return "colour_image", f"arrived {frame.describe()}: a colour frame, the bank judges grey (mono) frames"
        expected = processor.frame_size
        arrived = frame.height_width
        if expected is not None and arrived is not None and tuple(arrived) != tuple(expected[:2]):
            return "bad_image", f"arrived {frame.describe()}; the bank judges {expected[1]}x{expected[0]} frames"
        if frame.image is None:
            return None
        try:
            processor.check_image(frame.image, f"{frame.camera} #{frame.frame_id}")
        except ValueError as e:
            return "bad_image", str(e)
        return None

    def _log_refused(self, reason: str, camera: str, frame_id: int, detail: str) -> None:
        """A "frame refused" warning, at most one per reason per 10 s (with how many were not logged)."""
        held_back = self._refused_log.allow(reason, self.clock.monotonic())
        if held_back is not None:
            self.log.warning("frame refused", reason=reason, camera=camera, frame_id=frame_id, detail=detail,
                             not_logged_since_last=held_back)

    def switch_processor(self, processor: Processor) -> Cut:
        """Put `processor` in service (a recipe changeover) and return where the cut fell.

        Frames submitted from now on are judged by it; frames submitted before keep the one
        they were submitted under, even those still waiting in a batch. The old processor is
        let go when its last batch is done and its last verdict released. Refused
        (ValueError) when its stage names differ: the stage threads, queues and metrics are
        the running pipeline's.
        """
        names = [name for name, _ in processor.stages]
        if names != self._processor_stages:
            raise ValueError(f"the new processor's stages {names} are not the running pipeline's {self._processor_stages}")
        with self._lock:
            return self.core.switch_processor(processor)

    @property
    def processor(self) -> Processor:
        """The processor in service: the one frames submitted now are judged by."""
        return self.core.processor

    def submit_error(self, camera: str, frame_id: int, reason: str, received_mono: float,
                     capture_ts: float, part_id: str | None = None) -> None:
        """Answer a frame that could not be decoded with `error` (reason as given), in order."""
        with self._lock:
            self.core.register_error(camera, frame_id, reason, capture_ts, received_mono, part_id)
            self._changed()

    def drain(self, timeout_s: float) -> bool:
        """Stop accepting frames and finish the ones in flight, waiting at most `timeout_s`.

        Frames submitted from now on are answered `shed` (reason "shutting_down"); waiting ones
        go to the detector at once. Frames still unanswered when the time is up are answered
        `timeout` (reason "shutdown"). Returns True when everything finished normally. Every
        frame has been handed to on_verdict on return (unless the publisher itself hangs).
        """
        with self._lock:
            self.core.stop_accepting()
            self._changed()
        clean = self._wait_idle(timeout_s)
        if not clean:
            with self._lock:
                self.core.answer_all_unanswered()
                self._changed()
            self._wait_idle(2.0)
        return clean

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop all threads. Anything still unanswered is answered `timeout` ("shutdown") first."""
        if self._stopped:
            return
        with self._lock:
            self.core.stop_accepting()
            if self._started:
                self.core.answer_all_unanswered()
            self._changed()
        if self._started:
            self._wait_idle(timeout_s)
        self._stop.set()
        with self._lock:
            for cond in (self._intake_cond, self._deadline_cond, self._out_cond, self._idle_cond):
                cond.notify_all()
        for q in self._queues:  # wake the idle stages now, not at their next poll
            try:
                q.put_nowait(None)
            except queue.Full:  # its stage has batches to take: it sees _stop after the one in hand
                pass
        end = time.monotonic() + timeout_s  # real time: how long this call may block
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, end - time.monotonic()))
        self._decoders.shutdown(wait=False, cancel_futures=True)
        self._stopped = True

    @property
    def accepting(self) -> bool:
        """False once drain() or stop() began."""
        return self.core.accepting

    def inflight(self) -> int:
        """Frames submitted and not yet handed to the output thread."""
        return self.core.inflight

    def threads(self) -> list[threading.Thread]:
        """The pipeline's threads (intake, stages, deadline watcher, output)."""
        return list(self._threads)

    def running_after_stop(self) -> list[str]:
        """Names of threads still running after stop(): a stage call (a model on a CPU can take
        seconds) cannot be interrupted, and stop() waits for it only `timeout_s`."""
        return [t.name for t in self._threads if t.is_alive()] if self._stopped else []

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
        now = self.clock.monotonic()
        for name, since in zip(self._stage_names, list(self._busy_since)):
            if since is not None and now - since > self.stall_s:
                return False, f"stage {name} stuck for {now - since:.1f} s"
        since = self._publishing_since
        if since is not None and now - since > self.stall_s:
            return False, f"publishing stuck for {now - since:.1f} s"
        return True, "ok"

    def stats(self) -> dict[str, Any]:
        """Cumulative counts: received, verdicts by value, late results, in flight."""
        with self._lock:
            return self.core.stats()

    def take_latencies(self) -> list[float]:
        """Received -> release latencies (seconds) since the last call; clears them."""
        with self._lock:
            out = list(self.core.latencies)
            self.core.latencies.clear()
        return out

    # ================================================================== waking the threads

    def tick(self) -> None:
        """Make every waiting thread look at the clock again now (deadlines, due batches,
        stalls) instead of at its next wake-up. For a test that has just moved a fake clock."""
        with self._lock:
            for cond in (self._intake_cond, self._deadline_cond, self._out_cond):
                cond.notify_all()

    def _changed(self) -> None:
        """After a core call (lock held): wake whichever thread has something new to do."""
        core = self.core
        self._intake_cond.notify()
        if core.has_released:
            self._out_cond.notify()
        elif core.idle():
            self._idle_cond.notify_all()
        earliest = core.next_deadline()
        if earliest is not None and (self._watched_deadline is None or earliest < self._watched_deadline):
            self._deadline_cond.notify()

    def _wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight and everything is published, at most `timeout_s`
        of real time (the pipeline's clock decides deadlines; how long a caller blocks is not
        the pipeline's to decide, and a fake clock must not make it wait for ever)."""
        with self._lock:
            return self._idle_cond.wait_for(lambda: self.core.idle() and self._publishing_since is None,
                                            max(0.0, timeout_s))

    # ================================================================== threads

    def _intake_loop(self) -> None:
        """Hand each batch the core declares due to stage 0."""
        while not self._stop.is_set():
            with self._lock:
                slots = self.core.take_batch()
                if slots is None:
                    due = self.core.batch_due_at()
                    wait = POLL_S if due is None else min(POLL_S, max(0.0, due - self.clock.monotonic()))
                    self._intake_cond.wait(wait)
                    continue
                self._changed()
                if not slots:
                    continue
                frames = [s.frame for s in slots]
                processor = slots[0].processor  # the core's batches never mix processors
                for s in slots:
                    s.frame = None  # the batch holds it now
            try:
                self._put(0, _Batch(slots, frames, processor))
            except _Stop:
                self._abandon(slots)
                return
            slots = frames = processor = None  # waiting for the next batch holds nothing of this one

    def _put(self, i: int, batch: _Batch) -> None:
        while True:
            if self._stop.is_set():
                raise _Stop
            try:
                self._queues[i].put(batch, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def _abandon(self, slots: list[Slot]) -> None:
        with self._lock:
            self.core.batch_left()
            for s in slots:
                self.core.answer_simple(s, "timeout", SHUTDOWN_REASON)
            self._changed()

    def _stage_loop(self, i: int) -> None:
        name = self._stage_names[i]
        last = i == len(self._stage_names) - 1
        torch = _cuda_torch()
        stream = torch.cuda.Stream() if torch is not None else None
        q = self._queues[i]
        while not self._stop.is_set():
            try:
                batch = q.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if batch is None:  # stop()'s wake-up
                continue
            if all(s.answered for s in batch.slots):  # every frame timed out meanwhile
                with self._lock:
                    self.core.batch_left()
                    self._changed()
                batch = None  # an idle stage holds no batch: its images, its (maybe old) processor
                continue
            t0 = self.clock.monotonic()
            self._busy_since[i] = t0
            frames = len(batch.slots)
            if i == 0:
                try:
                    batch.data = self._decode(batch)
                except Exception as e:  # noqa: BLE001 - (the decode pool shut down, say)
                    self._busy_since[i] = None
                    self._stage_failed(name, batch, e)
                    batch = None
                    continue
                dt = self.clock.monotonic() - t0
                self._busy_since[i] = None
                self._finished(i, dt, frames, batch)
                if not batch.slots:  # none decoded: each is answered already
                    with self._lock:
                        self.core.batch_left()
                        self._changed()
                    batch = None
                    continue
                try:
                    self._put(1, batch)
                except _Stop:
                    self._abandon(batch.slots)
                    return
                batch = None
                continue
            try:
                if stream is not None:
                    _record_stream(batch.data, torch, stream)
                    with torch.cuda.stream(stream):
                        out = batch.stage_fns[i](batch.data)
                    # The next stage runs on its own stream: its input must be complete.
                    stream.synchronize()
                else:
                    out = batch.stage_fns[i](batch.data)
                if last:
                    self._check_results(out, len(batch.slots))
            except Exception as e:  # noqa: BLE001 - a stage failure must not stop the line
                self._busy_since[i] = None
                self._stage_failed(name, batch, e)
                batch = None
                continue
            dt = self.clock.monotonic() - t0
            self._busy_since[i] = None
            batch.data = out
            self._finished(i, dt, frames, batch)
            if last:
                self._deliver(batch)
            else:
                try:
                    self._put(i + 1, batch)
                except _Stop:
                    self._abandon(batch.slots)
                    return
            batch = out = None  # do not keep the last batch's images/maps alive while idle

    def _finished(self, i: int, seconds: float, frames: int, batch: _Batch) -> None:
        """Record stage i's time for a batch of `frames` frames (metrics, the batch, the core)."""
        name = self._stage_names[i]
        self.metrics.stage_seconds.labels(stage=name).observe(seconds)
        batch.timings[name] = seconds
        with self._lock:
            self.core.stage_finished(i, seconds, frames)

    def _decode(self, batch: _Batch) -> list[np.ndarray]:
        """Stage 0: the batch's frames decoded on the decode threads. A frame that fails (its
        bytes, or the processor's check_image) is answered `error` and leaves the batch."""
        window = batch.processor.sample_window
        outcomes = list(self._decoders.map(lambda frame: _decode_one(frame, window), batch.data))
        kept: list[Slot] = []
        images: list[np.ndarray] = []
        refused: list[tuple[Slot, WireError]] = []
        for slot, outcome in zip(batch.slots, outcomes):
            if isinstance(outcome, WireError):
                refused.append((slot, outcome))
                continue
            problem = self._unjudgeable(batch.processor, Frame(slot.camera, slot.frame_id, slot.capture_ts, outcome,
                                                               0.0, slot.received_mono))
            if problem is not None:
                refused.append((slot, WireError(problem[0], slot.camera, slot.frame_id, problem[1])))
                continue
            kept.append(slot)
            images.append(outcome)
            if self._keep_images:
                slot.image = outcome
        if refused:
            with self._lock:
                for slot, error in refused:
                    self.core.answer_simple(slot, "error", error.reason)
                self._changed()
            for slot, error in refused:
                self._log_refused(error.reason, slot.camera, slot.frame_id, error.detail)
        batch.slots = kept
        return images

    @staticmethod
    def _check_results(out: Any, n: int) -> None:
        if not isinstance(out, (list, tuple)) or len(out) != n:
            got = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
            raise TypeError(f"last stage must return {n} InspectionResults, got {got}")

    def _stage_failed(self, name: str, batch: _Batch, e: Exception) -> None:
        reason = f"stage_failed:{name}"
        with self._lock:
            self.core.batch_left()
            for s in batch.slots:
                self.core.answer_simple(s, "error", reason)
            self._changed()
        # One log line per stage per 10 s at most: a bad input stream must not flood journald.
        held_back = self._fail_log.allow(name, self.clock.monotonic())
        if held_back is not None:
            self.log.error("stage_failed", stage=name, frames=len(batch.slots), error=repr(e),
                           not_logged_since_last=held_back, exc_info=e)

    def _deliver(self, batch: _Batch) -> None:
        """Turn the last stage's results into verdicts (overlays rendered outside the lock)."""
        p = batch.processor
        verdicts = []
        for slot, r in zip(batch.slots, batch.data):
            verdict = self._from_result(slot, r, batch.timings, p)
            image = slot.image
            if self._overlay is not None and image is not None and not slot.answered and verdict.verdict in ("pass", "fail"):
                try:
                    verdict.overlay_jpeg = self._overlay(image, r)
                except Exception as e:  # a picture must never cost the verdict
                    self.log.warning("overlay_failed", error=repr(e))
            if self._keep_images and verdict.verdict in ("pass", "fail"):
                verdict.image = image
            verdicts.append(verdict)
        with self._lock:
            self.core.batch_left(judged=batch.slots)
            for slot, verdict in zip(batch.slots, verdicts):
                self.core.deliver(slot, verdict)
            self._changed()

    @staticmethod
    def _from_result(slot: Slot, r: InspectionResult, timings: dict[str, float], p: Processor) -> Verdict:
        if not isinstance(r, InspectionResult) or r.verdict not in ("pass", "fail"):
            return Verdict(camera=slot.camera, frame_id=slot.frame_id, verdict="error", capture_ts=slot.capture_ts,
                           part_id=slot.part_id, reason="invalid_result", backend=p.backend, bank_id=p.bank_id)
        return Verdict(
            camera=slot.camera, frame_id=slot.frame_id, verdict=r.verdict, capture_ts=slot.capture_ts,
            part_id=slot.part_id, score=float(r.score), threshold=float(r.threshold), objects=list(r.objects),
            backend=r.backend or p.backend, bank_id=p.bank_id, heatmap=r.heatmap, branch_scores=dict(r.branch_scores or {}),
            # The detector's own (finer) timings, then the runtime's wall time per stage.
            timings={**r.timings, **timings},
        )

    def _deadline_loop(self) -> None:
        with self._lock:
            while not self._stop.is_set():
                if self.core.expire():
                    self._changed()
                earliest = self.core.next_deadline()
                self._watched_deadline = earliest
                wait = POLL_S if earliest is None else min(POLL_S * 2.5, max(0.0, earliest - self.clock.monotonic()))
                self._deadline_cond.wait(wait)

    def _output_loop(self) -> None:
        last_err = -1e9
        while True:
            with self._lock:
                while not self.core.has_released and not self._stop.is_set():
                    self._out_cond.wait(POLL_S * 2.5)
                if not self.core.has_released:
                    return  # stopping and nothing left
                items = self.core.take_released()
                self._publishing_since = self.clock.monotonic()
            for v in items:
                try:
                    self._on_verdict(v)
                except Exception as e:  # noqa: BLE001 - keep publishing the others
                    if self.clock.monotonic() - last_err > 10.0:
                        last_err = self.clock.monotonic()
                        self.log.error("publish_failed", camera=v.camera, frame_id=v.frame_id, error=repr(e))
            items = v = None  # do not keep the last verdicts (heatmaps) alive while idle
            with self._lock:
                self._publishing_since = None
                self._idle_cond.notify_all()
