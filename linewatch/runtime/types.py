"""Records that move through the runtime: a received frame and the verdict it gets.

Every received frame ends as exactly one Verdict. These are plain data; wire.py turns them
into bytes and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

VERDICT_VALUES = ("pass", "fail", "error", "timeout", "shed")


@dataclass
class Frame:
    """One camera frame after decoding. `image` is RGB uint8 (H, W, 3)."""

    camera: str
    frame_id: int
    capture_ts: float  # seconds since the epoch, from the sender (or receive time if absent)
    image: np.ndarray
    received_ts: float  # time.time() when ingest took it off the socket
    received_mono: float  # time.monotonic() at the same moment; deadlines use this clock
    part_id: str | None = None
    encoder_position: int | None = None
    reply: Any = None  # opaque handle for senders that wait for an answer (imagezmq REQ/REP)


@dataclass
class Verdict:
    """The answer for one frame. `verdict` is one of VERDICT_VALUES."""

    camera: str
    frame_id: int
    verdict: str
    capture_ts: float
    part_id: str | None = None
    score: float | None = None
    threshold: float | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None  # why error / timeout / shed
    latency_s: float | None = None  # capture -> verdict
    backend: str | None = None
    bank_id: str | None = None
    heatmap: np.ndarray | None = None  # float32 (H, W) at input resolution, when configured
    overlay_jpeg: bytes | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # Set when the verdict is released: the daemon run (random, new at every start) and the
    # verdict's number within it (0, 1, 2, ... in publish order, so a gap is a lost verdict).
    run_id: str | None = None
    seq: int | None = None

    @property
    def id(self) -> str | None:
        """Unique across daemon and sender restarts: "<run_id>-<seq>"."""
        return None if self.run_id is None or self.seq is None else f"{self.run_id}-{self.seq}"

    def __post_init__(self) -> None:
        if self.verdict not in VERDICT_VALUES:
            raise ValueError(f"verdict must be one of {VERDICT_VALUES}, got {self.verdict!r}")
