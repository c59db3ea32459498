"""Recipe changeover inside the pipeline: `switch_processor` while frames flow.

Frames are judged by the processor in service when they were submitted, even when frames of
both sides of the cut wait in the same pending batch or an old batch is still inside a stage;
verdict order does not change; a batch never mixes processors; the old processor is let go
when its last batch is done. Time moves on a fake clock; threads are waited on with events.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from linewatch.runtime.pipeline.core import PipelineCore
from linewatch.runtime.ops.metrics import Metrics
from tests.runtime.fakes import (Collector, FakeClock, FakeProcessor, GatedProcessor, add, make_core, make_frame,
                                 make_pipeline, result)


def bank(bank_id: str, stages: tuple[str, ...] = ("pre", "net")) -> FakeProcessor:
    proc = FakeProcessor([(name, 0.0) for name in stages])
    proc.bank_id = bank_id
    return proc


class SizedProcessor(FakeProcessor):
    """A fake bank that judges only images of one size (like a TemplateBank's source_shape)."""

    def __init__(self, bank_id: str, side: int) -> None:
        super().__init__([("pre", 0.0), ("net", 0.0)])
        self.bank_id = bank_id
        self.side = side

    def check_image(self, image: np.ndarray, name: str) -> None:
        if image.shape[:2] != (self.side, self.side):
            raise ValueError(f"{name}: {image.shape[1]}x{image.shape[0]}, this bank judges {self.side}x{self.side}")



def test_frames_before_and_after_the_cut_in_one_pending_batch_get_their_own_bank() -> None:
    # Two cameras, three frames each before the cut and after it, all waiting for one batch
    # (max_delay far away): the batch that becomes due must not take them together.
    clock = FakeClock()
    old, new = bank("bank-old"), bank("bank-new")
    out = Collector()
    p = make_pipeline(old, out, max_batch=16, max_delay_ms=1000.0, deadline_ms=60_000, clock=clock)
    p.start()
    try:
        for i in range(3):
            for cam in ("cam0", "cam1"):
                p.submit(make_frame(cam, i, clock=clock))
        cut = p.switch_processor(new)
        assert p.processor is new
        for i in range(3, 6):
            for cam in ("cam0", "cam1"):
                p.submit(make_frame(cam, i, clock=clock))
        assert (cut.frames_before, cut.last_frame_ids) == (6, {"cam0": 2, "cam1": 2})
        clock.advance(1.0)  # the batch is due now
        p.tick()
        assert out.wait_for(12), f"only {len(out.verdicts)} of 12 verdicts"
    finally:
        p.stop()
    assert len(out.verdicts) == 12
    for cam in ("cam0", "cam1"):
        mine = [v for v in out.verdicts if v.camera == cam]
        assert [v.frame_id for v in mine] == list(range(6))  # order unchanged by the switch
        assert [v.bank_id for v in mine] == ["bank-old"] * 3 + ["bank-new"] * 3
        assert all(v.verdict in ("pass", "fail") for v in mine), [(v.verdict, v.reason) for v in mine]
    assert old.batch_sizes == [6] and new.batch_sizes == [6]  # one batch each: never mixed, none split further


def test_an_old_batch_inside_a_stage_finishes_with_the_old_bank_and_is_then_let_go(started) -> None:
    clock = FakeClock()
    old = GatedProcessor()
    old.bank_id = "bank-old"
    new = GatedProcessor()
    new.bank_id = "bank-new"
    new.gate.set()
    out = Collector()
    p = started(make_pipeline(old, out, max_batch=4, max_delay_ms=0.0, deadline_ms=60_000, clock=clock))
    p.submit(make_frame("cam0", 0, clock=clock))
    assert old.entered.wait(10.0)  # frame 0 is inside the old bank's stage
    p.submit(make_frame("cam0", 1, clock=clock))  # waits, registered under the old bank too
    cut = p.switch_processor(new)
    assert cut.last_frame_ids == {"cam0": 1}
    for i in (2, 3):
        p.submit(make_frame("cam0", i, clock=clock))
    old.gate.set()
    assert out.wait_for(4)
    assert [(v.frame_id, v.bank_id) for v in out.verdicts] == [
        (0, "bank-old"), (1, "bank-old"), (2, "bank-new"), (3, "bank-new")]
    # Nothing in the pipeline holds the old processor once its frames are out and the stages
    # have moved on to the new one's batch: a bank on a GPU is freed then, not at shutdown.
    gone = weakref.ref(old)
    del old
    gc.collect()
    assert gone() is None, gc.get_referrers(gone())


def test_a_processor_with_other_stages_is_refused_and_the_old_one_stays(started) -> None:
    old = bank("bank-old", stages=("pre", "net"))
    out = Collector()
    p = started(make_pipeline(old, out, max_batch=1, max_delay_ms=0.0))
    with pytest.raises(ValueError, match=r"\['pre', 'post'\].*\['pre', 'net'\]"):
        p.switch_processor(bank("bank-other", stages=("pre", "post")))
    assert p.processor is old
    p.submit(make_frame("cam0", 0))
    assert out.wait_for(1)
    assert out.verdicts[0].bank_id == "bank-old"


def test_each_frame_is_checked_by_its_own_processor(started) -> None:
    # The old bank judges 4x4 images, the new one 8x8: a 4x4 frame is fine before the cut and
    # an error (bad_image) after it, an 8x8 frame the other way round.
    clock = FakeClock()
    old, new = SizedProcessor("bank-old", 4), SizedProcessor("bank-new", 8)
    out = Collector()
    p = started(make_pipeline(old, out, max_batch=4, max_delay_ms=1000.0, deadline_ms=60_000, clock=clock))

    def frame(i: int, side: int):
        f = make_frame("cam0", i, clock=clock)
        f.image = np.full((side, side, 3), 50, np.uint8)
        return f

    p.submit(frame(0, 4))
    p.submit(frame(1, 8))
    p.switch_processor(new)
    p.submit(frame(2, 4))
    p.submit(frame(3, 8))
    clock.advance(1.0)
    p.tick()
    assert out.wait_for(4)
    got = [(v.frame_id, v.verdict, v.reason, v.bank_id) for v in out.verdicts]
    assert got == [(0, "pass", None, "bank-old"), (1, "error", "bad_image", None),
                   (2, "error", "bad_image", None), (3, "pass", None, "bank-new")], got


# ---------------------------------------------------------------- the core's rules, step by step


def test_core_batches_take_one_processor_the_longest_waiting_frames_first() -> None:
    clock = FakeClock()
    core = make_core(clock, max_batch=8, max_delay_ms=10.0)
    core.processor = "A"
    a0 = add(core, clock, "cam0", 0)
    clock.advance(0.001)
    a1 = add(core, clock, "cam1", 0)
    cut = core.switch_processor("B")
    b0 = add(core, clock, "cam0", 1)
    b1 = add(core, clock, "cam1", 1)
    assert cut.frames_before == 2 and core.processor == "B"
    clock.advance(0.02)
    assert core.take_batch() == [a0, a1]  # due with B's frames waiting too, but without them
    assert core.take_batch() == [b0, b1]  # and B's are due as well (they waited as long)
    assert [s.processor for s in (a0, a1, b0, b1)] == ["A", "A", "B", "B"]


def test_core_slots_let_go_of_their_processor_when_released() -> None:
    clock = FakeClock()
    core = make_core(clock, max_batch=1, max_delay_ms=0.0)
    core.processor = "A"
    slot = add(core, clock, "cam0", 0)
    core.switch_processor("B")
    assert core.take_batch() == [slot]
    core.batch_left()
    core.deliver(slot, result(slot))
    assert [v.frame_id for v in core.take_released()] == [0]
    assert slot.processor is None  # the deadline heap outlives the slot; the processor must not


def test_core_last_frame_ids_are_bounded_like_the_camera_labels() -> None:
    from linewatch.config import BatchConfig, PipelineConfig
    from linewatch.runtime.ops.metrics import CameraLabels

    clock = FakeClock()
    core = PipelineCore(BatchConfig(), PipelineConfig(), 1, clock, Metrics(camera_labels=CameraLabels(limit=2)))
    for i, cam in enumerate(["a", "b", "c", "d", "a"]):
        add(core, clock, cam, 10 + i)
    assert core.switch_processor(None).last_frame_ids == {"a": 14, "b": 11}

