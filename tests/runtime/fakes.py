"""Fake detector and helpers shared by the runtime tests (no torch, no weights): fake clock,
processors, frames, verdict and frame collectors, a PipelineCore on the fake clock.

The fake processor encodes the answer in the image: pixel [0, 0, 0] / 255 is the score,
threshold 0.5, so a test knows each frame's expected verdict.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any, Callable

import io
import logging

import numpy as np
import structlog

from linewatch.config import BatchConfig, PipelineConfig
from linewatch.images import DEFAULT_SAMPLE_WINDOW
from linewatch.detector.result import InspectionResult
from linewatch.runtime.pipeline.core import PipelineCore, Slot
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.pipeline.runner import Pipeline
from linewatch.wire import Frame, Verdict, WireError


class FakeClock:
    """A Clock (linewatch.runtime.pipeline.clock) that moves only when the test says so."""

    def __init__(self, mono: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self.mono = mono
        self.wall = wall
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self.mono

    def time(self) -> float:
        with self._lock:
            return self.wall

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.mono += seconds
            self.wall += seconds


def make_frame(camera: str, frame_id: int, value: int | None = None, received_mono: float | None = None,
               clock: FakeClock | None = None, age_s: float = 0.0) -> Frame:
    """A tiny frame whose pixel value sets the fake score (default: fail for odd ids).

    Received now (by `clock`, default the real clocks), captured `age_s` earlier."""
    if value is None:
        value = 200 if frame_id % 2 else 50
    now = clock.time() if clock is not None else time.time()
    mono = clock.monotonic() if clock is not None else time.monotonic()
    return Frame(camera=camera, frame_id=frame_id, capture_ts=now - age_s, image=np.full((4, 4, 3), value, np.uint8),
                 received_ts=now, received_mono=mono if received_mono is None else received_mono)


def expected_verdict(frame_id: int) -> str:
    return "fail" if frame_id % 2 else "pass"


class FakeProcessor:
    """Stages that sleep a known cost per batch; the last one returns InspectionResults.

    costs: [(stage name, seconds per batch)]. fail_if(stage name, batch input) -> True makes
    that stage raise. Records the batch sizes it saw.
    """

    backend = "fake"
    bank_id = "bank-test"
    bank_images = 3
    calibration = None

    def __init__(self, costs: list[tuple[str, float]],
                 fail_if: Callable[[str, list[np.ndarray]], bool] | None = None,
                 wrong_length: bool = False) -> None:
        self.batch_sizes: list[int] = []
        self._fail_if = fail_if
        self._wrong_length = wrong_length
        self.stages = [(name, self._make_stage(i, name, cost, len(costs))) for i, (name, cost) in enumerate(costs)]

    def _make_stage(self, i: int, name: str, cost: float, n: int) -> Callable[[Any], Any]:
        def stage(batch: Any) -> Any:
            images = batch["images"] if isinstance(batch, dict) else batch
            if i == 0:
                self.batch_sizes.append(len(images))
            if self._fail_if is not None and self._fail_if(name, images):
                raise RuntimeError(f"boom in {name}")
            if cost:
                time.sleep(cost)
            if i < n - 1:
                return {"images": images}
            results = [
                InspectionResult(score=float(im.flat[0]) / 255.0, verdict="fail" if im.flat[0] > 127 else "pass",
                                 threshold=0.5, heatmap=np.zeros(im.shape[:2], np.float32), backend="fake",
                                 timings={"inner": 0.0})
                for im in images
            ]
            return results[:-1] if self._wrong_length else results

        return stage

    def check_image(self, image: np.ndarray, name: str) -> None:
        """Judges any image."""

    frame_size = None  # any size
    colour_mode = None  # colour or grey
    sample_window = DEFAULT_SAMPLE_WINDOW
    device = "cpu"


class GatedProcessor:
    """One stage ("only") that holds each batch until the test opens `gate`; `entered` is set
    when the first batch is inside. Results: pass, score 0.1."""

    backend = "fake"
    bank_id = "bank-test"
    bank_images = 1
    calibration = None

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.stages = [("only", self._stage)]

    def _stage(self, images: list[np.ndarray]) -> list[InspectionResult]:
        self.entered.set()
        assert self.gate.wait(30.0), "the test never opened the gate"
        return [InspectionResult(score=0.1, verdict="pass", threshold=0.5, heatmap=np.zeros((2, 2), np.float32), backend="fake") for _ in images]

    def check_image(self, image: np.ndarray, name: str) -> None:
        """Judges any image."""

    frame_size = None  # any size
    colour_mode = None  # colour or grey
    sample_window = DEFAULT_SAMPLE_WINDOW
    device = "cpu"


class Collector:
    """on_verdict sink that records verdicts and lets a test wait for a count (bounded)."""

    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []
        self.times: list[float] = []  # monotonic time each verdict arrived
        self._cond = threading.Condition()

    def __call__(self, v: Verdict) -> None:
        with self._cond:
            self.verdicts.append(v)
            self.times.append(time.monotonic())
            self._cond.notify_all()

    def wait_for(self, n: int, timeout_s: float = 10.0) -> bool:
        end = time.monotonic() + timeout_s
        with self._cond:
            while len(self.verdicts) < n:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def by_camera(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = defaultdict(list)
        for v in self.verdicts:
            out[v.camera].append(v.frame_id)
        return out

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for v in self.verdicts:
            out[v.verdict] += 1
        return dict(out)


def quiet_log(stream: io.StringIO | None = None, level: int = logging.WARNING) -> Any:
    """A structlog logger writing JSON to `stream` (default: a throwaway buffer), no global config."""
    return structlog.wrap_logger(
        structlog.PrintLogger(stream if stream is not None else io.StringIO()),
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(level),
    )


def make_pipeline(processor: FakeProcessor, collector: Collector, max_batch: int = 4, max_delay_ms: float = 5.0,
                  stage_queue_size: int = 2, max_pending: int = 64, shed_policy: str = "oldest",
                  deadline_ms: float = 2000.0, metrics: Metrics | None = None, clock: Any = None) -> Pipeline:
    return Pipeline(
        processor,
        BatchConfig(max_batch=max_batch, max_delay_ms=max_delay_ms),
        PipelineConfig(stage_queue_size=stage_queue_size, max_pending_frames=max_pending,
                       shed_policy=shed_policy, deadline_ms=deadline_ms),
        collector, metrics=metrics, log=quiet_log(), **({"clock": clock} if clock is not None else {}),
    )


# ---------------------------------------------------------------- a PipelineCore on a fake clock (test_core.py)


IMAGE = np.zeros((2, 2, 3), np.uint8)


def make_core(clock: FakeClock, n_stages: int = 1, max_batch: int = 4, max_delay_ms: float = 10.0,
              max_pending: int = 64, shed_policy: str = "oldest", deadline_ms: float = 1000.0,
              deadline_from: str = "capture", skew_ms: float = 1000.0, metrics: Metrics | None = None,
              max_inside: int | None = None) -> PipelineCore:
    return PipelineCore(
        BatchConfig(max_batch=max_batch, max_delay_ms=max_delay_ms),
        PipelineConfig(max_pending_frames=max_pending, shed_policy=shed_policy, deadline_ms=deadline_ms,
                       deadline_from=deadline_from, clock_skew_tolerance_ms=skew_ms, max_batches_inside=max_inside),
        n_stages, clock, metrics if metrics is not None else Metrics(),
    )


def add(core: PipelineCore, clock: FakeClock, camera: str, frame_id: int, age_s: float = 0.0,
        received_mono: float | None = None) -> Slot:
    """Register and enqueue a frame received now, captured `age_s` ago."""
    slot = core.register(camera, frame_id, clock.time() - age_s, clock.time(),
                         clock.monotonic() if received_mono is None else received_mono)
    core.enqueue(slot, IMAGE)
    return slot


def result(slot: Slot, value: str = "pass") -> Verdict:
    return Verdict(camera=slot.camera, frame_id=slot.frame_id, verdict=value, capture_ts=slot.capture_ts,
                   score=0.1, threshold=0.5, heatmap=np.zeros((2, 2), np.float32))


class FrameCollector:
    """Thread-safe sink for Ingest's on_frame / on_error, with bounded waits."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.errors: list[WireError] = []
        self._cond = threading.Condition()

    def on_frame(self, frame: Frame) -> None:
        with self._cond:
            self.frames.append(frame)
            self._cond.notify_all()

    def on_error(self, error: WireError, received_mono: float) -> None:
        with self._cond:
            self.errors.append(error)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout_s)
